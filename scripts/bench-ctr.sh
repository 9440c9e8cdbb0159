#!/usr/bin/env bash
# containerd benchmark (numbers, not pass/fail): in ONE private containerd 1.6 (own root, state,
# sockets; the locally built busybox image imported once), medians over N runs of
#   - `ctr run --rm --runtime R IMAGE bN true`           (wall clock, ctr start to exit)
#   - `ctr run --rm --runtime R IMAGE bN echo hi`         (stdout checked: exactly "hi\n")
# for R = io.containerd.runc.v2 and io.containerd.joey.v2, measured alternately in the same run,
# and the joey/runc ratio. Needs JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (the Makefile's `bench`
# target sets them), Debian's containerd, runc, busybox-static.
set -euo pipefail
N=${N:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/joey-bench-ctr.XXXXXX)
trap 'stop_containerd; rm -rf "$tmp"' EXIT
# shellcheck source=lib-containerd.sh
source "$root/scripts/lib-containerd.sh"
# run_ms RUNTIME ID EXPECTED_STDOUT ARGV...: prints the wall-clock ms; fails on a wrong stdout or exit.
run_ms() {
  local rt=$1 id=$2 want=$3; shift 3
  local t0 t1 out
  t0=$(date +%s%N)
  out=$("${ctr[@]}" run --rm --runtime "$rt" "$image" "$id" "$@") || { echo "bench-ctr: $rt $id exited $?" >&2; exit 1; }
  t1=$(date +%s%N)
  [ "$out" = "$want" ] || { echo "bench-ctr: $rt $id printed '$out', expected '$want'" >&2; exit 1; }
  echo $(( (t1 - t0) / 1000000 ))
}
runc_true=(); joey_true=(); runc_echo=(); joey_echo=()
# Alternate the runtimes so that a load change on the host hits both alike.
for i in $(seq "$N"); do
  runc_true+=("$(run_ms io.containerd.runc.v2 "br$i" "" true)")
  joey_true+=("$(run_ms io.containerd.joey.v2 "bj$i" "" true)")
  runc_echo+=("$(run_ms io.containerd.runc.v2 "er$i" hi echo hi)")
  joey_echo+=("$(run_ms io.containerd.joey.v2 "ej$i" hi echo hi)")
done
rt=$(printf '%s\n' "${runc_true[@]}" | median)
jt=$(printf '%s\n' "${joey_true[@]}" | median)
re=$(printf '%s\n' "${runc_echo[@]}" | median)
je=$(printf '%s\n' "${joey_echo[@]}" | median)
# The shim logs its accelerator choice at info; at the default level it is not there: "?".
accel=$(grep -o 'accelerator chosen[^ ]* .*accel=[a-z]*' "$tmp/containerd.log" | head -1 | sed -E 's/.*accel=([a-z]+).*/\1/' || true)
echo "joey bench-ctr: runs=$N containerd=$(containerd --version | awk '{print $3}') joey accel=${accel:-?} (one private containerd, runtimes alternated)"
echo "joey bench-ctr: ctr_run_rm_true_ms    runc median=$rt all=[${runc_true[*]}]"
echo "joey bench-ctr: ctr_run_rm_true_ms    joey median=$jt all=[${joey_true[*]}]"
echo "joey bench-ctr: ctr_run_rm_echo_hi_ms runc median=$re all=[${runc_echo[*]}]"
echo "joey bench-ctr: ctr_run_rm_echo_hi_ms joey median=$je all=[${joey_echo[*]}]"
echo "joey bench-ctr: ratio joey/runc true = $(awk -v a="$jt" -v b="$rt" 'BEGIN {printf "%.2f", a/b}')  echo hi = $(awk -v a="$je" -v b="$re" 'BEGIN {printf "%.2f", a/b}')"
