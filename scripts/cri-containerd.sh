#!/usr/bin/env bash
# A private containerd 1.6 with its CRI plugin (Kubernetes CRI v1) for joey's CRI tests and demo.
#
#   cri-containerd.sh start DIR   start it; DIR (created, must not exist) holds everything of it
#   cri-containerd.sh env DIR     print its settings as shell assignments (CRI_ADDRESS=..., ...)
#   cri-containerd.sh stop DIR    stop it and remove everything it made (pods, processes, mounts,
#                                 network namespaces, CNI cache entries, DIR itself)
#
# What `start` sets up (docs/cri.md):
# - a network namespace of its own (/var/run/netns/joey-cri-<suffix>, lo up); containerd runs in it
#   through `nsenter --net=` (not `ip netns exec`, which remounts /sys and breaks runc's cgroup
#   lookup), so the CNI bridge, its subnet (10.88.0.0/24) and the iptables rules of the portmap
#   and firewall plugins exist only there;
# - containerd with its own root, state, gRPC socket DIR/c.sock (CRI and containerd API), and
#   runtime handlers `runc` (io.containerd.runc.v2, own runc root) and `joey` (io.containerd.joey.v2,
#   pod annotations io.joey.* passed to the shim), `restrict_oom_score_adj = true`;
# - CNI: Debian's plugins in /usr/lib/cni, one conflist bridge(host-local) + portmap + firewall
#   (containerd adds the loopback network itself); host-local keeps its allocations under DIR;
# - images, built locally and imported into namespace k8s.io (nothing is pulled): the sandbox image
#   localhost/joey/pause:1 (scripts/make-pause-image.sh) and docker.io/library/busybox:local
#   (scripts/make-busybox-image.sh);
# - the shim: containerd-shim-joey-v2 from JOEY_SHIM (default target/release/) first in
#   containerd's PATH; its config is JOEY_CONFIG if set, else DIR/joey.toml written here with
#   hypervisor.kernel/initrd from JOEY_KERNEL/JOEY_INITRD (if set) and a short state dir
#   /run/jc.XXXXXX (vhost-user socket paths must fit the unix socket limit).
# Needs root, containerd, runc, iproute2, util-linux (nsenter), containernetworking-plugins, gcc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
SANDBOX_IMAGE=localhost/joey/pause:1
BUSYBOX_IMAGE=docker.io/library/busybox:local
SUBNET=10.88.0.0/24

