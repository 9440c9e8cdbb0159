#!/usr/bin/env bash
# The fault-injection matrix (`make fault`, docs/faults.md): tests/tests/fault.rs injects every
# fault class into a real sandbox while a neighbour sandbox answers execs, and prints one table
# row per class (fault x outcome x leaks x neighbour, PASS/FAIL). Exits non-zero when a row failed.
# Needs JOEYCTL, JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (set by `make fault`); FAULT_ONLY=a,b runs
# the rows whose names start with a or b.
set -uo pipefail
: "${JOEYCTL:?}" "${JOEY_SHIM:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
CARGO=${CARGO:-cargo}
exec "$CARGO" test --release -p joey-tests --test fault -- --nocapture --test-threads=1
