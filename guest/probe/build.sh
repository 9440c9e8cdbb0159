#!/usr/bin/env bash
# Builds the probe guest: a freestanding ELF64 entered like a vmlinux (64-bit
# entry, rsi = boot_params) that checks the boot data from inside and reports
# on COM1. Takes < 1 s.
#
#   build.sh OUTPUT      build to the file OUTPUT
#   build.sh             build into ${JOEY_CACHE:-/var/cache/joey}/probe/<hash>/probe.elf
# Prints the output directory (cache mode) or file (OUTPUT mode) on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}
cflags=(-ffreestanding -nostdlib -static -fno-pic -no-pie -mno-red-zone -O2
  -mgeneral-regs-only -fno-stack-protector -fno-asynchronous-unwind-tables
  -fno-builtin -fno-delete-null-pointer-checks -Wall -Wextra -Werror -std=gnu11)
ldflags=(-Wl,-T,"$here/probe.ld" -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 -Wl,-z,noexecstack -Wl,--no-warn-rwx-segments)
srcs=("$here/start.S" "$here/probe.c")

build() {
  "$CC" "${cflags[@]}" "${ldflags[@]}" -o "$1" "${srcs[@]}"
}

if [ $# -ge 1 ]; then
  mkdir -p "$(dirname "$1")"
  build "$1.tmp" && mv "$1.tmp" "$1"
  echo "$1"
  exit 0
fi
cache=${JOEY_CACHE:-/var/cache/joey}
key=$( { "$CC" --version | head -1; cat "${srcs[@]}" "$here/probe.ld" "$here/build.sh"; } | sha256sum | cut -c1-16)
out="$cache/probe/$key"
if [ -f "$out/probe.elf" ]; then
  echo "build-probe: cached $out" >&2
  echo "$out"; exit 0
fi
mkdir -p "$out"
build "$out/probe.elf.tmp"
mv "$out/probe.elf.tmp" "$out/probe.elf"
echo "build-probe: built $out" >&2
echo "$out"