usage() { echo "usage: cri-containerd.sh start|env|stop DIR" >&2; exit 2; }
die() { echo "cri-containerd: $*" >&2; exit 1; }

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage
case "$dir" in /*) ;; *) dir=$PWD/$dir ;; esac

# The name every per-instance object carries: netns, CNI network (CNI cache entries start with it).
instance_name() { echo "joey-cri-$(basename "$1" | tr -c 'a-zA-Z0-9\n' '-' | tail -c 13)"; }

write_configs() {
  local d=$1 name=$2 state=$3
  mkdir -p "$d/cni/net.d" "$d/cni/ipam" "$d/runc" "$d/pods"
  cat > "$d/containerd.toml" <<EOT
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/c.sock"
[ttrpc]
  address = "$d/c.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$d/runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.joey]
      runtime_type = "io.containerd.joey.v2"
      pod_annotations = ["io.joey.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/net.d"
    max_conf_num = 1
EOT
  cat > "$d/cni/net.d/10-joey-cri.conflist" <<EOT
{
  "cniVersion": "1.0.0",
  "name": "$name",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni-joey0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$d/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall"}
  ]
}
EOT
  if [ -z "${JOEY_CONFIG:-}" ]; then
    {
      echo "[hypervisor]"
      echo "kind = \"${JOEY_HYPERVISOR:-qemu}\""
      [ -n "${JOEY_KERNEL:-}" ] && echo "kernel = \"$JOEY_KERNEL\""
      [ -n "${JOEY_INITRD:-}" ] && echo "initrd = \"$JOEY_INITRD\""
      echo
      echo "[runtime]"
      echo "state_dir = \"$state\""
    } > "$d/joey.toml"
  fi
}

start() {
  local d=$1
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, mounts)"
  [ -e "$d" ] && die "$d exists: pick a new directory (stop the old instance with: $0 stop $d)"
  local b
  for b in containerd ctr runc nsenter ip gcc; do
    command -v "$b" >/dev/null || die "$b missing: run scripts/deps.sh"
  done
  for b in bridge host-local portmap firewall loopback; do
    [ -x "/usr/lib/cni/$b" ] || die "/usr/lib/cni/$b missing: apt-get install containernetworking-plugins (scripts/deps.sh)"
  done
  local shim=${JOEY_SHIM:-$root/target/release/containerd-shim-joey-v2}
  [ -x "$shim" ] || die "no shim at $shim: build it (make build) or set JOEY_SHIM"
  local name state
  name=$(instance_name "$d")
  mkdir -p "$d"
  # Everything below is undone by `stop`, also when start fails half way.
  trap 'stop "$d" >/dev/null 2>&1 || true' EXIT
  state=$(mktemp -d /run/jc.XXXXXX)
  local cfg=${JOEY_CONFIG:-$d/joey.toml}
  {
    echo "CRI_ADDRESS=$d/c.sock"
    echo "CRI_NETNS=/var/run/netns/$name"
    echo "CRI_NETWORK=$name"
    echo "CRI_LOG=$d/containerd.log"
    echo "CRI_POD_LOGS=$d/pods"
    echo "CRI_SANDBOX_IMAGE=$SANDBOX_IMAGE"
    echo "CRI_BUSYBOX_IMAGE=$BUSYBOX_IMAGE"
    echo "JOEY_CONFIG=$cfg"
    echo "JOEY_STATE_DIR=$state"
  } > "$d/env"
  write_configs "$d" "$name" "$state"
  ip netns add "$name"
  ip -n "$name" link set lo up
  # setsid: containerd and the shims it starts leave our session (a terminal's ^C stays ours).
  PATH="$(dirname "$shim"):$PATH" JOEY_CONFIG="$cfg" setsid nsenter --net="/var/run/netns/$name" \
    containerd --config "$d/containerd.toml" </dev/null >"$d/containerd.log" 2>&1 &
  echo $! > "$d/containerd.pid"
  local i
  for i in $(seq 200); do
    ctr -a "$d/c.sock" version >/dev/null 2>&1 && break
    kill -0 "$(cat "$d/containerd.pid")" 2>/dev/null || { tail -n 20 "$d/containerd.log" >&2; die "containerd exited at start"; }
    sleep 0.1
  done
  ctr -a "$d/c.sock" version >/dev/null 2>&1 || { tail -n 20 "$d/containerd.log" >&2; die "containerd did not answer within 20 s"; }
  bash "$here/make-pause-image.sh" "$d/pause.tar" "$SANDBOX_IMAGE" >/dev/null
  bash "$here/make-busybox-image.sh" "$d/busybox.tar" "$BUSYBOX_IMAGE" >/dev/null
  local img
  for img in pause busybox; do
    ctr -a "$d/c.sock" -n k8s.io image import "$d/$img.tar" >/dev/null || die "import of the $img image failed"
    rm -f "$d/$img.tar"
  done
  local images
  images=$(ctr -a "$d/c.sock" -n k8s.io image ls -q)
  grep -qx "$SANDBOX_IMAGE" <<<"$images" || die "sandbox image $SANDBOX_IMAGE not listed after import: $images"
  trap - EXIT
  cat "$d/env"
}

# Pids of processes whose command line mentions $1, but not this script's own (its subshells).
# Bash builtins only: a forked reader would list itself.
pids_mentioning() {
  local p args
  for p in /proc/[0-9]*; do
    { mapfile -d '' args < "$p/cmdline"; } 2>/dev/null || continue
    [[ "${args[*]}" == *"$1"* && "${args[*]}" != *cri-containerd.sh* ]] && echo "${p#/proc/}"
  done
  return 0
}

stop() {
  local d=$1
  [ -d "$d" ] || die "$d: no such instance"
  local name state="" pid="" ctr="ctr -a $d/c.sock -n k8s.io" i id
  name=$(instance_name "$d")
  [ -f "$d/env" ] && state=$(sed -n 's/^JOEY_STATE_DIR=//p' "$d/env")
  [ -f "$d/containerd.pid" ] && pid=$(cat "$d/containerd.pid")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    # Containers CRI still knows: killed and deleted through containerd (its shims clean up their
    # VMs and mounts); pods' network teardown is CRI's (StopPodSandbox), done by the client.
    for id in $($ctr task ls -q 2>/dev/null); do
      timeout 10 $ctr task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      timeout 20 $ctr task delete --force "$id" >/dev/null 2>&1 || true
    done
    for id in $($ctr container ls -q 2>/dev/null); do
      timeout 10 $ctr container rm "$id" >/dev/null 2>&1 || true
      # containerd's own loopback network of a pod whose StopPodSandbox never came.
      rm -f "/var/lib/cni/results/cni-loopback-$id-lo"
    done
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # Whatever still mentions the instance (a shim or VM whose delete never came) goes.
  local left
  for i in $(seq 50); do
    left=$( { pids_mentioning "$d"; [ -n "$state" ] && pids_mentioning "$state"; } | sort -u)
    [ -z "$left" ] && break
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  # Mounts under the instance (rootfs overlays, pinned pod netns), deepest first.
  awk -v d="$d" -v s="${state:-/nonexistent}" '$5 ~ "^"d"/" || $5 ~ "^"s"/" {print $5}' /proc/self/mountinfo \
    | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  ip netns del "$name" 2>/dev/null || true
  # CNI's result cache of this instance's network (libcni keeps it under /var/lib/cni).
  rm -f /var/lib/cni/results/"$name"-* 2>/dev/null || true
  [ -n "$state" ] && rm -rf "$state"
  rm -rf "$d"
}

case "$cmd" in
  start) start "$dir" ;;
  env) [ -f "$dir/env" ] || die "$dir: no such instance"; cat "$dir/env" ;;
  stop) stop "$dir" ;;
  *) usage ;;
esac
