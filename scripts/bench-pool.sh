#!/usr/bin/env bash
# Warm pool benchmark (numbers, not pass/fail; docs/pool.md), medians over N runs:
#   - `joeyctl run --timings -- true`: VM start -> agent ready (cold) vs lease -> agent ready
#     (pooled), and the wall clock of each, cold and pooled runs alternated;
#   - `ctr run --rm IMAGE true` in one private containerd 1.6: runc, joey cold (no pool runs),
#     joey pooled (joey-pool runs), each alternated with runc, and the joey/runc ratios.
# The pool has size 1 and every pooled run waits for its refill first (the steady state of a
# pool that keeps up); the runs that were leased are counted from the pool's log.
# Needs JOEYCTL, JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (as the Makefile's `bench` target sets them;
# joey-pool is taken from next to JOEYCTL), Debian's containerd, runc, busybox-static.
set -euo pipefail
N=${N:-5}
: "${JOEYCTL:?}"
JOEY_POOL=${JOEY_POOL:-$(dirname "$JOEYCTL")/joey-pool}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/joey-bench-pool.XXXXXX)
pool_pid=""
stop_pool() {
  if [ -n "$pool_pid" ]; then kill -TERM "$pool_pid" 2>/dev/null || true; wait "$pool_pid" 2>/dev/null || true; fi
  pool_pid=""
}
trap 'stop_pool; stop_containerd; rm -rf "$tmp"' EXIT
# shellcheck source=lib-containerd.sh
source "$root/scripts/lib-containerd.sh"
# The shim reads the config at each start: the pool section applies to the runs below.
printf '\n[pool]\nsize = 1\n' >> "$tmp/joey.toml"
sed 's/^size = 1$/size = 0/' "$tmp/joey.toml" > "$tmp/cold.toml"

start_pool() {
  "$JOEY_POOL" --config "$tmp/joey.toml" -v >> "$tmp/pool.log" 2>&1 &
  pool_pid=$!
}
# Waits (up to 120 s) until the pool has its VM ready.
wait_pool() {
  for _ in $(seq 1200); do
    [ "$("$JOEY_POOL" --config "$tmp/joey.toml" status 2>/dev/null)" = "ready=1 booting=0 leased=0 size=1" ] && return 0
    sleep 0.1
  done
  echo "bench-pool: the pool did not fill:" >&2; tail -20 "$tmp/pool.log" >&2; exit 1
}
# joeyctl_run CONFIG: prints "<ready_ms> <wall_ms> <source>".
joeyctl_run() {
  local t0 t1 err
  t0=$(date +%s%N)
  err=$("$JOEYCTL" run --config "$1" --timings -- true 2>&1 >/dev/null) || { echo "bench-pool: joeyctl failed: $err" >&2; exit 1; }
  t1=$(date +%s%N)
  local ready src
  ready=$(grep -o 'vm_start_to_agent_ready_ms=[0-9]*' <<<"$err" | cut -d= -f2)
  src=$(grep -o 'vm source=[a-z]*' <<<"$err" | cut -d= -f2)
  echo "$ready $(( (t1 - t0) / 1000000 )) $src"
}
# ctr_ms RUNTIME ID: wall-clock ms of `ctr run --rm ... true`.
ctr_ms() {
  local t0 t1
  t0=$(date +%s%N)
  "${ctr[@]}" run --rm --runtime "$1" "$image" "$2" true >/dev/null || { echo "bench-pool: $1 $2 failed" >&2; exit 1; }
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 ))
}
leases() { grep -c 'pool VM leased' "$tmp/pool.log" || true; }

cold_ready=(); cold_wall=(); pool_ready=(); pool_wall=(); sources=()
start_pool
for i in $(seq "$N"); do
  wait_pool
  read -r r w s < <(joeyctl_run "$tmp/joey.toml"); pool_ready+=("$r"); pool_wall+=("$w"); sources+=("$s")
  read -r r w s < <(joeyctl_run "$tmp/cold.toml"); cold_ready+=("$r"); cold_wall+=("$w")
done
joeyctl_leases=$(leases)
stop_pool

runc_a=(); cold_ctr=(); runc_b=(); pool_ctr=()
for i in $(seq "$N"); do
  runc_a+=("$(ctr_ms io.containerd.runc.v2 "ra$i")")
  cold_ctr+=("$(ctr_ms io.containerd.joey.v2 "jc$i")")
done
start_pool
for i in $(seq "$N"); do
  wait_pool
  pool_ctr+=("$(ctr_ms io.containerd.joey.v2 "jp$i")")
  runc_b+=("$(ctr_ms io.containerd.runc.v2 "rb$i")")
done
ctr_leases=$(( $(leases) - joeyctl_leases ))
stop_pool

med() { printf '%s\n' "$@" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
cr=$(med "${cold_ready[@]}"); pr=$(med "${pool_ready[@]}")
cw=$(med "${cold_wall[@]}"); pw=$(med "${pool_wall[@]}")
ra=$(med "${runc_a[@]}"); rb=$(med "${runc_b[@]}")
cc=$(med "${cold_ctr[@]}"); pc=$(med "${pool_ctr[@]}")
echo "joey bench-pool: runs=$N pool size=1 (refilled before each pooled run) load=$(cut -d' ' -f1-3 /proc/loadavg)"
echo "joey bench-pool: joeyctl run true: pooled runs leased=$joeyctl_leases/$N sources=[${sources[*]}]"
echo "joey bench-pool: vm_start_to_agent_ready_ms cold   median=$cr all=[${cold_ready[*]}]"
echo "joey bench-pool: lease_to_agent_ready_ms    pooled median=$pr all=[${pool_ready[*]}]"
echo "joey bench-pool: joeyctl_run_true_wall_ms   cold   median=$cw all=[${cold_wall[*]}]"
echo "joey bench-pool: joeyctl_run_true_wall_ms   pooled median=$pw all=[${pool_wall[*]}]"
echo "joey bench-pool: ctr_run_rm_true_ms runc (with cold) median=$ra all=[${runc_a[*]}]"
echo "joey bench-pool: ctr_run_rm_true_ms joey cold        median=$cc all=[${cold_ctr[*]}]"
echo "joey bench-pool: ctr_run_rm_true_ms runc (with pool) median=$rb all=[${runc_b[*]}]"
echo "joey bench-pool: ctr_run_rm_true_ms joey pooled      median=$pc all=[${pool_ctr[*]}] leased=$ctr_leases/$N"
echo "joey bench-pool: ratio joey/runc ctr run --rm true: cold = $(ratio "$cc" "$ra")  pooled = $(ratio "$pc" "$rb")"
