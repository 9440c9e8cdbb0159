#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ (libFuzzer, address sanitizer, debug assertions) for
# FUZZ_SECONDS each (default 20, `make fuzz`; `make test` runs 10 s each; `make fuzz FUZZ_SECONDS=600`
# for a long local run), starting from the committed seeds (fuzz/seeds/<target>) plus what
# earlier runs found (fuzz/corpus/<target>, not committed). FUZZ_TARGETS="a b" runs only
# those. A crash fails the run and leaves its input in fuzz/artifacts/<target>/ (reproduce:
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/). Prints one line per target:
# executions, exec/s, corpus size and time. Installs cargo-fuzz if it is missing; the stable
# toolchain is enough (RUSTC_BOOTSTRAP lets it pass the sanitizer flags).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${FUZZ_SECONDS:-20}
cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# 16 codegen units: a much shorter build (CI builds from scratch) for slightly slower runs.
flags=(--debug-assertions --codegen-units 16)
t0=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "joey fuzz: build $(( $(date +%s) - t0 ))s"
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
log=$(mktemp /tmp/joey-fuzz.XXXXXX)
# The targets' temporary directories (disk images, sockets, a shared tree) live as long as the
# fuzzing process, which exits without dropping them: they go in one directory removed here.
TMPDIR=$(mktemp -d /tmp/joey-fuzz-tmp.XXXXXX)
export TMPDIR
trap 'rm -f "$log"; rm -rf "$TMPDIR"' EXIT
for t in $targets; do
  mkdir -p "corpus/$t"
  s0=$(date +%s)
  if ! cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "joey fuzz: $t FAILED (input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
  echo "joey fuzz: $t execs=${execs:-?} exec_per_s=${rate:-?} cov=${cov:-?} corpus=$(ls "corpus/$t" | wc -l) time=$(( $(date +%s) - s0 ))s"
done
echo "joey fuzz: all targets passed (${secs}s each, total $(( $(date +%s) - t0 ))s)"
