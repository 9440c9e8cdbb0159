#!/usr/bin/env bash
# Builds an OCI image layout tarball from Debian's busybox-static: /bin/busybox (static) plus
# applet symlinks. Import with:
#   ctr image import --index-name docker.io/library/busybox:local OUT.tar
# Usage: make-busybox-image.sh OUT.tar [REF]   (REF default: docker.io/library/busybox:local)
set -euo pipefail
out=${1:?usage: make-busybox-image.sh OUT.tar [REF]}
ref=${2:-docker.io/library/busybox:local}
bb=/bin/busybox
[ -x "$bb" ] || { echo "make-busybox-image: $bb missing (apt-get install busybox-static)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/etc"
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
. "$(dirname "$0")/oci-layout.sh"
oci_layout_tar "$root" '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"}' \
  "$ref" "$out" "$work"
echo "$out"
