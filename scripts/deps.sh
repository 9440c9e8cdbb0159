#!/usr/bin/env bash
# Installs the Debian packages joey needs to build and test, if any is missing.
set -euo pipefail
PKGS=(qemu-system-x86 linux-source-6.1 bc flex bison libelf-dev libssl-dev
      cpio gzip xz-utils make gcc busybox-static prometheus
      containerd runc bsdutils)  # bsdutils: script(1), a terminal for `ctr run -t` in tests
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
