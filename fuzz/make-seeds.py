#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target under fuzz/seeds/<target>/ (committed; rerun
after changing an input layout). Layouts: see fuzz/src/lib.rs (a queue: descriptors, avail
ring, then guest memory bytes at DATA_BASE) and each target's doc comment."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4
DATA_BASE = 0x10000


def queue(descs, heads):
    """descs: (offset from DATA_BASE, len, flags, next)."""
    b = bytes([len(descs)])
    for off, ln, fl, nx in descs:
        b += struct.pack("<IIHH", off, ln, fl, nx)
    b += bytes([len(heads)]) + b"".join(struct.pack("<H", h) for h in heads)
    return b


def mem(chunks):
    """chunks: {offset: bytes} -> the memory image from DATA_BASE."""
    end = max(o + len(c) for o, c in chunks.items())
    m = bytearray(end)
    for o, c in chunks.items():
        m[o:o + len(c)] = c
    return bytes(m)


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# virtio-blk: header at 0, data at 0x1000, status at 0x2000.
def blk(type_, sector, data_len, data_flags):
    q = queue([(0, 16, NEXT, 1), (0x1000, data_len, data_flags | NEXT, 2), (0x2000, 1, WRITE, 0)], [0])
    return q + mem({0: struct.pack("<IIQ", type_, 0, sector), 0x1000: b"\xab" * 16, 0x2000: b"\xff"})


blk_seeds = {
    "read": blk(0, 2, 1024, WRITE),
    "write": blk(1, 4, 512, 0),
    "get_id": blk(8, 0, 20, WRITE),
    "flush": queue([(0, 16, NEXT, 1), (0x2000, 1, WRITE, 0)], [0]) + mem({0: struct.pack("<IIQ", 4, 0, 0), 0x2000: b"\0"}),
    "past_end": blk(0, 1 << 40, 512, WRITE),
}
for n, d in blk_seeds.items():
    write("virtio_blk", n, d)
    write("desc_chain", "blk_" + n, d)
# Descriptor walks: a loop, a next out of the table, an indirect table at 0x3000.
write("desc_chain", "loop", queue([(0, 16, NEXT, 1), (0x1000, 16, NEXT, 0)], [0, 1]) + mem({0: b"\0" * 16}))
write("desc_chain", "next_out_of_table", queue([(0, 16, NEXT, 200)], [0, 40]) + mem({0: b"\0" * 16}))
indirect = b"".join(struct.pack("<QIHH", DATA_BASE + o, l, f, n) for o, l, f, n in [(0, 16, NEXT, 1), (0x1000, 512, WRITE | NEXT, 2), (0x2000, 1, WRITE, 0)])
write("desc_chain", "indirect", queue([(0x3000, len(indirect), INDIRECT, 0)], [0]) + mem({0: struct.pack("<IIQ", 0, 0, 0), 0x3000: indirect}))

# virtio-net: chain 0 (tx) = header + frame at 0; chain 1 (rx) = 2048 writable bytes at 0x1000;
# then the rx frame.
frame = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + bytes(range(46))
net_q = queue([(0, 12 + len(frame), 0, 0), (0x1000, 2048, WRITE, 0)], [0, 1])
write("virtio_net", "tx_rx", net_q + struct.pack("<H", len(frame)) + frame + mem({0: b"\0" * 12 + frame}))
split_q = queue([(0, 12, NEXT, 1), (12, len(frame), 0, 0), (0x1000, 6, WRITE | NEXT, 3), (0x2000, 1600, WRITE, 0)], [0, 2])
write("virtio_net", "split", split_q + struct.pack("<H", len(frame)) + frame + mem({0: b"\0" * 12 + frame}))

# vsock: tx = one packet (header at 0, payload at 0x100); rx = one 4 KiB buffer at 0x2000.
def vsock_hdr(op, length=0, dst_port=1024, type_=1):
    return struct.pack("<QQIIIHHIII", 3, 2, 1234, dst_port, length, type_, op, 0, 65536, 0)


