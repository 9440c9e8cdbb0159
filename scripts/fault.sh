#!/usr/bin/env bash
# The fault-injection matrix (`make fault`, docs/faults.md): tests/tests/fault.rs injects every
# fault class into a real sandbox while a neighbour sandbox answers execs, and prints one table
# row per class (fault x outcome x leaks x neighbour, PASS/FAIL). Exits non-zero when a row failed.
# Needs JOEYCTL, JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (set by `make fault`); FAULT_ONLY=a,b runs
# the rows whose names start with a or b.
#
# The agent rows boot a second initramfs whose agent has failpoints (built here with the
# `failpoints` cargo feature; release builds carry none). It is built in the same target dir (the
# dependencies are shared), copied to build/failpoints/, and the release agent is built back.
set -euo pipefail
: "${JOEYCTL:?}" "${JOEY_SHIM:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
CARGO=${CARGO:-cargo}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
triple=x86_64-unknown-linux-gnu
agent=target/$triple/release/joey-agent
fp_dir=build/failpoints
mkdir -p "$fp_dir"
echo "==> fault: the failpoint agent (joey-agent --features failpoints) and its initramfs"
# The Makefile's agent target (its RUSTFLAGS; a different set would rebuild every dependency).
build_agent() { make -s --no-print-directory agent AGENT_FEATURES="$*" >/dev/null; }
build_agent --features failpoints
cp "$agent" "$fp_dir/joey-agent"
build_agent
if cmp -s "$agent" "$fp_dir/joey-agent"; then
  echo "fault: $agent is still the failpoint agent after the release build" >&2
  exit 1
fi
d=$(bash guest/build-initrd.sh "$fp_dir/joey-agent" 2>"$fp_dir/initrd-build.log") || { cat "$fp_dir/initrd-build.log" >&2; exit 1; }
export JOEY_FP_INITRD=$d/initrd.img
echo "==> fault: the matrix"
exec "$CARGO" test --release -p joey-tests --test fault -- --nocapture --test-threads=1
