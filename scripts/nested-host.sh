#!/usr/bin/env bash
# The nested test host: a Linux (L1) with kvm_amd inside QEMU-TCG, where /dev/kvm runs unmodified
# Linux guests, so that joey's built-in VMM boots its real guest here (this machine's own KVM is
# PVM-type). See docs/testing.md.
#
#   scripts/nested-host.sh [-- CMD ARGS...]
#
# Boots L1 (kernel: guest/build-kernel.sh guest/l1/kernel.fragment, cached) with the host's root
# shared read-only over virtio-9p under a tmpfs overlay (so every host path, the work tree,
# target/release and build/guest included, is the same in L1 and writable there; writes stay in
# L1; /tmp too, so a work tree under /tmp works), a fresh tmpfs /run, and runs CMD as root in L1 with cwd = this directory and this
# environment. CMD's stdout and stderr come out here as its own; the exit status is CMD's. Without
# CMD: an interactive shell on the console (exit ends L1; ^A x kills it).
# Before CMD, L1 checks that KVM_RUN works (guest/l1/kvm-probe.c); if that hangs, or L1 does not
# come up, L1 is booted once more.
#
# Exit status: CMD's; 124 when NESTED_TIMEOUT passed (L1 killed); 125 when the nested host could
# not run CMD (the reason and the end of L1's console log on stderr).
# Environment:
#   NESTED_TIMEOUT       seconds for the whole run, boots included (default 3600)
#   NESTED_BOOT_TIMEOUT  seconds from QEMU start to a passed KVM check (default 120)
#   NESTED_MEM           L1 memory in MiB (default 4096; QEMU allocates it as L1 touches it)
#   NESTED_CPUS          L1 vCPUs (default 2)
#   NESTED_LOG           keep L1's console log at this path (default: a temporary file, shown on
#                        failure, then removed)
#   NESTED_VERBOSE=1     copy L1's console log to stderr as it comes
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${JOEY_CACHE:-/var/cache/joey}
timeout=${NESTED_TIMEOUT:-3600}
boot_timeout=${NESTED_BOOT_TIMEOUT:-120}
mem=${NESTED_MEM:-4096}
cpus=${NESTED_CPUS:-2}
QEMU=${QEMU:-qemu-system-x86_64}

die() {
  echo "nested-host: $*" >&2
  exit 125
}
[ "${1:-}" = -- ] && shift
if [ $# = 0 ]; then interactive=1; else interactive=0; fi
for v in timeout boot_timeout mem cpus; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "${v^^} must be a positive integer, not '${!v}'"
done
command -v "$QEMU" >/dev/null || die "$QEMU not found (scripts/deps.sh installs qemu-system-x86)"

io=$(mktemp -d "${TMPDIR:-/tmp}/joey-nested.XXXXXX") || die "mktemp failed"
log=${NESTED_LOG:-$io/console.log}
qpid=
tailpid=
catpids=()
cleanup() {
  [ -n "$qpid" ] && kill -KILL "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
  [ -n "$tailpid" ] && kill "$tailpid" 2>/dev/null && wait "$tailpid" 2>/dev/null
  for p in "${catpids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$io"
}
trap cleanup EXIT
exec 3<&0
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The L1 kernel (cached by input hash; a build takes ~6 min on 2 cores: its steps are shown).
klog=$io/kernel-build.log
bash "$repo/guest/build-kernel.sh" "$repo/guest/l1/kernel.fragment" 2>&1 >"$klog.out" | tee "$klog" |
  grep --line-buffered -E '^build-kernel: (unpacking|compiling|built)' | sed -u 's/^build-kernel/nested-host: L1 kernel/' >&2
if [ "${PIPESTATUS[0]}" != 0 ]; then
  tail -n 30 "$klog" >&2
  die "building the L1 kernel failed"
fi
kdir=$(tail -n 1 "$klog.out")
# The KVM probe, built once per source (gcc; < 1 s).
probe_key=$( { gcc --version | head -n 1; cat "$repo/guest/l1/kvm-probe.c"; } | sha256sum | cut -c1-16)
probe="$cache/l1/$probe_key/kvm-probe"
if [ ! -x "$probe" ]; then
  mkdir -p "${probe%/*}" &&
    gcc -O2 -Wall -Wextra -Werror -o "$probe.tmp.$$" "$repo/guest/l1/kvm-probe.c" &&
    mv "$probe.tmp.$$" "$probe" || die "building guest/l1/kvm-probe.c failed"
fi
# QEMU-TCG gives L1 the host's TSC; L1 must be told its rate or, when its own calibration fails
# (~15% of boots), KVM_RUN spins forever in KVM's clock update. And L1 must trust it
# (tsc=reliable): its TSC sync check between vCPUs fails under TCG, L1 then falls back to the
# jiffies clocksource (4 ms resolution) and its KVM to an unstable guest clock.
tsc_khz=$("$probe" tsc-khz) && [[ $tsc_khz =~ ^[1-9][0-9]*$ ]] || die "cannot measure the host's TSC rate"


# What L1's init reads: the probe, and CMD with this environment and directory.
printf 'L1_PROBE=%q\n' "$probe" > "$io/env"
{
  while IFS= read -r v; do
    case "$v" in
      PWD | OLDPWD | SHLVL | _ | TMPDIR | XDG_RUNTIME_DIR | BASH_* | NESTED_*) continue ;;
    esac
    printf 'export %s=%q\n' "$v" "${!v}"
  done < <(compgen -e)
  # Tests can tell they run in L1 (tests/src/lib.rs: in_nested_host).
  echo 'export JOEY_NESTED_L1=1'
  printf 'cd -- %q || exit 125\n' "$PWD"
} > "$io/env.sh"
if [ "$interactive" = 0 ]; then
  { printf '. %q\nexec' /run/nested/io/env.sh; printf ' %q' "$@"; echo; } > "$io/cmd.sh"
