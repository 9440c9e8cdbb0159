#!/usr/bin/env bash
# Density benchmark (numbers, not pass/fail): what an idle joey sandbox costs in memory, in one
# private containerd 1.6 with the locally built busybox image.
#   - 1 sandbox, then 10 at once (`ctr run -d ... sleep`, all started concurrently; the total time
#     until every `ctr run -d` returned is reported and every task must be RUNNING);
#   - once idle (IDLE_S seconds after the last start), the PSS of each sandbox's processes from
#     /proc/<pid>/smaps_rollup (like smem): the shim, and QEMU broken down into guest memory
#     touched (Pss_Shmem: the memfd guest RAM), QEMU's own anonymous memory (heap, TCG code
#     cache: Pss_Anon) and shared files (binaries, libraries: Pss_File, split between sharers);
#   - per sandbox: the mean over the sandboxes running at that moment.
# Needs JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (as the Makefile's `bench` target sets them),
# Debian's containerd, runc, busybox-static.
set -euo pipefail
IDLE_S=${IDLE_S:-5}
MANY=${MANY:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/joey-bench-density.XXXXXX)
cleanup() {
  for id in $("${ctr[@]}" task ls -q 2>/dev/null); do "${ctr[@]}" task kill -s KILL "$id" 2>/dev/null || true; done
  for id in $("${ctr[@]}" task ls -q 2>/dev/null); do
    for _ in $(seq 100); do "${ctr[@]}" task rm "$id" >/dev/null 2>&1 && break; sleep 0.1; done
  done
  for id in $("${ctr[@]}" container ls -q 2>/dev/null); do "${ctr[@]}" container rm "$id" >/dev/null 2>&1 || true; done
  stop_containerd
  rm -rf "$tmp"
}
trap cleanup EXIT
ctr=(true)
# shellcheck source=lib-containerd.sh
source "$root/scripts/lib-containerd.sh"
state="$tmp/joey-state"

# kib PID FIELD: a field of the process's smaps_rollup, in KiB (0 if the process is gone).
kib() { awk -v f="$2:" '$1 == f {print $2; found=1} END {if (!found) print 0}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
# Pids whose command line contains $1.
pids_with() {
  local p
  for p in /proc/[0-9]*; do
    { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -qF -- "$1" && echo "${p#/proc/}"
  done
  return 0
}
# measure ID...: prints per-sandbox means in MiB: "total shim qemu guest anon file".
measure() {
  local n=0 shim=0 guest=0 anon=0 file=0 qemu=0 id p
  for id in "$@"; do
    # QEMU names its sockets under <state>/<id>/; the shim runs with `-id <id>`.
    for p in $(pids_with "$state/$id/"); do
      [ "$(cat "/proc/$p/comm")" = "qemu-system-x86" ] || continue
      qemu=$((qemu + $(kib "$p" Pss)))
      guest=$((guest + $(kib "$p" Pss_Shmem)))
      anon=$((anon + $(kib "$p" Pss_Anon)))
      file=$((file + $(kib "$p" Pss_File)))
    done
    for p in $(pids_with "-id $id "); do
      case "$(cat "/proc/$p/cmdline" 2>/dev/null | tr '\0' ' ')" in
        *containerd-shim-joey-v2*) shim=$((shim + $(kib "$p" Pss))) ;;
      esac
    done
    n=$((n + 1))
  done
  awk -v n="$n" -v s="$shim" -v q="$qemu" -v g="$guest" -v a="$anon" -v f="$file" \
    'BEGIN {m = 1024 * n; printf "%.1f %.1f %.1f %.1f %.1f %.1f\n", (s + q) / m, s / m, q / m, g / m, a / m, f / m}'
}
report() {
  local label=$1; shift
  read -r total shim qemu guest anon file < <(measure "$@")
  echo "joey bench-density: idle_pss_mib_per_sandbox at $label: total=$total (shim=$shim qemu=$qemu: guest_touched=$guest qemu_anon=$anon shared_files=$file)"
}
wait_running() {
  local id
  for id in "$@"; do
    for _ in $(seq 600); do "${ctr[@]}" task ls | grep -q "^$id .*RUNNING" && break; sleep 0.1; done
    "${ctr[@]}" task ls | grep -q "^$id .*RUNNING" || { echo "bench-density: $id is not running" >&2; exit 1; }
  done
}
start() { "${ctr[@]}" run -d --runtime io.containerd.joey.v2 "$image" "$1" sleep 3600 >/dev/null; }
stop_all() {
  local id
  for id in "$@"; do "${ctr[@]}" task kill -s KILL "$id" >/dev/null 2>&1 || true; done
  for id in "$@"; do
    for _ in $(seq 300); do "${ctr[@]}" task rm "$id" >/dev/null 2>&1 && break; sleep 0.1; done
    "${ctr[@]}" container rm "$id" >/dev/null
  done
}

start one
wait_running one
sleep "$IDLE_S"
report 1 one
stop_all one

ids=()
for i in $(seq "$MANY"); do ids+=("many$i"); done
t0=$(date +%s%N)
pids=()
for id in "${ids[@]}"; do start "$id" & pids+=($!); done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
t1=$(date +%s%N)
[ "$failed" = 0 ] || { echo "bench-density: $failed of $MANY ctr run -d failed" >&2; exit 1; }
wait_running "${ids[@]}"
echo "joey bench-density: $MANY concurrent ctr run -d: all running, total_ms=$(( (t1 - t0) / 1000000 )) load=$(cut -d' ' -f1-3 /proc/loadavg)"
sleep "$IDLE_S"
report "$MANY" "${ids[@]}"
stop_all "${ids[@]}"
