#!/bin/sh
# PID 1 of the nested test host's L1 (started by scripts/nested-host.sh; docs/testing.md).
# The kernel mounted the host's root read-only over virtio-9p (tag "hostroot") and runs this
# script from it with the host's /bin/sh. It:
#   stage 1  mounts the host-side exchange directory (9p tag "joeyio"), puts a writable root in
#            place (overlay: the host root under a tmpfs; /tmp is the host's through it), fresh
#            /proc /sys /dev /run, and pivots into it;
#   stage 2  runs the KVM sanity check (kvm-probe under a deadline; on a hang or failure it says so
#            in the exchange directory and reboots, and the host boots L1 once more), then runs the
#            command (joeyio/cmd.sh, bash) with stdout/stderr on the virtio-serial ports
#            "joey.stdout"/"joey.stderr" and writes its exit status to joeyio/rc, or, without a
#            command, a login shell on the console; then reboots (the kernel has reboot=t, QEMU
#            -no-reboot exits).
# Progress lines go to the console (the host keeps them in the L1 log).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
io=/run/nested/io
say() { echo "nested-init: [$(cut -d' ' -f1 /proc/uptime 2>/dev/null)] $*"; }
# Never returns: PID 1 must not exit (the kernel would panic).
reboot_now() {
  sync
  busybox reboot -f
  sleep 5
  echo b > /proc/sysrq-trigger 2>/dev/null
  while :; do sleep 60; done
}

stage1() {
  # The kernel mounted devtmpfs on /dev (CONFIG_DEVTMPFS_MOUNT).
  exec </dev/console >/dev/console 2>&1
  mount -t proc proc /proc
  say "stage 1: writable root"
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir -p /run/l1/u /run/l1/w /run/l1/root /run/l1/io
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none joeyio /run/l1/io || return 1
  mount -t overlay overlay -o lowerdir=/,upperdir=/run/l1/u,workdir=/run/l1/w /run/l1/root || return 1
  new=/run/l1/root
  mount -t tmpfs -o mode=0755 tmpfs "$new/run" || return 1
  mkdir -p "$new$io"
  mount --move /run/l1/io "$new$io"
  mount --move /dev "$new/dev"
  mount -t proc proc "$new/proc"
  mount -t sysfs sysfs "$new/sys"
  mount -t cgroup2 cgroup2 "$new/sys/fs/cgroup" 2>/dev/null
  # /tmp stays the host's (through the overlay, writable): a work tree under /tmp (CI clones
  # there) must be visible in L1.
  mkdir -p "$new/dev/pts" "$new/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$new/dev/pts"
  mount -t tmpfs -o mode=1777 tmpfs "$new/dev/shm"
  mkdir -p "$new/.l1-old"
  cd "$new" || return 1
  pivot_root . .l1-old || return 1
  umount -l /.l1-old
  rmdir /.l1-old
  exec /bin/sh "$0" stage2
}

# Prints the /dev node of the virtio-serial port named $1.
vport() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
  done
  return 1
}

stage2() {
  . "$io/env"
  ip link set lo up
  hostname nested-l1
  # The KVM sanity check: a tiny KVM_RUN that must finish within 20 s.
  "$L1_PROBE" run > /tmp/kvm-probe.out 2>&1 &
  p=$!
  i=0
  while kill -0 "$p" 2>/dev/null && [ "$i" -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$p" 2>/dev/null; then
    say "KVM sanity check: KVM_RUN hangs after 20 s"
    echo hang > "$io/kvm-probe"
    reboot_now
  fi
  if ! wait "$p"; then
    say "KVM sanity check failed: $(cat /tmp/kvm-probe.out)"
    echo "failed: $(cat /tmp/kvm-probe.out)" > "$io/kvm-probe"
    reboot_now
  fi
  cat /tmp/kvm-probe.out
  echo ok > "$io/kvm-probe"
  if [ -f "$io/cmd.sh" ]; then
    out=$(vport joey.stdout) && err=$(vport joey.stderr) || { say "no joey.stdout/joey.stderr port"; reboot_now; }
    say "running the command"
    setsid bash "$io/cmd.sh" </dev/null >"$out" 2>"$err"
    echo "$?" > "$io/rc"
  else
    say "interactive shell (exit or ^D ends L1)"
    setsid -c bash -c '. "$0"; exec bash -i' "$io/env.sh"
    echo "$?" > "$io/rc"
  fi
  reboot_now
}

case "${1:-stage1}" in
  stage2) stage2 ;;
  *)
    stage1
    say "stage 1 failed"
    reboot_now
    ;;
esac
