#!/usr/bin/env bash
# joey benchmarks (numbers, not pass/fail): medians over N runs of
#   - VM start -> agent ready (as reported by `joeyctl run --timings`)
#   - a whole `joeyctl run -- true` (wall clock, process start to exit)
# Needs JOEYCTL, JOEY_KERNEL, JOEY_INITRD (the Makefile's `bench` target sets them).
set -euo pipefail
N=${N:-10}
: "${JOEYCTL:?}" "${JOEY_KERNEL:?}" "${JOEY_INITRD:?}"
tmp=$(mktemp -d /tmp/joey-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/config.toml" <<EOT
[hypervisor]
kernel = "$JOEY_KERNEL"
initrd = "$JOEY_INITRD"
[runtime]
state_dir = "$tmp/state"
EOT
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ready=(); whole=(); accel=""
for i in $(seq "$N"); do
  t0=$(date +%s%N)
  err=$("$JOEYCTL" run --config "$tmp/config.toml" --timings -- true 2>&1 >/dev/null)
  t1=$(date +%s%N)
  whole+=($(( (t1 - t0) / 1000000 )))
  line=$(grep '^joey timings: hypervisor=' <<<"$err")
  ready+=($(sed -E 's/.*vm_start_to_agent_ready_ms=([0-9]+).*/\1/' <<<"$line"))
  accel=$(sed -E 's/.*hypervisor=([a-z]+) accel=([a-z]+).*/\1 \2/' <<<"$line")
done
# Baseline measured in the same run: bare QEMU booting the same kernel into a busybox /init
# that reboots at once (no agent, no vsock): the floor joey's boot is compared with.
mkdir -p "$tmp/bb/bin"
cp /bin/busybox "$tmp/bb/bin/busybox"
ln -s busybox "$tmp/bb/bin/sh"; ln -s busybox "$tmp/bb/bin/reboot"
printf '#!/bin/sh\nreboot -f\n' > "$tmp/bb/init"; chmod +x "$tmp/bb/init"
(cd "$tmp/bb" && find . | cpio -o -H newc 2>/dev/null | gzip > "$tmp/bb.img")
accel_flag=$(cut -d' ' -f2 <<<"$accel")
cpu=max; [ "$accel_flag" = kvm ] && cpu=host
qemu=()
for i in $(seq "$N"); do
  t0=$(date +%s%N)
  qemu-system-x86_64 -M microvm,isa-serial=on,rtc=on,acpi=off,memory-backend=mem \
    -object memory-backend-memfd,id=mem,size=256M,share=on -global virtio-mmio.force-legacy=false \
    -accel "$accel_flag" -cpu "$cpu" -m 256M -smp 1 -nodefaults -no-user-config -display none -no-reboot \
    -serial null -kernel "$JOEY_KERNEL" -initrd "$tmp/bb.img" -append "console=ttyS0 reboot=t panic=-1 quiet"
  t1=$(date +%s%N)
  qemu+=($(( (t1 - t0) / 1000000 )))
done
reason=$(grep '^joey timings: accel reason:' <<<"$err" | sed 's/^joey timings: accel reason: //')
echo "joey bench: runs=$N hypervisor/accel=$accel"
echo "joey bench: accel reason: $reason"
echo "joey bench: vm_start_to_agent_ready_ms median=$(printf '%s\n' "${ready[@]}" | median) all=[${ready[*]}]"
mw=$(printf '%s\n' "${whole[@]}" | median)
mq=$(printf '%s\n' "${qemu[@]}" | median)
echo "joey bench: joeyctl_run_true_ms      median=$mw all=[${whole[*]}]"
echo "joey bench: bare_qemu_boot_reboot_ms median=$mq all=[${qemu[*]}] (same kernel, busybox /init that reboots)"
echo "joey bench: ratio joeyctl_run_true / bare_qemu_boot = $(awk -v a="$mw" -v b="$mq" 'BEGIN {printf "%.2f", a/b}')"
# The built-in VMM alone (`joeyctl boot`, like `firecracker --no-api --config-file`): the probe
# guest (guest/probe/) under this host's KVM, whole process (wall clock, peak RSS from --timings).
probe=$(bash "$(dirname "$0")/../guest/probe/build.sh")/probe.elf
bw=(); brss=()
for i in $(seq "$N"); do
  t0=$(date +%s%N)
  err=$("$JOEYCTL" boot --kernel "$probe" --cmdline "probe.mem_mib=128 probe.cpus=1" --timings 2>&1 >/dev/null) \
    || { echo "bench: joeyctl boot of the probe failed: $err" >&2; exit 1; }
  t1=$(date +%s%N)
  bw+=($(( (t1 - t0) / 1000000 )))
  brss+=($(sed -nE 's/.*peak RSS ([0-9]+) KiB.*/\1/p' <<<"$err"))
done
echo "joey bench: joeyctl_boot_probe_ms     median=$(printf '%s\n' "${bw[@]}" | median) all=[${bw[*]}] (built-in VMM, probe guest, 1 vCPU, 128 MiB)"
echo "joey bench: joeyctl_boot_probe_rss_kib median=$(printf '%s\n' "${brss[@]}" | median) all=[${brss[*]}]"
