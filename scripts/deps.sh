#!/usr/bin/env bash
# Installs the Debian packages joey needs to build and test, if any is missing, and the
# joey-qemu system user (QEMU's user in its jail, docs/security.md).
set -euo pipefail
# The one thing `make` cannot install: a Rust toolchain of the workspace's rust-version.
root=$(cd "$(dirname "$0")/.." && pwd)
need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$root/Cargo.toml")
have=$(cargo --version 2>/dev/null | awk '{print $2}') || true
if [ -z "$have" ]; then
  echo "deps: cargo not found: install a Rust toolchain >= $need (e.g. rustup) and put cargo on PATH" >&2
  exit 1
fi
if [ "$(printf '%s\n%s\n' "$need" "${have%%-*}" | sort -V | head -n1)" != "$need" ]; then
  echo "deps: cargo $have is too old: the workspace needs Rust >= $need" >&2
  exit 1
fi
PKGS=(qemu-system-x86 linux-source-6.1 bc flex bison libelf-dev libssl-dev
      cpio gzip xz-utils file make gcc binutils patch busybox-static prometheus
      containerd runc bsdutils iproute2
      containernetworking-plugins protobuf-compiler python3 g++)
# bsdutils: script(1), a terminal for `ctr run -t` in tests; iproute2: ip/tc for the network test
# fixtures; containernetworking-plugins: CNI plugins (/usr/lib/cni) for the CNI network tests and
# the private CRI containerd (scripts/cri-containerd.sh); protobuf-compiler: protoc, which the
# k8s-cri crate needs to build; python3: the peer side of scripts/bench-net.sh; file: the
# initramfs build checks what it packs (guest/build-initrd.sh); g++: libFuzzer (C++), built by
# the fuzz targets' libfuzzer-sys (scripts/fuzz.sh).
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The unprivileged user QEMU runs as in its jail (`security.qemu_user`, docs/security.md): a
# system user with its own group, no home, no shell, no password.
if ! getent passwd joey-qemu >/dev/null; then
  echo "==> deps: creating the system user joey-qemu"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "joey QEMU (its jail)" joey-qemu
fi
