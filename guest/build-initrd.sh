#!/usr/bin/env bash
# Builds the joey guest initramfs (an uncompressed cpio, newc format):
#   /init          the static joey-agent (PID 1), stripped
#   /bin/busybox   Debian's busybox-static, with applet symlinks (busybox --list-full)
#   /dev/console   character device 5:1 (so the kernel can give init a console)
#   empty /proc /sys /sys/fs/cgroup /dev /run /tmp /etc /root /var, minimal /etc/passwd, /etc/group
#
# Usage: guest/build-initrd.sh [AGENT_BINARY]
#   AGENT_BINARY defaults to target/x86_64-unknown-linux-gnu/release/joey-agent (repo root);
#   build it with:
#     RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
#       cargo build --release -p joey-agent --target x86_64-unknown-linux-gnu
#
# The result is cached outside the git tree, keyed by a hash of its inputs (agent binary,
# /bin/busybox, this script):
#   ${JOEY_CACHE:-/var/cache/joey}/initrd/<hash>/initrd.img
# Prints the path of the cache directory on stdout (last line); logs go to stderr.
# The archive is reproducible: sorted entries, mtime 0, owner root:root, renumbered inodes.
# Uncompressed on purpose: gunzip in the guest costs ~226 ms of every boot under TCG, the extra
# bytes cost the host only a read of a cached file (docs/performance.md).
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
self="$here/$(basename "$0")"
cache=${JOEY_CACHE:-/var/cache/joey}
busybox=/bin/busybox
agent=${1:-target/x86_64-unknown-linux-gnu/release/joey-agent}
case "$agent" in /*) ;; *) [ -e "$agent" ] || agent="$repo/$agent" ;; esac

log() { echo "build-initrd: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$agent" ] || die "agent binary $agent not found; build it with:
  RUSTFLAGS=\"-C target-feature=+crt-static -C relocation-model=static\" cargo build --release -p joey-agent --target x86_64-unknown-linux-gnu"
[ -x "$busybox" ] || die "$busybox missing (apt-get install busybox-static)"

key=$( { sha256sum < "$agent"; sha256sum < "$busybox"; sha256sum < "$self"; } | sha256sum | cut -c1-16)
out="$cache/initrd/$key"
if [ -f "$out/initrd.img" ]; then
  log "cached $out"
  echo "$out"
  exit 0
fi

# The guest has no dynamic loader or libraries: both binaries must be static.
require_static() {
  local bin=$1 what=$2 desc
  desc=$(file -bL "$bin")
  case "$desc" in
    *ELF\ 64-bit*x86-64*) ;;
    *) die "$what ($bin) is not an x86-64 ELF executable: $desc" ;;
  esac
  case "$desc" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) die "$what ($bin) is dynamically linked ($desc); build it static, e.g. RUSTFLAGS=\"-C target-feature=+crt-static\"" ;;
  esac
  if ldd "$bin" 2>&1 | grep -q '=>'; then
    die "$what ($bin) needs shared libraries: $(ldd "$bin" 2>&1 | tr '\n' ' ')"
  fi
}
require_static "$agent" "agent"
require_static "$busybox" "busybox"

mkdir -p "$cache/initrd"
work=$(mktemp -d "$cache/initrd/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
log "assembling $root"

for d in proc sys sys/fs/cgroup dev run tmp etc root var bin sbin usr/bin usr/sbin; do
  mkdir -p "$root/$d"
done
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
install -m 0755 "$agent" "$root/init"
# No symbols in the guest: a smaller image and fewer pages for the kernel to unpack.
strip --strip-all "$root/init"
install -m 0755 "$busybox" "$root/bin/busybox"
while IFS= read -r applet; do
  case "$applet" in
    "" | bin/busybox | init | linuxrc) continue ;; # never shadow /init; linuxrc is legacy
  esac
  [ -e "$root/$applet" ] || [ -L "$root/$applet" ] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
chmod 0644 "$root/etc/passwd" "$root/etc/group"

# Fixed timestamps for every entry (symlinks included).
find "$root" -exec touch -h -d @0 {} +

# newc header of one entry without data (for the device node, which needs no root to describe).
newc_entry() { # name mode rdevmajor rdevminor ino
  local name=$1 mode=$2 maj=$3 min=$4 ino=$5
  local namesize=$(( ${#name} + 1 ))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    "$ino" "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0
  printf '%s\0' "$name"
  head -c $(( (4 - (110 + namesize) % 4) % 4 )) /dev/zero
}

img="$work/initrd.img"
{
  # Main archive: the tree, sorted, owner root, inodes renumbered, no device numbers.
  (cd "$root" && find . -mindepth 1 | sed 's|^\./||' | sort |
    cpio --quiet -o -H newc --reproducible -R 0:0)
  # Second archive (the kernel unpacks concatenated archives): /dev/console, 0600, c 5:1.
  newc_entry dev/console $(( 8#020600 )) 5 1 1
  newc_entry 'TRAILER!!!' 0 0 0 0
} > "$img"

# Sanity checks on the result.
file -b "$img" | grep -q 'cpio archive' || die "$img is not a cpio archive: $(file -b "$img")"
listing=$(cpio -t --quiet < "$img")
grep -qx 'init' <<<"$listing" || die "/init missing from $img"
grep -qx 'bin/busybox' <<<"$listing" || die "/bin/busybox missing from $img"
grep -qx 'bin/sh' <<<"$listing" || die "/bin/sh missing from $img"

mkdir -p "$work/out"
mv "$img" "$work/out/initrd.img"
printf '%s\n' "$listing" dev/console > "$work/out/contents.txt"
if ! mv -T "$work/out" "$out" 2>/dev/null; then
  # Another run finished the same key first; its result is identical.
  [ -f "$out/initrd.img" ] || die "could not install $out"
fi
log "built $out ($(stat -c %s "$out/initrd.img") bytes, $(wc -l < "$out/contents.txt") entries)"
echo "$out"
