# Sourced by the benchmark scripts: a private containerd 1.6 (own root, state, sockets and joey
# state dir under $tmp, joey's shim first in its PATH, the locally built busybox image imported).
# Needs: tmp (a fresh directory), root (the work tree), JOEY_SHIM, JOEY_KERNEL, JOEY_INITRD.
# Sets: ctd_pid, ctr (the ctr command array), image. The caller's EXIT trap calls stop_containerd.
: "${JOEY_SHIM:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}" "${tmp:?}" "${root:?}"
shim_dir=$(cd "$(dirname "$JOEY_SHIM")" && pwd)
[ -x "$shim_dir/containerd-shim-joey-v2" ] || { echo "$0: $shim_dir/containerd-shim-joey-v2 missing (make build)" >&2; exit 1; }
ctd_pid=""
stop_containerd() {
  if [ -n "$ctd_pid" ]; then kill "$ctd_pid" 2>/dev/null || true; wait "$ctd_pid" 2>/dev/null || true; fi
}
cat > "$tmp/containerd.toml" <<EOT
version = 2
root = "$tmp/root"
state = "$tmp/state"
[grpc]
  address = "$tmp/c.sock"
[ttrpc]
  address = "$tmp/c.sock.ttrpc"
EOT
cat > "$tmp/joey.toml" <<EOT
[hypervisor]
kind = "qemu"
kernel = "$JOEY_KERNEL"
initrd = "$JOEY_INITRD"
[runtime]
state_dir = "$tmp/joey-state"
EOT
JOEY_CONFIG="$tmp/joey.toml" PATH="$shim_dir:$PATH" containerd --config "$tmp/containerd.toml" > "$tmp/containerd.log" 2>&1 &
ctd_pid=$!
ctr=(ctr -a "$tmp/c.sock")
for _ in $(seq 200); do "${ctr[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"${ctr[@]}" version >/dev/null 2>&1 || { echo "$0: containerd did not start:" >&2; cat "$tmp/containerd.log" >&2; exit 1; }
image=docker.io/library/busybox:local
bash "$root/scripts/make-busybox-image.sh" "$tmp/busybox.tar" >/dev/null
# The manifest's ref.name names the image. No --index-name: with it ctr 1.6 fails before unpacking.
"${ctr[@]}" image import "$tmp/busybox.tar" >/dev/null
"${ctr[@]}" image ls -q | grep -qx "$image" || { echo "$0: image import failed" >&2; exit 1; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
