#!/usr/bin/env bash
# Pod network benchmark (numbers, not pass/fail): a container started by a private containerd in
# a pod network namespace made here (veth to a peer namespace, 10.203.0.0/24, MTU 1500), runc's
# and joey's in turn in the same netns, in one run; medians over N rounds of
#   - peer -> container TCP throughput (BYTES sent by the peer into `nc -l` in the container)
#   - container -> peer TCP throughput (`dd | nc` in the container, timed by the peer)
#   - round-trip time of 64-byte requests to an echo server in the container (median of 200)
# and the joey/runc ratios. Traffic stays inside the two namespaces. Needs JOEY_SHIM, JOEY_KERNEL,
# JOEY_INITRD (the Makefile's `bench` target sets them), containerd, runc, iproute2, python3.
set -euo pipefail
N=${N:-3}
MIB=${MIB:-32}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/joey-bench-net.XXXXXX)
pod="joey-bench-pod-$$"
peer="joey-bench-peer-$$"
cleanup() {
  for id in $("${ctr[@]}" task ls -q 2>/dev/null); do "${ctr[@]}" task kill -s KILL "$id" 2>/dev/null || true; done
  stop_containerd
  ip netns del "$pod" 2>/dev/null || true
  ip netns del "$peer" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ctr=(true)
# shellcheck source=lib-containerd.sh
source "$root/scripts/lib-containerd.sh"
ip netns add "$pod"
ip netns add "$peer"
ip link add eth0 netns "$pod" type veth peer name p0 netns "$peer"
ip -n "$pod" addr add 10.203.0.2/24 dev eth0
ip -n "$peer" addr add 10.203.0.1/24 dev p0
for ns in "$pod" "$peer"; do ip -n "$ns" link set lo up; done
ip -n "$pod" link set eth0 up
ip -n "$peer" link set p0 up
bytes=$((MIB * 1024 * 1024))
peer_py() { ip netns exec "$peer" python3 "$root/scripts/netbench.py" "$@"; }

# measure RUNTIME ID: prints "p2c_mbit c2p_mbit rtt_us" for one container of RUNTIME.
measure() {
  local rt=$1 id=$2 p2c c2p rtt
  "${ctr[@]}" run -d --runtime "$rt" --with-ns "network:/var/run/netns/$pod" "$image" "$id" \
    nc -ll -p 5003 -e /bin/cat >/dev/null
  # Peer -> container: `nc -l` in the container swallows what the peer sends.
  "${ctr[@]}" task exec --exec-id p2c "$id" sh -c 'nc -l -p 5001 > /dev/null' &
  local ex=$!
  p2c=$(peer_py send 10.203.0.2 5001 "$bytes")
  wait "$ex"
  # Container -> peer: the peer listens first, then the container connects and sends.
  peer_py recv 5002 "$bytes" > "$tmp/c2p" 2> "$tmp/c2p.err" &
  local rx=$!
  for _ in $(seq 100); do grep -q listening "$tmp/c2p.err" 2>/dev/null && break; sleep 0.05; done
  "${ctr[@]}" task exec --exec-id c2p "$id" sh -c "dd if=/dev/zero bs=65536 count=$((bytes / 65536)) 2>/dev/null | nc 10.203.0.1 5002"
  wait "$rx"
  c2p=$(cat "$tmp/c2p")
  rtt=$(peer_py rtt 10.203.0.2 5003 200)
  "${ctr[@]}" task kill -s KILL "$id" >/dev/null
  for _ in $(seq 100); do "${ctr[@]}" task ls | grep -q "^$id .*STOPPED" && break; sleep 0.1; done
  "${ctr[@]}" task delete "$id" >/dev/null
  "${ctr[@]}" container rm "$id" >/dev/null
  echo "$p2c $c2p $rtt"
}
declare -A col
for i in $(seq "$N"); do
  for r in runc joey; do
    read -r a b c < <(measure "io.containerd.$r.v2" "net-$r-$i")
    col[$r.p2c]+="$a "; col[$r.c2p]+="$b "; col[$r.rtt]+="$c "
  done
done
med() { tr ' ' '\n' <<<"${col[$1]}" | grep . | median; }
echo "joey bench-net: rounds=$N transfer=${MIB}MiB (one pod netns with a veth to a peer netns; runc and joey in turn)"
for r in runc joey; do
  echo "joey bench-net: $r peer->container_mbit median=$(med "$r.p2c") all=[${col[$r.p2c]% }]"
  echo "joey bench-net: $r container->peer_mbit median=$(med "$r.c2p") all=[${col[$r.c2p]% }]"
  echo "joey bench-net: $r rtt_64B_us median=$(med "$r.rtt") all=[${col[$r.rtt]% }]"
done
ratio() { awk -v a="$(med "joey.$1")" -v b="$(med "runc.$1")" 'BEGIN {printf "%.3f", a/b}'; }
echo "joey bench-net: ratio joey/runc peer->container=$(ratio p2c) container->peer=$(ratio c2p) rtt=$(ratio rtt)"
