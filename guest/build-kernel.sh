#!/usr/bin/env bash
# Builds the joey guest kernel from Debian's linux-source-6.1 with tinyconfig + guest/kernel.fragment,
# after applying guest/patches/*.patch (in name order) to the sources.
#   build-kernel.sh [EXTRA.fragment...]
# Extra fragments are merged on top, in order (guest/l1/kernel.fragment makes the nested test
# host's L1 kernel: scripts/nested-host.sh). The result is cached outside the git tree, keyed by a
# hash of its inputs (sources version, every fragment, every patch, this script):
#   $JOEY_CACHE/kernel/<hash>/{bzImage,vmlinux,config}
# Prints the path of the cache directory on stdout (last line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${JOEY_CACHE:-/var/cache/joey}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing (run scripts/deps.sh)" >&2; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
fragments=("$here/kernel.fragment")
for f in "$@"; do
  [ -f "$f" ] || { echo "build-kernel: no fragment $f" >&2; exit 1; }
  fragments+=("$(realpath "$f")")
done
patches=("$here"/patches/*.patch)
[ -e "${patches[0]}" ] || patches=()
key=$( { echo "$srcver"; cat "${fragments[@]}" "${patches[@]}" "$here/build-kernel.sh"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  echo "build-kernel: cached $out" >&2
  echo "$out"; exit 0
fi
work="$cache/kernel/build-$key"
rm -rf "$work"; mkdir -p "$work"
echo "build-kernel: unpacking $src_tar ($srcver)" >&2
tar -C "$work" -xf "$src_tar"
cd "$work/linux-source-6.1"
for p in "${patches[@]}"; do
  echo "build-kernel: applying $(basename "$p")" >&2
  patch -p1 --forward --batch --quiet < "$p" >&2 || { echo "build-kernel: patch $(basename "$p") does not apply to $srcver" >&2; exit 1; }
done
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >&2
make -s olddefconfig >&2
# Every fragment option must have survived olddefconfig, or the kernel is not what we think it is.
bad=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qx "$line" .config || { echo "build-kernel: option lost: $line" >&2; bad=1; };; esac
done < <(cat "${fragments[@]}")
[ $bad = 0 ] || exit 1
echo "build-kernel: compiling (make -j$(nproc) bzImage)" >&2
make -s -j"$(nproc)" bzImage >&2
mkdir -p "$out.tmp"
cp arch/x86/boot/bzImage vmlinux .config "$out.tmp/"
mv "$out.tmp/.config" "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
echo "build-kernel: built $out" >&2
echo "$out"
