#!/usr/bin/env bash
# Nested benchmarks (numbers, not pass/fail), inside the nested test host (scripts/nested-host.sh:
# L1 with kvm_amd under QEMU-TCG). NOT comparable with bare metal or with scripts/bench.sh: every
# guest instruction of L1 is emulated. Medians over N runs (default 5) of
#   - VM start -> agent ready (`joeyctl run --timings`) and a whole `joeyctl run -- true`,
# for the built-in VMM, for QEMU on L1's KVM, and for QEMU-TCG (TCG inside TCG: 30 s and more
# to agent ready, so the agent timeouts are raised for every kind), all in the same L1 boot.
# Needs JOEYCTL, JOEY_KERNEL, JOEY_INITRD (as `make bench` sets them).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${JOEYCTL:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
N=${N:-5}

if [ "${1:-}" != --in-l1 ]; then
  exec bash "$repo/scripts/nested-host.sh" -- bash "$repo/scripts/nested-bench.sh" --in-l1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
vmlinux=${JOEY_VMLINUX:-$(dirname "$JOEY_KERNEL")/vmlinux}
mid() { sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
# label, hypervisor.kind, hypervisor.qemu.accel
bench() {
  local label=$1 kind=$2 accel=$3 i t0 t1 err ready=() whole=()
  printf '[hypervisor]\nkind = "%s"\nkernel = "%s"\ninitrd = "%s"\n[hypervisor.builtin]\nkernel = "%s"\n[hypervisor.qemu]\naccel = "%s"\n[agent]\nready_timeout_ms = 300000\nrpc_timeout_ms = 60000\n[runtime]\nstate_dir = "%s"\n' \
    "$kind" "$JOEY_KERNEL" "$JOEY_INITRD" "$vmlinux" "$accel" "$tmp/state" > "$tmp/$label.toml"
  for i in $(seq "$N"); do
    t0=$(date +%s%N)
    err=$("$JOEYCTL" run --config "$tmp/$label.toml" --timings -- true 2>&1 >/dev/null) || {
      echo "joey nested bench: $label: run $i failed: $err" >&2
      return 1
    }
    t1=$(date +%s%N)
    whole+=($(( (t1 - t0) / 1000000 )))
    ready+=($(grep -o 'vm_start_to_agent_ready_ms=[0-9]*' <<<"$err" | cut -d= -f2))
  done
  echo "joey nested bench: $label vm_start_to_agent_ready_ms median=$(printf '%s\n' "${ready[@]}" | mid) all=[${ready[*]}]"
  echo "joey nested bench: $label joeyctl_run_true_ms median=$(printf '%s\n' "${whole[@]}" | mid) all=[${whole[*]}]"
}
echo "joey nested bench: inside the nested test host (QEMU-TCG L1 with kvm_amd); runs=$N; not comparable with bare metal"
status=0
bench builtin builtin auto || status=1
bench qemu-kvm qemu kvm || status=1
bench qemu-tcg qemu tcg || status=1
exit "$status"
