#!/usr/bin/env bash
# `make test`'s nested step: the built-in VMM suite on a real Linux guest, inside the nested test
# host (scripts/nested-host.sh: L1 with kvm_amd under QEMU-TCG). This machine's own KVM is
# PVM-type, so on the host itself the suite can only check that joey refuses the built-in VMM.
#
#   scripts/nested-builtin-tests.sh          build the test executables here, boot L1 once, run
#                                            them there (needs JOEYCTL, JOEY_KERNEL, JOEY_INITRD,
#                                            as `make test` sets them)
#
# In L1, the step first requires `joeyctl host-check` to say the built-in VMM is available, and
# each test to say it ran on it: it fails, never passes, when the suite could not run.
# Output: the tests' own libtest lines ("test result: ..."), which scripts/test.sh counts.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${JOEYCTL:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"

# The tests, in L1: (test executable name, test filter, line the test prints when it really ran
# on the built-in VMM).
TESTS=(
  "walking_skeleton|builtin_suite|builtin suite: running"
  "containers|builtin_suite|builtin suite: running"
  "network|builtin_vmm_carries_the_pod_network|builtin network: running"
)

in_l1() {
  local status=0 out spec exe name filter ran
  out=$(mktemp)
  if ! "$JOEYCTL" host-check | tee "$out" | grep -q '^builtin vmm: available: '; then
    echo "nested-builtin-tests: the built-in VMM is not available in L1:" >&2
    cat "$out" >&2
    return 1
  fi
  for spec in "$@"; do
    IFS='|' read -r exe filter ran <<<"$spec"
    name=${exe##*/}
    echo "nested-builtin-tests: ${name%-*} $filter"
    "$exe" "$filter" --exact --nocapture --test-threads=1 2>&1 | tee "$out"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    if ! grep -qF "$ran" "$out"; then
      echo "nested-builtin-tests: ${name%-*} $filter did not run on the built-in VMM (no '$ran')" >&2
      status=1
    fi
  done
  rm -f "$out"
  return "$status"
}

if [ "${1:-}" = --in-l1 ]; then
  shift
  in_l1 "$@"
  exit
fi

CARGO=${CARGO:-cargo}
echo "nested-builtin-tests: building the test executables"
json=$("$CARGO" test --release -p joey-tests --no-run --message-format=json) || exit 1
specs=()
for t in "${TESTS[@]}"; do
  IFS='|' read -r name filter ran <<<"$t"
  exe=$(grep -o "\"executable\":\"[^\"]*/deps/$name-[0-9a-f]*\"" <<<"$json" | tail -n 1 | cut -d'"' -f4)
  [ -x "$exe" ] || { echo "nested-builtin-tests: no test executable for $name" >&2; exit 1; }
  specs+=("$exe|$filter|$ran")
done
t0=$SECONDS
bash "$repo/scripts/nested-host.sh" -- bash "$repo/scripts/nested-builtin-tests.sh" --in-l1 "${specs[@]}"
rc=$?
echo "nested-builtin-tests: $((SECONDS - t0)) s in the nested host (exit $rc)"
exit "$rc"
