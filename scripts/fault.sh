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
# So are joeyctl and the shim with the host failpoints (`debug.failpoints`, docs/faults.md):
# JOEY_FP_JOEYCTL, JOEY_FP_SHIM.
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
# The host binaries with failpoints (vmm-core, actors: `debug.failpoints`), the same way: the
# Makefile's package selection (features of the shared dependencies unify alike), then the
# release binaries back (fresh: only copied out of target/release/deps again).
echo "==> fault: joeyctl and containerd-shim-joey-v2 with --features joey-shim/failpoints"
host_bins=(joeyctl containerd-shim-joey-v2)
build_host() { "$CARGO" build --release -q "${host_bins[@]/#/--bin=}" "$@"; }
build_host --features joey-shim/failpoints
for b in "${host_bins[@]}"; do cp "target/release/$b" "$fp_dir/$b"; done
build_host
for b in "${host_bins[@]}"; do
  if cmp -s "target/release/$b" "$fp_dir/$b"; then
    echo "fault: target/release/$b is still the failpoint build after the release build" >&2
    exit 1
  fi
done
export JOEY_FP_JOEYCTL=$root/$fp_dir/joeyctl JOEY_FP_SHIM=$root/$fp_dir/containerd-shim-joey-v2
d=$(bash guest/build-initrd.sh "$fp_dir/joey-agent" 2>"$fp_dir/initrd-build.log") || { cat "$fp_dir/initrd-build.log" >&2; exit 1; }
export JOEY_FP_INITRD=$d/initrd.img
echo "==> fault: the matrix"
exec "$CARGO" test --release -p joey-tests --test fault -- --nocapture --test-threads=1