for name, op, payload in [("request", 1, b""), ("rw", 5, b"hello"), ("rst", 3, b""), ("shutdown", 4, b""), ("credit_request", 7, b"")]:
    descs = [(0, 44, NEXT if payload else 0, 1)]
    if payload:
        descs.append((0x100, len(payload), 0, 0))
    tx = queue(descs, [0])
    rx = queue([(0x2000, 4096, WRITE, 0)], [0])
    write("vsock", name, tx + rx + mem({0: vsock_hdr(op, len(payload)), 0x100: payload or b"\0"}))

# virtio-fs: FUSE requests (in at 0, out at 0x1000).
def fuse(opcode, nodeid, body, unique=1):
    return struct.pack("<IIQQIIII", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0) + body


init = fuse(26, 0, struct.pack("<IIII", 7, 31, 0x20000, 0) + b"\0" * 48)
for name, req in [
    ("init", init),
    ("lookup", fuse(1, 1, b"d\0", 2)),
    ("lookup_dotdot", fuse(1, 1, b"..\0", 2)),
    ("getattr", fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), 2)),
    ("opendir", fuse(27, 1, struct.pack("<II", 0, 0), 2)),
    ("readlink", fuse(5, 1, b"", 2)),
    ("statfs", fuse(17, 1, b"", 2)),
]:
    if name == "init":
        q = queue([(0, len(req), NEXT, 1), (0x1000, 4096, WRITE, 0)], [0])
        write("virtio_fs", name, q + mem({0: req}))
    else:
        q = queue([(0, len(init), NEXT, 1), (0x1000, 4096, WRITE, 0), (0x2000, len(req), NEXT, 3), (0x3000, 4096, WRITE, 0)], [0, 2])
        write("virtio_fs", name, q + mem({0: init, 0x2000: req}))

# virtio-mmio: the driver's init sequence, a queue at DATA_BASE, one notify.
def op(kind, offset, value):
    return struct.pack("<BHI", kind, offset, value)


W4, R4, NOTIFY = 1 | (2 << 2), 0 | (2 << 2), 3
ops = [
    op(R4, 0x0, 0), op(R4, 0x4, 0), op(R4, 0x8, 0),
    op(W4, 0x70, 1), op(W4, 0x70, 3),
    op(W4, 0x14, 1), op(R4, 0x10, 0),
    op(W4, 0x24, 1), op(W4, 0x20, 1), op(W4, 0x70, 11), op(R4, 0x70, 0),
    op(W4, 0x30, 0), op(R4, 0x34, 0), op(W4, 0x38, 32),
    op(W4, 0x80, DATA_BASE), op(W4, 0x84, 0), op(W4, 0x90, DATA_BASE + 0x200), op(W4, 0x94, 0),
    op(W4, 0xa0, DATA_BASE + 0x400), op(W4, 0xa4, 0), op(W4, 0x44, 1),
    op(W4, 0x70, 15), op(NOTIFY, 0x50, 0), op(R4, 0x60, 0), op(W4, 0x64, 1), op(R4, 0x100, 0), op(W4, 0x70, 0),
]
table = b"".join(struct.pack("<QIHH", DATA_BASE + o, l, f, n) for o, l, f, n in [(0x1000, 16, NEXT, 1), (0x2000, 512, WRITE | NEXT, 2), (0x3000, 1, WRITE, 0)])
avail = struct.pack("<HHH", 0, 1, 0)
write("virtio_mmio", "init_and_read", bytes([len(ops)]) + b"".join(ops) + mem({0: table, 0x200: avail, 0x1000: struct.pack("<IIQ", 0, 0, 0)}))

