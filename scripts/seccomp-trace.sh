#!/usr/bin/env bash
# Collects the system calls that joey's threads make, per thread class, to derive the seccomp
# allowlists of vmm-core/src/seccomp.rs (see docs/security.md).
#
#   scripts/seccomp-trace.sh OUT -- COMMAND...   run COMMAND with joeyctl and the shim under strace
#   scripts/seccomp-trace.sh OUT                 only summarize the traces already in OUT
#
# COMMAND runs with JOEYCTL and JOEY_SHIM pointing at wrappers (in OUT/bin) that exec the real
# binaries (target/release, or $JOEYCTL / $JOEY_SHIM) under `strace -f -ff`, so every thread and
# child (QEMU included) gets its own trace file OUT/<binary>.<tid>. E.g.
#   scripts/seccomp-trace.sh /tmp/sc -- cargo test --release -p joey-tests --test shim -- --test-threads=1
# The summary names each thread by its PR_SET_NAME (Rust and tokio name their threads that way;
# a main thread is "main", an exec'd child is named after its binary) and lists, per name, the
# syscalls seen. Needs strace and python3.
set -euo pipefail
out=${1:?usage: seccomp-trace.sh OUT [-- COMMAND...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = "--" ]; then
    shift
    mkdir -p "$out/bin"
    out=$(cd "$out" && pwd)
    for b in joeyctl containerd-shim-joey-v2; do
        case $b in
            joeyctl) real=${JOEYCTL:-$root/target/release/joeyctl} ;;
            *) real=${JOEY_SHIM:-$root/target/release/containerd-shim-joey-v2} ;;
        esac
        # The shim's `start` forks the long-lived shim and must exit with its stdout closed:
        # strace (which would hold that pipe open) attaches to the new shim once `start` ended.
        cat >"$out/bin/$b" <<WRAP
#!/bin/sh
case " \$* " in
*" start "*)
    addr=\$("$real" "\$@"); rc=\$?
    printf %s "\$addr"
    pid=\$(pgrep -n -f -- "^$real .*-socket ")
    [ -n "\$pid" ] && setsid strace -f -ff -qq -o "$out/$b" -p "\$pid" </dev/null >/dev/null 2>&1 &
    sleep 0.5
    exit \$rc ;;
esac
exec strace -f -ff -qq -o "$out/$b" "$real" "\$@"
WRAP
        chmod +x "$out/bin/$b"
    done
    JOEYCTL=$out/bin/joeyctl JOEY_SHIM=$out/bin/containerd-shim-joey-v2 "$@" || echo "seccomp-trace: command failed ($?)" >&2
fi
python3 - "$out" <<'PY'
import collections, os, re, sys
out = sys.argv[1]
name_re = re.compile(r'prctl\(PR_SET_NAME, "([^"]*)"')
exec_re = re.compile(r'^execve\("([^"]*)".*= 0$')
clone_re = re.compile(r'^(clone3?|fork|vfork)\((.*)\)\s+= (\d+)')
call_re = re.compile(r'^([a-z_0-9]+)\(')
# tid -> list of (event, value) in order; creator links from clone lines.
files = {}
for f in os.listdir(out):
    path = os.path.join(out, f)
    tid = f.rsplit('.', 1)[-1]
    if os.path.isfile(path) and tid.isdigit():
        files[int(tid)] = (f.rsplit('.', 1)[0], open(path, errors='replace').read().splitlines())
creator = {}  # tid -> (parent tid, is_thread, parent's label at that time)
labels = {}
def label_of(tid):
    """Walks a trace: yields (label, syscall) pairs; a label is image/thread-name."""
    if tid in labels:
        return labels[tid]
    binary, lines = files[tid]
    if tid in creator:
        ptid, thread, plabel = creator[tid]
        image, pname = plabel.split('/', 1)
        name = (pname if pname.endswith('@fork') else pname + '@fork') if not thread else 'thread@' + pname.split('@')[0]
    else:
        image, name = binary, 'main'
    res = []
    for line in lines:
        m = exec_re.match(line)
        if m:
            res.append((f'{image}/{name}', 'execve'))
            image, name = os.path.basename(m.group(1)), 'main'
            continue
        m = name_re.search(line)
        if m:
            base = name.split('@', 1)
            name = m.group(1) + ('@' + base[1] if len(base) > 1 and base[1] != 'fork' else '')
        m = clone_re.match(line)
        if m:
            creator[int(m.group(3))] = (tid, 'CLONE_THREAD' in m.group(2), f'{image}/{name}')
        m = call_re.match(line)
        if m:
            res.append((f'{image}/{name}', m.group(1)))
    labels[tid] = res
    return res
# Creators first: a tid is created by a smaller tid almost always; resolve in tid order twice.
for tid in sorted(files):
    label_of(tid)
labels.clear()
calls = collections.defaultdict(set)
for tid in sorted(files):
    for label, call in label_of(tid):
        calls[label].add(call)
for name in sorted(calls):
    print(f"{name}: {' '.join(sorted(calls[name]))}")
PY
