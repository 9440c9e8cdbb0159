#!/usr/bin/env bash
# Runs every joey test (unit + integration with real QEMU/kernel/agent) and prints one summary
# line: "tests: N passed, M failed". Expects JOEYCTL, JOEY_MONITOR, JOEY_KERNEL, JOEY_INITRD (set by
# `make test`).
set -uo pipefail
: "${JOEYCTL:?}" "${JOEY_MONITOR:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
CARGO=${CARGO:-cargo}
log=$(mktemp /tmp/joey-test.XXXXXX)
trap 'rm -f "$log"' EXIT
status=0
times=()
step() {
  echo "+ $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=$rc
  times+=("$(printf '%5d s  exit %-3s %s' $((SECONDS - t0)) "$rc" "$*")")
}
step "$CARGO" test --release --no-fail-fast --workspace --exclude joey-tests
step "$CARGO" test --release --no-fail-fast -p joey-tests -- --test-threads=2 --skip fault_matrix
# The fault-injection matrix (docs/faults.md), alone: its neighbour checks want a quiet host.
step bash scripts/fault.sh
# The built-in VMM on a real Linux guest: inside the nested test host (L1 with kvm_amd under
# QEMU-TCG; its kernel is built on first use, ~6 min, then cached), as this host's KVM is PVM-type.
step bash scripts/nested-builtin-tests.sh
# Every fuzz target of fuzz/ for a short, bounded time (10 s each here; `make fuzz` defaults to 20 s,
# FUZZ_SECONDS=600 for long local runs); a crash fails the step.
step env FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz.sh
sum() { grep -E '^test result:' "$log" | sed -E "s/.* ([0-9]+) $1.*/\1/" | awk '{s+=$1} END {print s+0}'; }
passed=$(sum passed)
failed=$(sum failed)
ignored=$(sum ignored)
echo
echo "test steps (wall time, exit status):"
printf '  %s\n' "${times[@]}"
echo "tests: $passed passed, $failed failed, $ignored skipped"
if [ "$status" = 0 ] && [ "$failed" != 0 ]; then status=1; fi
exit "$status"
