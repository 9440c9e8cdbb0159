#!/usr/bin/env bash
# CRI benchmark (part of `make bench`, docs/cri.md): on a private containerd with CRI
# (scripts/cri-containerd.sh), the time from RunPodSandbox to "first container running"
# (RunPodSandbox + CreateContainer + StartContainer, measured by `joeyctl cri run-pod --timings`),
# joey vs runc, ROUNDS interleaved runs each, medians and their ratio; then PODS joey pods
# started concurrently: the time until all of their containers run, and the PSS of joey's
# processes (shim + VM) per pod while they run.
# Env: JOEYCTL (default target/release/joeyctl), JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD (as for
# cri-containerd.sh), ROUNDS (default 5), PODS (default 10).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
joeyctl=${JOEYCTL:-$root/target/release/joeyctl}
rounds=${ROUNDS:-5}
pods=${PODS:-10}
[ -x "$joeyctl" ] || { echo "cri-bench: no joeyctl at $joeyctl (make build)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/jcb.XXXXXX)
dir=$tmp/${tmp##*.}
cleanup() { bash "$here/cri-containerd.sh" stop "$dir" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
bash "$here/cri-containerd.sh" start "$dir" > "$tmp/env"
# shellcheck disable=SC1091
. "$tmp/env"
export CRI_ADDRESS

first_running() { # RUNTIME NAME -> ms from RunPodSandbox to the container running
  "$joeyctl" cri run-pod --timings --runtime "$1" --name "$2" -- true 2>&1 >/dev/null \
    | sed -n 's/.*first_running_ms=\([0-9]*\).*/\1/p'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

: > "$tmp/joey"; : > "$tmp/runc"
for i in $(seq "$rounds"); do
  first_running joey "bench-joey-$i" >> "$tmp/joey"
  first_running runc "bench-runc-$i" >> "$tmp/runc"
done
j=$(median < "$tmp/joey"); r=$(median < "$tmp/runc")
[ "$(wc -l < "$tmp/joey")" = "$rounds" ] && [ "$(wc -l < "$tmp/runc")" = "$rounds" ] \
  || { echo "cri-bench: a run printed no timing" >&2; exit 1; }
echo "cri: RunPodSandbox+CreateContainer+StartContainer to first container running, median of $rounds: joey ${j} ms, runc ${r} ms, ratio $(awk -v j="$j" -v r="$r" 'BEGIN {printf "%.1f", j/r}')"

# PODS concurrent joey pods, each running `sleep` long enough to be measured.
t0=$(date +%s%N)
pids=()
for i in $(seq "$pods"); do
  "$joeyctl" cri run-pod --timings --runtime joey --name "conc-$i" -- sleep 60 > /dev/null 2> "$tmp/conc-$i" &
  pids+=($!)
done
deadline=$((SECONDS + 300))
until [ "$(cat "$tmp"/conc-* | grep -c first_running_ms)" = "$pods" ]; do
  [ $SECONDS -lt $deadline ] || { echo "cri-bench: $pods pods did not all run within 300 s" >&2; exit 1; }
  for i in $(seq "$pods"); do
    if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null && ! grep -q first_running_ms "$tmp/conc-$i"; then
      echo "cri-bench: concurrent pod $i failed: $(cat "$tmp/conc-$i")" >&2
      wait
      exit 1
    fi
  done
  sleep 0.1
done
total=$(( ($(date +%s%N) - t0) / 1000000 ))
# PSS of every shim (one per pod) and VM of this instance, per shim found (a pod whose sleep
# already ended is not counted).
pss=0 shims=0
for p in /proc/[0-9]*; do
  { mapfile -d '' args < "$p/cmdline"; } 2>/dev/null || continue
  case "${args[*]}" in
    *containerd-shim-joey-v2*"$CRI_ADDRESS"*) shims=$((shims + 1)) ;;
    *"$JOEY_STATE_DIR"*) ;;
    *) continue ;;
  esac
  kb=$(awk '/^Pss:/ {print $2}' "$p/smaps_rollup" 2>/dev/null || echo 0)
  pss=$((pss + ${kb:-0}))
done
[ "$shims" -gt 0 ] || { echo "cri-bench: no joey shim found running" >&2; exit 1; }
echo "cri: $pods joey pods started concurrently: all running after ${total} ms; PSS of joey's processes (shim + VM) per pod: $((pss / shims / 1024)) MiB ($shims pods measured)"
for p in "${pids[@]}"; do wait "$p" || { echo "cri-bench: a concurrent pod failed" >&2; exit 1; }; done