# Kernel loaders: a minimal bzImage and ELF (as vmm-core's tests build them).
def bzimage(setup_sects=4, payload=b"\xf4" * 64, init_size=0x10000):
    v = bytearray(((setup_sects or 4) + 1) * 512)
    v[0x1f1] = setup_sects
    v[0x1fe:0x200] = struct.pack("<H", 0xaa55)
    v[0x201] = 0x6a
    v[0x202:0x206] = b"HdrS"
    v[0x206:0x208] = struct.pack("<H", 0x020f)
    v[0x211] = 1
    v[0x236:0x238] = struct.pack("<H", 1)
    v[0x260:0x264] = struct.pack("<I", init_size)
    return bytes(v) + payload


def elf(paddr=0x100000, code=b"\xf4\x90\x90\x90", bss=16):
    v = bytearray(64 + 56)
    v[0:4] = b"\x7fELF"
    v[4], v[5], v[6] = 2, 1, 1
    v[0x10:0x12] = struct.pack("<H", 2)
    v[0x12:0x14] = struct.pack("<H", 62)
    v[0x18:0x20] = struct.pack("<Q", paddr)
    v[0x20:0x28] = struct.pack("<Q", 64)
    v[0x34:0x36] = struct.pack("<H", 64)
    v[0x36:0x38] = struct.pack("<H", 56)
    v[0x38:0x3a] = struct.pack("<H", 1)
    v[64:68] = struct.pack("<I", 1)
    v[72:80] = struct.pack("<Q", 120)
    v[80:88] = struct.pack("<Q", paddr)
    v[88:96] = struct.pack("<Q", paddr)
    v[96:104] = struct.pack("<Q", len(code))
    v[104:112] = struct.pack("<Q", len(code) + bss)
    return bytes(v) + code


write("kernel_loader", "bzimage", bzimage())
write("kernel_loader", "bzimage_0_sects", bzimage(0))
write("kernel_loader", "elf", elf())

# Config: the docs' examples, and annotations after a NUL.
with open(os.path.join(HERE, "..", "docs", "config.md")) as f:
    blocks = [b.split("```")[0] for b in f.read().split("```toml\n")[1:]]
for i, b in enumerate(blocks):
    write("config", f"docs_{i}", b.encode())
write("config", "annotations", b"[runtime]\nenable_annotations = [\"hypervisor.memory_mib\", \"hypervisor.rate_limits.net.tx.ops_per_s\"]\n\0hypervisor.memory_mib=512\nhypervisor.rate_limits.net.tx.ops_per_s=100\n")

# Agent requests: which type (see fuzz/src/agent.rs), then protobuf bytes.
write("agent_request", "check", b"\x01")
write("agent_request", "exec", b"\x02\x0a\x03abc\x12\x02e1")
write("agent_request", "create", b"\x09\x0a\x02c1\x12\x02{}")
write("agent_request", "network", b"\x0d\x0a\x08\x0a\x04eth0\x12\x00")

# Rate limiter: rate, burst, refill time, then (time step, tokens) pairs.
write("rate_limiter", "steps", struct.pack("<QQI", 1000, 100, 100) + b"".join(struct.pack("<IQ", 1_000_000 * i, 50 * i) for i in range(8)))

# OCI spec (oci_spec, FUZZ_FEATURES=shim): containerd 1.6's default spec with a bind mount and a
# network namespace, and an exec process spec.
with open(os.path.join(HERE, "..", "agent", "src", "testdata", "containerd-1.6-default-spec.json")) as f:
    default_spec = f.read()
write("oci_spec", "containerd_default", default_spec.encode())
spec = json.loads(default_spec)
spec["mounts"].append({"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"]})
spec.setdefault("linux", {}).setdefault("namespaces", []).append({"type": "network", "path": "/var/run/netns/x"})
spec["annotations"] = {"io.kubernetes.cri.sandbox-id": "abc", "io.joey.config.hypervisor.memory_mib": "512"}
write("oci_spec", "bind_netns_annotations", json.dumps(spec).encode())
write("oci_spec", "process", json.dumps({"args": ["sh", "-c", "echo hi"], "cwd": "/", "env": ["A=b"], "terminal": False, "user": {"uid": 0, "gid": 0}}).encode())
