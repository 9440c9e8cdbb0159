#!/usr/bin/env bash
# joey benchmarks (numbers, not pass/fail): medians over N runs of
#   - VM start -> agent ready (as reported by `joeyctl run --timings`)
#   - a whole `joeyctl run -- true` (wall clock, process start to exit)
# Needs JOEYCTL, JOEY_KERNEL, JOEY_INITRD (the Makefile's `bench` target sets them).
set -euo pipefail
N=${N:-10}
: "${JOEYCTL:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
tmp=$(mktemp -d /tmp/joey-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/config.toml" <<EOT
[hypervisor]
kernel = "$JOEY_KERNEL"
initrd = "$JOEY_INITRD"
[runtime]
state_dir = "$tmp/state"
EOT
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ready=(); whole=(); accel=""
for i in $(seq "$N"); do
  t0=$(date +%s%N)
  err=$("$JOEYCTL" run --config "$tmp/config.toml" --timings -- true 2>&1 >/dev/null)
  t1=$(date +%s%N)
  whole+=($(( (t1 - t0) / 1000000 )))
  line=$(grep '^joey timings: hypervisor=' <<<"$err")
  ready+=($(sed -E 's/.*vm_start_to_agent_ready_ms=([0-9]+).*/\1/' <<<"$line"))
  accel=$(sed -E 's/.*hypervisor=([a-z]+) accel=([a-z]+).*/\1 \2/' <<<"$line")
done
reason=$(grep '^joey timings: accel reason:' <<<"$err" | sed 's/^joey timings: accel reason: //')
echo "joey bench: runs=$N hypervisor/accel=$accel"
echo "joey bench: accel reason: $reason"
echo "joey bench: vm_start_to_agent_ready_ms median=$(printf '%s\n' "${ready[@]}" | median) all=[${ready[*]}]"
echo "joey bench: joeyctl_run_true_ms      median=$(printf '%s\n' "${whole[@]}" | median) all=[${whole[*]}]"