fi

deadline=$((SECONDS + timeout))
# One boot of L1. Returns 0 when L1 ran CMD (rc in $io/rc), 1 when it should be booted again,
# 2 when it failed for good, 124 past the deadline.
boot() {
  rm -f "$io/kvm-probe" "$io/rc" "$io/qemu.err"
  : > "$log"
  local args=(-M microvm,acpi=off,rtc=on -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem"
    -nodefaults -no-user-config -nographic -no-reboot
    -kernel "$kdir/vmlinux"
    -append "console=ttyS0 reboot=t panic=-1 tsc_early_khz=$tsc_khz tsc=reliable root=hostroot rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro init=$repo/guest/l1/init.sh"
    -fsdev local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap
    -device virtio-9p-device,fsdev=hostroot,mount_tag=hostroot
    -fsdev local,id=joeyio,path="$io",security_model=none
    -device virtio-9p-device,fsdev=joeyio,mount_tag=joeyio)
  if [ "$interactive" = 1 ]; then
    args+=(-serial mon:stdio)
    # A background command of a script gets /dev/null as stdin unless it is redirected.
    "$QEMU" "${args[@]}" <&3 2>"$io/qemu.err" &
    qpid=$!
  else
    # CMD's stdout/stderr: virtio-serial ports into FIFOs drained to ours (whatever they are).
    mkfifo "$io/out" "$io/err" || return 2
    cat "$io/out" &
    catpids+=($!)
    cat "$io/err" >&2 &
    catpids+=($!)
    args+=(-serial "file:$log" -device virtio-serial-device
      -chardev file,id=out,path="$io/out" -device virtserialport,chardev=out,name=joey.stdout
      -chardev file,id=err,path="$io/err" -device virtserialport,chardev=err,name=joey.stderr)
    "$QEMU" "${args[@]}" </dev/null >"$io/qemu.err" 2>&1 &
    qpid=$!
    if [ "${NESTED_VERBOSE:-0}" = 1 ]; then
      tail -n +1 -f "$log" >&2 &
      tailpid=$!
    fi
  fi
  local boot_deadline=$((SECONDS + boot_timeout)) why=
  while kill -0 "$qpid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      why="the run did not finish within NESTED_TIMEOUT=$timeout s"
      break
    fi
    if [ ! -e "$io/kvm-probe" ] && [ "$SECONDS" -ge "$boot_deadline" ]; then
      why="L1 did not pass its KVM check within NESTED_BOOT_TIMEOUT=$boot_timeout s"
      break
    fi
    sleep 0.2
  done
  kill -KILL "$qpid" 2>/dev/null
  wait "$qpid" 2>/dev/null
  qpid=
  # The drains end once QEMU, their only writer, is gone; one that QEMU never opened still waits
  # for a writer: open and close each FIFO read-write (never blocks) to give it its EOF.
  local f fd
  for f in "$io/out" "$io/err"; do
    [ -p "$f" ] && exec {fd}<>"$f" && exec {fd}>&-
  done
  for p in "${catpids[@]}"; do wait "$p" 2>/dev/null; done
  catpids=()
  rm -f "$io/out" "$io/err"
  [ -n "$tailpid" ] && { kill "$tailpid" 2>/dev/null; wait "$tailpid" 2>/dev/null; tailpid=; }
  [ -f "$io/rc" ] && return 0
  local probe_said
  probe_said=$(cat "$io/kvm-probe" 2>/dev/null)
  case "$why" in *NESTED_TIMEOUT*) echo "nested-host: $why" >&2; return 124 ;; esac
  if [ -n "$why" ]; then
    echo "nested-host: $why" >&2
  elif [ "$probe_said" = hang ]; then
    echo "nested-host: KVM_RUN hangs in L1" >&2
  else
    echo "nested-host: L1 stopped without running the command${probe_said:+ (KVM check: $probe_said)}" >&2
    return 2
  fi
  return 1
}

for attempt in 1 2; do
  boot
  r=$?
  case $r in
    0) exit "$(cat "$io/rc")" ;;
    124) exit 124 ;;
    1) [ "$attempt" = 1 ] && echo "nested-host: booting L1 once more" >&2 ;;
    *) break ;;
  esac
  [ "$interactive" = 1 ] && break
done
echo "nested-host: the nested host could not run the command; end of L1's console log:" >&2
tail -n 40 "$log" >&2
[ -s "$io/qemu.err" ] && { echo "nested-host: QEMU said:" >&2; cat "$io/qemu.err" >&2; }
exit 125
