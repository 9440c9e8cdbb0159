/*
 * joey probe guest: a freestanding 64-bit program entered exactly like a
 * Linux vmlinux (long mode, identity-mapped paging, rsi -> struct boot_params).
 * It checks the boot data the VMM prepared and reports on COM1:
 *
 *   PROBE <name> ok
 *   PROBE <name> FAIL <detail>
 *   PROBE done <passed>/<total>
 *
 * and then resets the VM through the i8042 (out 0x64, 0xFE).
 *
 * Command line parameters:
 *   probe.mem_mib=N        expected RAM size (e820 check)
 *   probe.cpus=N           expected vCPU count (MP table check)
 *   probe.initrd_sum=HEX   expected FNV-1a 32 of the initrd (initrd check)
 *   probe.spin=1           after the checks, increment the u64 at PROBE_COUNTER_ADDR forever
 *   probe.triple_fault=1   after the checks, triple fault (empty IDT + ud2)
 *   virtio_mmio.device=S@B:I  a virtio-mmio device to drive (any number; the VMM appends them)
 *   probe.blkN_sum=HEX     FNV-1a 32 of sector 0 of the N-th virtio-blk device
 *   probe.blkN_sectors=N   its expected capacity (optional)
 *   probe.vsock_port=P     host port the probe connects to over virtio-vsock
 *   probe.vsock_msg=S      bytes sent there (default hello-from-probe); expects S upper-cased back
 *   probe.vsock_cid=N      expected guest CID (optional)
 *   probe.fs_tag=S         expected virtio-fs mount tag (optional)
 *   probe.fs_file=NAME     file in the root of the shared directory the probe looks up
 *   probe.fs_size=N        its expected size in bytes
 *   probe.netN_mac=HEX     the N-th virtio-net device's expected MAC (12 hex digits)
 *   probe.netN_mtu=N       its expected MTU
 *
 * virtio-blk: reads sector 0, GET_ID, writes sector 1 with blk_pattern() and reads it back
 * (read-only disks: the write must fail with IOERR), reads past the end (IOERR).
 * virtio-net: checks MAC, link status and MTU, sends one frame (ethertype 0x88b5, payload
 * "joey-probe-netN") before posting any rx buffer, waits, then posts rx buffers and expects
 * the host's answer (to its MAC, the payload upper-cased), which had to wait in the tap.
 * virtio-fs: FUSE_INIT (7.31) on the request queue, then FUSE_LOOKUP of probe.fs_file in the
 * root (nodeid 1), checking the attr size.
 */
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Guest physical address of the spin counter (free low memory in the VMM layout). */
#define PROBE_COUNTER_ADDR 0x5000UL
#define IDENTITY_MAPPED_END (4UL << 30)

/* struct boot_params offsets (Documentation/arch/x86/zero-page.rst). */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_TYPE_OF_LOADER 0x210
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define E820_RAM 1

#define COM1 0x3f8

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, size_t n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, size_t n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u8 rd8(u64 a) { return *(volatile u8 *)(uintptr_t)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)(uintptr_t)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)(uintptr_t)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)(uintptr_t)a; }

/* ---- serial ---- */
static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xc7); /* FIFO */
    outb(COM1 + 4, 0x0b);
}
static void putc_(char c) {
    for (u32 i = 0; i < (1u << 20) && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}
static void puts_(const char *s) {
    while (*s) putc_(*s++);
}
static void puthex(u64 v) {
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    b[--i] = 'x';
    b[--i] = '0';
    puts_(&b[i]);
}
static void putdec(u64 v) {
    char b[21];
    int i = 20;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    puts_(&b[i]);
}

/* ---- results ---- */
static u32 passed, total;
static void ok(const char *name) {
    passed++;
    total++;
    puts_("PROBE ");
    puts_(name);
    puts_(" ok\n");
}
/* Starts a FAIL line; the caller appends the detail and ends it with fail_end(). */
static void fail(const char *name, const char *detail) {
    total++;
    puts_("PROBE ");
    puts_(name);
    puts_(" FAIL ");
    puts_(detail);
}
static void fail_end(void) { putc_('\n'); }

/* ---- command line ---- */
static const char *cmdline = "";

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Value of "key=" in the command line, or NULL. */
static const char *param(const char *key) {
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p)) p++;
        const char *k = key, *q = p;
        while (*k && *q == *k) k++, q++;
        if (!*k && *q == '=') return q + 1;
        while (*p && !is_space(*p)) p++;
    }
    return NULL;
}
static int parse_u64(const char *s, int base, u64 *out) {
    u64 v = 0;
    int n = 0;
    if (!s) return 0;
    if (base == 16 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) s += 2;
    for (; *s && !is_space(*s); s++, n++) {
        int d;
        if (*s >= '0' && *s <= '9') d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
        else return 0;
        v = v * (u64)base + (u64)d;
    }
    *out = v;
    return n > 0;
}

/* ---- e820 ---- */
static u32 e820_n;
static u64 e820_addr(u64 bp, u32 i) { return rd64(bp + BP_E820_TABLE + i * 20); }
static u64 e820_size(u64 bp, u32 i) { return rd64(bp + BP_E820_TABLE + i * 20 + 8); }
static u32 e820_type(u64 bp, u32 i) { return rd32(bp + BP_E820_TABLE + i * 20 + 16); }

/* Whether [a, a+len) lies in one usable e820 entry (and in the identity map). */
static int in_ram(u64 bp, u64 a, u64 len) {
    if (a + len < a || a + len > IDENTITY_MAPPED_END) return 0;
    for (u32 i = 0; i < e820_n; i++) {
        u64 s = e820_addr(bp, i), z = e820_size(bp, i);
        if (e820_type(bp, i) == E820_RAM && a >= s && a + len <= s + z) return 1;
    }
    return 0;
}

static void check_boot_params(u64 bp) {
    if (rd32(bp + BP_HEADER) != 0x53726448) {
        fail("boot_params", "header magic ");
        puthex(rd32(bp + BP_HEADER));
    } else if (rd16(bp + BP_BOOT_FLAG) != 0xaa55) {
        fail("boot_params", "boot_flag ");
        puthex(rd16(bp + BP_BOOT_FLAG));
    } else if (rd8(bp + BP_TYPE_OF_LOADER) != 0xff) {
        fail("boot_params", "type_of_loader ");
        puthex(rd8(bp + BP_TYPE_OF_LOADER));
    } else {
        ok("boot_params");
        return;
    }
    fail_end();
}

static void check_e820(u64 bp) {
    u64 mib, usable = 0, prev_end = 0, top = 0;
    e820_n = rd8(bp + BP_E820_ENTRIES);
    if (e820_n == 0 || e820_n > 128) {
        e820_n = 0;
        fail("e820", "entries=");
        putdec(rd8(bp + BP_E820_ENTRIES));
        fail_end();
        return;
    }
    for (u32 i = 0; i < e820_n; i++) {
        u64 a = e820_addr(bp, i), s = e820_size(bp, i);
        if (a < prev_end || a + s < a) {
            fail("e820", "unsorted or overlapping entry ");
            putdec(i);
            fail_end();
            return;
        }
        prev_end = a + s;
        if (e820_type(bp, i) == E820_RAM) {
            usable += s;
            top = a + s;
        }
    }
    if (!parse_u64(param("probe.mem_mib"), 10, &mib)) {
        fail("e820", "no probe.mem_mib on the command line");
        fail_end();
        return;
    }
    u64 mem = mib << 20;
    /* All RAM but the legacy hole [EBDA, 1 MiB) must be usable. */
    if (usable > mem || usable + (1UL << 20) < mem || (mem <= (3UL << 30) && top != mem)) {
        fail("e820", "usable=");
        puthex(usable);
        puts_(" top=");
        puthex(top);
        puts_(" expected=");
        puthex(mem);
        fail_end();
        return;
    }
    ok("e820");
}

static void check_cmdline(u64 bp) {
    u64 ptr = rd32(bp + BP_CMD_LINE_PTR) | ((u64)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32);
    u64 size = rd32(bp + BP_CMDLINE_SIZE);
    if (ptr == 0 || size == 0 || !in_ram(bp, ptr, size + 1)) {
        fail("cmdline", "ptr=");
        puthex(ptr);
        puts_(" size=");
        puthex(size);
        fail_end();
        return;
    }
    u64 len = 0;
    while (len <= size && rd8(ptr + len)) len++;
    if (len != size) {
        fail("cmdline", "length ");
        putdec(len);
        puts_(" != cmdline_size ");
        putdec(size);
        fail_end();
        return;
    }
    cmdline = (const char *)(uintptr_t)ptr;
    if (!param("probe.mem_mib")) {
        fail("cmdline", "no probe.* parameters");
        fail_end();
        return;
    }
    ok("cmdline");
}

static u32 fnv1a32(u64 a, u64 len) {
    u32 h = 0x811c9dc5u;
    for (u64 i = 0; i < len; i++) {
        h ^= rd8(a + i);
        h *= 0x01000193u;
    }
    return h;
}

static void check_initrd(u64 bp) {
    u64 img = rd32(bp + BP_RAMDISK_IMAGE) | ((u64)rd32(bp + BP_EXT_RAMDISK_IMAGE) << 32);
    u64 size = rd32(bp + BP_RAMDISK_SIZE) | ((u64)rd32(bp + BP_EXT_RAMDISK_SIZE) << 32);
    const char *want_s = param("probe.initrd_sum");
    u64 want;
    if (!want_s && size == 0) return; /* no initrd expected, none given */
    if (!parse_u64(want_s, 16, &want)) {
        fail("initrd", "initrd present but no valid probe.initrd_sum");
        fail_end();
        return;
    }
    if (size == 0 || (img & 0xfff) || !in_ram(bp, img, size)) {
        fail("initrd", "image=");
        puthex(img);
        puts_(" size=");
        puthex(size);
        fail_end();
        return;
    }
    u32 got = fnv1a32(img, size);
    if (got != (u32)want) {
        fail("initrd", "sum=");
        puthex(got);
        puts_(" expected=");
        puthex(want);
        fail_end();
        return;
    }
    ok("initrd");
}

static int sum_ok(u64 a, u64 len) {
    u8 s = 0;
    for (u64 i = 0; i < len; i++) s = (u8)(s + rd8(a + i));
    return s == 0;
}

/* Finds the MP floating pointer structure; 0 if none. */
static u64 find_mpfp(u64 start, u64 end) {
    for (u64 a = start; a + 16 <= end; a += 16)
        if (rd32(a) == 0x5f504d5f /* "_MP_" */ && sum_ok(a, 16)) return a;
    return 0;
}

static void check_cpus(void) {
    u64 want;
    if (!parse_u64(param("probe.cpus"), 10, &want)) {
        fail("cpus", "no probe.cpus on the command line");
        fail_end();
        return;
    }
    u64 fp = find_mpfp(0x9fc00, 0xa0000);
    if (!fp) fp = find_mpfp(0xf0000, 0x100000);
    if (!fp) {
        fail("cpus", "no MP floating pointer");
        fail_end();
        return;
    }
    u64 t = rd32(fp + 4);
    if (t == 0 || t + 44 > 0x100000 || rd32(t) != 0x504d4350 /* "PCMP" */) {
        fail("cpus", "bad MP config table at ");
        puthex(t);
        fail_end();
        return;
    }
    u64 len = rd16(t + 4), count = rd16(t + 34);
    if (len < 44 || t + len > 0x100000 || !sum_ok(t, len)) {
        fail("cpus", "bad MP config table checksum/length");
        fail_end();
        return;
    }
    u64 o = 44, cpus = 0;
    for (u64 i = 0; i < count; i++) {
        if (o >= len) break;
        u8 type = rd8(t + o);
        if (type == 0) {
            if (o + 20 > len) break;
            if (rd8(t + o + 3) & 1) cpus++;
            o += 20;
        } else if (type <= 4) {
            o += 8;
        } else {
            fail("cpus", "unknown MP entry type ");
            putdec(type);
            fail_end();
            return;
        }
    }
    if (cpus != want) {
        fail("cpus", "mptable has ");
        putdec(cpus);
        puts_(" expected ");
        putdec(want);
        fail_end();
        return;
    }
    ok("cpus");
}

/* ---- virtio-mmio driver (virtio 1.x, register layout version 2) ---- */
#define VIRTIO_MAGIC 0x74726976u
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC 0x080
#define VM_QUEUE_DRIVER 0x090
#define VM_QUEUE_DEVICE 0x0a0
#define VM_CONFIG 0x100
#define ST_ACK 1u
#define ST_DRIVER 2u
#define ST_DRIVER_OK 4u
#define ST_FEATURES_OK 8u
#define ST_NEEDS_RESET 0x40u
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define VQ_SIZE 8
/* Polls of a used ring before giving up (the guest runs slowly under PVM). */
#define USED_SPINS 3000000UL

static inline void wr32(u64 a, u32 v) { *(volatile u32 *)(uintptr_t)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)(uintptr_t)a = v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* Bump allocator of identity-mapped pages for rings and buffers. */
#define POOL_PAGES 64
static u8 pool[POOL_PAGES * 4096] __attribute__((aligned(4096)));
static u32 pool_used;
static u64 alloc_page(void) {
    if (pool_used >= POOL_PAGES) return 0;
    /* .bss: zeroed by the loader, and each page is handed out once. */
    return (u64)(uintptr_t)&pool[pool_used++ * 4096];
}

struct vq {
    u64 base;           /* device MMIO base */
    u16 index, size;    /* queue index, queue size */
    u16 avail_idx, last_used;
    u64 desc, avail, used; /* ring addresses (one page: desc @0, avail @0x400, used @0x800) */
};

struct buf {
    u64 addr;
    u32 len;
    int write; /* device-writable */
};

/* Publishes the chain `b[0..n)` at descriptors head..head+n-1. */
static void vq_add(struct vq *q, u16 head, const struct buf *b, int n) {
    for (int i = 0; i < n; i++) {
        u64 d = q->desc + (u64)(head + i) * 16;
        *(volatile u64 *)(uintptr_t)d = b[i].addr;
        wr32(d + 8, b[i].len);
        wr16(d + 12, (u16)((b[i].write ? DESC_F_WRITE : 0) | (i < n - 1 ? DESC_F_NEXT : 0)));
        wr16(d + 14, (u16)(head + i + 1));
    }
    wr16(q->avail + 4 + 2 * (q->avail_idx % q->size), head);
    mb();
    q->avail_idx++;
    wr16(q->avail + 2, q->avail_idx);
    mb();
}

static void vq_notify(struct vq *q) {
    mb();
    wr32(q->base + VM_QUEUE_NOTIFY, q->index);
}

/* Waits for the next used element. Returns 1 with its id/len, 0 on timeout. */
static int vq_wait_used(struct vq *q, u32 *id, u32 *len) {
    for (u64 i = 0; i < USED_SPINS; i++) {
        if (rd16(q->used + 2) != q->last_used) {
            mb();
            u64 e = q->used + 4 + 8 * (u64)(q->last_used % q->size);
            *id = rd32(e);
            *len = rd32(e + 4);
            q->last_used++;
            return 1;
        }
        __asm__ volatile("pause");
    }
    return 0;
}

static const char *vq_setup(u64 base, struct vq *q, u16 index) {
    wr32(base + VM_QUEUE_SEL, index);
    if (rd32(base + VM_QUEUE_READY) != 0) return "queue already ready";
    u32 max = rd32(base + VM_QUEUE_NUM_MAX);
    if (max == 0) return "queue not available";
    u64 page = alloc_page();
    if (!page) return "out of probe memory";
    q->base = base;
    q->index = index;
    q->size = max < VQ_SIZE ? (u16)max : VQ_SIZE;
    q->avail_idx = q->last_used = 0;
    q->desc = page;
    q->avail = page + 0x400;
    q->used = page + 0x800;
    wr32(base + VM_QUEUE_NUM, q->size);
    wr32(base + VM_QUEUE_DESC, (u32)q->desc);
    wr32(base + VM_QUEUE_DESC + 4, (u32)(q->desc >> 32));
    wr32(base + VM_QUEUE_DRIVER, (u32)q->avail);
    wr32(base + VM_QUEUE_DRIVER + 4, (u32)(q->avail >> 32));
    wr32(base + VM_QUEUE_DEVICE, (u32)q->used);
    wr32(base + VM_QUEUE_DEVICE + 4, (u32)(q->used >> 32));
    wr32(base + VM_QUEUE_READY, 1);
    if (rd32(base + VM_QUEUE_READY) != 1) return "queue did not become ready";
    return NULL;
}

/* Driver initialization (virtio 1.x, 3.1.1). Accepts VERSION_1 plus `accept` (low bits);
 * returns NULL or what went wrong, *features = the device's low feature bits. */
static const char *virtio_init(u64 base, u32 accept, u32 *features, struct vq *qs, int nq) {
    wr32(base + VM_STATUS, 0);
    if (rd32(base + VM_STATUS) != 0) return "reset did not clear status";
    wr32(base + VM_STATUS, ST_ACK);
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER);
    wr32(base + VM_DEV_FEATURES_SEL, 1);
    u32 hi = rd32(base + VM_DEV_FEATURES);
    wr32(base + VM_DEV_FEATURES_SEL, 0);
    u32 lo = rd32(base + VM_DEV_FEATURES);
    if (!(hi & 1)) return "device does not offer VERSION_1";
    *features = lo;
    wr32(base + VM_DRV_FEATURES_SEL, 1);
    wr32(base + VM_DRV_FEATURES, 1);
    wr32(base + VM_DRV_FEATURES_SEL, 0);
    wr32(base + VM_DRV_FEATURES, lo & accept);
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd32(base + VM_STATUS) & ST_FEATURES_OK)) return "FEATURES_OK not accepted";
    for (int i = 0; i < nq; i++) {
        const char *e = vq_setup(base, &qs[i], (u16)i);
        if (e) return e;
    }
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    u32 st = rd32(base + VM_STATUS);
    if (st & ST_NEEDS_RESET) return "device needs reset after DRIVER_OK";
    if (!(st & ST_DRIVER_OK)) return "DRIVER_OK not set";
    return NULL;
}

static u64 rd_config64(u64 base, u64 off) {
    return rd32(base + VM_CONFIG + off) | ((u64)rd32(base + VM_CONFIG + off + 4) << 32);
}

/* "<a><i><b>" into buf (names of checks and parameters). */
static const char *nm(char *buf, const char *a, u64 i, const char *b) {
    char *p = buf;
    while (*a) *p++ = *a++;
    char d[21];
    int n = 0;
    do {
        d[n++] = (char)('0' + i % 10);
        i /= 10;
    } while (i);
    while (n) *p++ = d[--n];
    while (*b) *p++ = *b++;
    *p = 0;
    return buf;
}

static void fail_hex(const char *name, const char *detail, u64 v) {
    fail(name, detail);
    puthex(v);
    fail_end();
}

/* ---- virtio-blk ---- */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_F_RO (1u << 5)
#define BLK_F_FLUSH (1u << 9)
#define BLK_S_IOERR 1
#define BLK_NO_ANSWER 0x100

/* One request; returns the status byte (or BLK_NO_ANSWER), *used = used length. */
static u32 blk_request(struct vq *q, u64 scratch, u32 type, u64 sector, u64 data, u32 len,
                       u32 *used) {
    u64 hdr = scratch, status = scratch + 16;
    wr32(hdr, type);
    wr32(hdr + 4, 0);
    *(volatile u64 *)(uintptr_t)(hdr + 8) = sector;
    *(volatile u8 *)(uintptr_t)status = 0xff;
    struct buf b[3];
    int n = 0;
    b[n++] = (struct buf){hdr, 16, 0};
    if (len) b[n++] = (struct buf){data, len, type != BLK_T_OUT};
    b[n++] = (struct buf){status, 1, 1};
    vq_add(q, 0, b, n);
    vq_notify(q);
    u32 id, l;
    if (!vq_wait_used(q, &id, &l)) return BLK_NO_ANSWER;
    *used = l;
    return rd8(status);
}

static u8 blk_pattern(u32 j, u64 dev) { return (u8)(j * 7 + 0x5a + dev); }

static void check_blk(u64 base, u64 i) {
    char name[32], key[40];
    struct vq q;
    u32 feat = 0, used = 0, st;
    const char *e = virtio_init(base, BLK_F_RO | BLK_F_FLUSH, &feat, &q, 1);
    if (e) {
        fail(nm(name, "blk", i, "_init"), e);
        fail_end();
        return;
    }
    u64 cap = rd_config64(base, 0), want;
    if (parse_u64(param(nm(key, "probe.blk", i, "_sectors")), 10, &want) && want != cap) {
        fail_hex(nm(name, "blk", i, "_init"), "capacity ", cap);
        return;
    }
    ok(nm(name, "blk", i, "_init"));
    u64 scratch = alloc_page(), buf = alloc_page(), buf2 = alloc_page();
    if (!scratch || !buf || !buf2) {
        fail(nm(name, "blk", i, "_read"), "out of probe memory");
        fail_end();
        return;
    }

    /* Read sector 0 and compare its checksum; the device must have raised its interrupt. */
    wr32(base + VM_INT_ACK, rd32(base + VM_INT_STATUS));
    st = blk_request(&q, scratch, BLK_T_IN, 0, buf, 512, &used);
    u32 isr = rd32(base + VM_INT_STATUS);
    wr32(base + VM_INT_ACK, isr);
    nm(name, "blk", i, "_read");
    if (st != 0 || used != 513) {
        fail_hex(name, "status/used ", ((u64)st << 32) | used);
    } else if (!(isr & 1)) {
        fail_hex(name, "no used-buffer interrupt, isr=", isr);
    } else if (!parse_u64(param(nm(key, "probe.blk", i, "_sum")), 16, &want)) {
        fail(name, "no probe.blkN_sum");
        fail_end();
    } else if (fnv1a32(buf, 512) != (u32)want) {
        fail_hex(name, "sum=", fnv1a32(buf, 512));
    } else {
        ok(name);
    }

    /* GET_ID: the VMM names its disks joey-blk<N>. */
    memset((void *)(uintptr_t)buf, 0, 32);
    st = blk_request(&q, scratch, BLK_T_GET_ID, 0, buf, 20, &used);
    nm(name, "blk", i, "_id");
    if (st != 0 || rd32(buf) != 0x79656f6a /* "joey" */) fail_hex(name, "status/id ", ((u64)st << 32) | rd32(buf));
    else ok(name);

    if (feat & BLK_F_RO) {
        /* Read-only disk: a write must fail with IOERR. */
        for (u32 j = 0; j < 512; j++) ((u8 *)(uintptr_t)buf)[j] = blk_pattern(j, i);
        st = blk_request(&q, scratch, BLK_T_OUT, 1, buf, 512, &used);
        nm(name, "blk", i, "_ro");
        if (st != BLK_S_IOERR) fail_hex(name, "write to read-only disk returned ", st);
        else ok(name);
    } else {
        /* Write sector 1 with a pattern, flush, read it back (the host checks the file). */
        for (u32 j = 0; j < 512; j++) ((u8 *)(uintptr_t)buf)[j] = blk_pattern(j, i);
        nm(name, "blk", i, "_write");
        st = blk_request(&q, scratch, BLK_T_OUT, 1, buf, 512, &used);
        if (st != 0) {
            fail_hex(name, "write status ", st);
        } else if ((st = blk_request(&q, scratch, BLK_T_FLUSH, 0, 0, 0, &used)) != 0) {
            fail_hex(name, "flush status ", st);
        } else if ((st = blk_request(&q, scratch, BLK_T_IN, 1, buf2, 512, &used)) != 0) {
            fail_hex(name, "read-back status ", st);
        } else {
            u32 j = 0;
            while (j < 512 && rd8(buf2 + j) == blk_pattern(j, i)) j++;
            if (j != 512) fail_hex(name, "read-back differs at ", j);
            else ok(name);
        }
    }

    /* A read past the end must fail with IOERR (and not wedge the queue). */
    st = blk_request(&q, scratch, BLK_T_IN, cap, buf, 512, &used);
    nm(name, "blk", i, "_bounds");
    if (st != BLK_S_IOERR) fail_hex(name, "read past the end returned ", st);
    else ok(name);
}

/* ---- virtio-net ---- */
#define NET_F_MTU (1u << 3)
#define NET_F_MAC (1u << 5)
#define NET_F_STATUS (1u << 16)
#define NET_S_LINK_UP 1
#define NET_HDR 12
#define NET_RX_BUFS 4
#define NET_RX_LEN 2048
#define NET_ETHERTYPE 0x88b5
#define NET_FRAME_LEN 60
#define NET_PAYLOAD_OFF 14
/* How long the probe spins before posting rx buffers (the answer arrives meanwhile). */
#define NET_DELAY_SPINS 2000000UL

static void net_post_rx(struct vq *q, u64 bufs, u16 id) {
    struct buf b = {bufs + (u64)id * NET_RX_LEN, NET_RX_LEN, 1};
    vq_add(q, id, &b, 1);
}

static void check_net(u64 base, u64 i) {
    char name[32], key[40], payload[24];
    struct vq q[2]; /* rx, tx */
    u32 feat = 0;
    u64 want;
    const char *e = virtio_init(base, NET_F_MTU | NET_F_MAC | NET_F_STATUS, &feat, q, 2);
    nm(name, "net", i, "_init");
    if (e) {
        fail(name, e);
        fail_end();
        return;
    }
    u8 mac[6];
    for (int j = 0; j < 6; j++) mac[j] = rd8(base + VM_CONFIG + j);
    u32 status = rd8(base + VM_CONFIG + 6) | (u32)rd8(base + VM_CONFIG + 7) << 8;
    u32 mtu = rd8(base + VM_CONFIG + 10) | (u32)rd8(base + VM_CONFIG + 11) << 8;
    u64 got_mac = 0;
    for (int j = 0; j < 6; j++) got_mac = got_mac << 8 | mac[j];
    if ((feat & (NET_F_MTU | NET_F_MAC | NET_F_STATUS)) != (NET_F_MTU | NET_F_MAC | NET_F_STATUS)) {
        fail_hex(name, "features ", feat);
        return;
    }
    if (!(status & NET_S_LINK_UP)) {
        fail_hex(name, "link down, status ", status);
        return;
    }
    if (parse_u64(param(nm(key, "probe.net", i, "_mac")), 16, &want) && want != got_mac) {
        fail_hex(name, "mac ", got_mac);
        return;
    }
    if (parse_u64(param(nm(key, "probe.net", i, "_mtu")), 10, &want) && want != mtu) {
        fail_hex(name, "mtu ", mtu);
        return;
    }
    /* rx: NET_RX_BUFS * NET_RX_LEN bytes = two consecutive pool pages. */
    u64 tx = alloc_page(), rx = alloc_page(), rx_hi = alloc_page();
    if (!tx || !rx || !rx_hi) {
        fail(name, "out of probe memory");
        fail_end();
        return;
    }
    ok(name);

    /* A broadcast frame from our MAC, with no offloads (the header is all zero). */
    nm(payload, "joey-probe-net", i, "");
    u32 plen = 0;
    while (payload[plen]) plen++;
    memset((void *)(uintptr_t)tx, 0, NET_HDR + NET_FRAME_LEN);
    u64 f = tx + NET_HDR;
    for (int j = 0; j < 6; j++) {
        *(volatile u8 *)(uintptr_t)(f + j) = 0xff;
        *(volatile u8 *)(uintptr_t)(f + 6 + j) = mac[j];
    }
    *(volatile u8 *)(uintptr_t)(f + 12) = NET_ETHERTYPE >> 8;
    *(volatile u8 *)(uintptr_t)(f + 13) = NET_ETHERTYPE & 0xff;
    memcpy((void *)(uintptr_t)(f + NET_PAYLOAD_OFF), payload, plen);
    struct buf b = {tx, NET_HDR + NET_FRAME_LEN, 0};
    vq_add(&q[1], 0, &b, 1);
    vq_notify(&q[1]);
    u32 id, len;
    nm(name, "net", i, "_tx");
    if (!vq_wait_used(&q[1], &id, &len)) {
        fail(name, "tx queue did not return the frame");
        fail_end();
        return;
    }
    ok(name);

    /* No rx buffer yet: the answer must wait (in the tap), not be dropped. */
    for (u64 s = 0; s < NET_DELAY_SPINS; s++) __asm__ volatile("pause");
    for (u16 j = 0; j < NET_RX_BUFS; j++) net_post_rx(&q[0], rx, j);
    vq_notify(&q[0]);
    nm(name, "net", i, "_rx");
    for (int tries = 0; tries < 16; tries++) {
        if (!vq_wait_used(&q[0], &id, &len)) {
            fail(name, "no frame arrived");
            fail_end();
            return;
        }
        if (id >= NET_RX_BUFS) {
            fail_hex(name, "used id ", id);
            return;
        }
        u64 r = rx + (u64)id * NET_RX_LEN + NET_HDR;
        int match = len >= NET_HDR + NET_PAYLOAD_OFF + plen && rd8(r + 12) == (NET_ETHERTYPE >> 8) &&
                    rd8(r + 13) == (NET_ETHERTYPE & 0xff);
        for (int j = 0; match && j < 6; j++) match = rd8(r + j) == mac[j];
        for (u32 j = 0; match && j < plen; j++) {
            char c = payload[j];
            if (c >= 'a' && c <= 'z') c = (char)(c - 'a' + 'A');
            match = rd8(r + NET_PAYLOAD_OFF + j) == (u8)c;
        }
        if (match) {
            ok(name);
            return;
        }
        /* Something else (the host's own traffic): give the buffer back and keep waiting. */
        net_post_rx(&q[0], rx, (u16)id);
        vq_notify(&q[0]);
    }
    fail(name, "no answer among 16 frames");
    fail_end();
}

/* ---- virtio-vsock ---- */
#define VSOCK_HDR 44
#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_LOCAL_PORT 50000u
#define VSOCK_RX_BUFS 4
#define VSOCK_RX_LEN (VSOCK_HDR + 256)
#define VSOCK_MSG_MAX 64

struct vsock {
    struct vq q[3]; /* rx, tx, event */
    u64 cid;
    u32 port;
    u64 tx_buf, rx_bufs;
};

static void vsock_post_rx(struct vsock *v, u16 id) {
    struct buf b = {v->rx_bufs + (u64)id * 512, VSOCK_RX_LEN, 1};
    vq_add(&v->q[0], id, &b, 1);
}

/* Sends one packet (header + payload in one descriptor) and waits until the device took it. */
static int vsock_send(struct vsock *v, u16 op, u32 flags, const char *data, u32 len) {
    u64 h = v->tx_buf;
    memset((void *)(uintptr_t)h, 0, VSOCK_HDR);
    *(volatile u64 *)(uintptr_t)h = v->cid;
    *(volatile u64 *)(uintptr_t)(h + 8) = 2;
    wr32(h + 16, VSOCK_LOCAL_PORT);
    wr32(h + 20, v->port);
    wr32(h + 24, len);
    wr16(h + 28, 1); /* stream */
    wr16(h + 30, op);
    wr32(h + 32, flags);
    wr32(h + 36, 4096); /* buf_alloc */
    wr32(h + 40, 0);    /* fwd_cnt */
    memcpy((void *)(uintptr_t)(h + VSOCK_HDR), data, len);
    struct buf b = {h, VSOCK_HDR + len, 0};
    vq_add(&v->q[1], 0, &b, 1);
    vq_notify(&v->q[1]);
    u32 id, l;
    return vq_wait_used(&v->q[1], &id, &l);
}

/* Next packet of our connection: returns its op (copying RW payload to out+*got), 0 on timeout. */
static u16 vsock_recv(struct vsock *v, char *out, u32 *got, u32 max) {
    for (;;) {
        u32 id, len;
        if (!vq_wait_used(&v->q[0], &id, &len)) return 0;
        if (id >= VSOCK_RX_BUFS) return 0;
        u64 p = v->rx_bufs + (u64)id * 512;
        u16 op = rd16(p + 30);
        u32 plen = rd32(p + 24);
        int mine = rd32(p + 16) == v->port && rd32(p + 20) == VSOCK_LOCAL_PORT;
        if (mine && op == VSOCK_OP_RW) {
            for (u32 j = 0; j < plen && j + VSOCK_HDR < len && *got < max; j++)
                out[(*got)++] = (char)rd8(p + VSOCK_HDR + j);
        }
        vsock_post_rx(v, (u16)id);
        vq_notify(&v->q[0]);
        if (mine) return op;
    }
}

static void check_vsock(u64 base) {
    struct vsock v;
    u32 feat = 0;
    u64 want;
    const char *e = virtio_init(base, 0, &feat, v.q, 3);
    if (e) {
        fail("vsock_init", e);
        fail_end();
        return;
    }
    v.cid = rd_config64(base, 0);
    if (parse_u64(param("probe.vsock_cid"), 10, &want) && want != v.cid) {
        fail_hex("vsock_init", "guest_cid ", v.cid);
        return;
    }
    v.tx_buf = alloc_page();
    v.rx_bufs = alloc_page();
    if (!v.tx_buf || !v.rx_bufs) {
        fail("vsock_init", "out of probe memory");
        fail_end();
        return;
    }
    ok("vsock_init");
    if (!parse_u64(param("probe.vsock_port"), 10, &want)) {
        fail("vsock_connect", "no probe.vsock_port");
        fail_end();
        return;
    }
    v.port = (u32)want;
    for (u16 i = 0; i < VSOCK_RX_BUFS; i++) vsock_post_rx(&v, i);
    vq_notify(&v.q[0]);

    char in[VSOCK_MSG_MAX];
    u32 got = 0;
    if (!vsock_send(&v, VSOCK_OP_REQUEST, 0, "", 0)) {
        fail("vsock_connect", "tx queue did not return the request");
        fail_end();
        return;
    }
    u16 op = vsock_recv(&v, in, &got, sizeof(in));
    if (op != VSOCK_OP_RESPONSE) {
        fail_hex("vsock_connect", "expected OP_RESPONSE, got op ", op);
        return;
    }
    ok("vsock_connect");

    /* Send the message; the host answers it in upper case. */
    char msg[VSOCK_MSG_MAX], upper[VSOCK_MSG_MAX];
    const char *m = param("probe.vsock_msg");
    u32 n = 0;
    if (!m) m = "hello-from-probe";
    for (; m[n] && !is_space(m[n]) && n < VSOCK_MSG_MAX; n++) {
        msg[n] = m[n];
        upper[n] = (m[n] >= 'a' && m[n] <= 'z') ? (char)(m[n] - 32) : m[n];
    }
    if (!vsock_send(&v, VSOCK_OP_RW, 0, msg, n)) {
        fail("vsock_echo", "tx queue did not return the data");
        fail_end();
        return;
    }
    got = 0;
    while (got < n) {
        op = vsock_recv(&v, in, &got, sizeof(in));
        if (op == 0 || op == VSOCK_OP_RST || op == VSOCK_OP_SHUTDOWN) break;
    }
    u32 j = 0;
    while (j < n && j < got && in[j] == upper[j]) j++;
    if (got != n || j != n) {
        fail("vsock_echo", "got ");
        putdec(got);
        puts_(" bytes: ");
        for (u32 k = 0; k < got; k++) putc_(in[k]);
        fail_end();
    } else {
        ok("vsock_echo");
    }
    vsock_send(&v, VSOCK_OP_SHUTDOWN, 3, "", 0);
}

/* ---- virtio-fs ---- */
#define FUSE_LOOKUP 1
#define FUSE_INIT 26
#define FUSE_IN_HDR 40
#define FUSE_OUT_HDR 16
#define FUSE_ROOT_ID 1
#define FS_TAG_LEN 36
#define FS_REQUEST_QUEUE 1
#define FS_REPLY_LEN 512

/* Writes a fuse_in_header at `req` for a body of `body` bytes. */
static void fuse_hdr(u64 req, u32 opcode, u64 unique, u64 nodeid, u32 body) {
    memset((void *)(uintptr_t)req, 0, FUSE_IN_HDR);
    wr32(req, FUSE_IN_HDR + body);
    wr32(req + 4, opcode);
    *(volatile u64 *)(uintptr_t)(req + 8) = unique;
    *(volatile u64 *)(uintptr_t)(req + 16) = nodeid;
}

/* Sends the request at `req` (`len` bytes) with a reply buffer at `reply`; returns the used
 * length, or -1 if the device never answered, -2 if the reply is not ours. */
static long fuse_call(struct vq *q, u64 req, u32 len, u64 reply, u64 unique) {
    memset((void *)(uintptr_t)reply, 0xff, FUSE_OUT_HDR);
    struct buf b[2] = {{req, len, 0}, {reply, FS_REPLY_LEN, 1}};
    vq_add(q, 0, b, 2);
    vq_notify(q);
    u32 id, used;
    if (!vq_wait_used(q, &id, &used)) return -1;
    if (id != 0 || rd64(reply + 8) != unique) return -2;
    return used;
}

static void check_fs(u64 base) {
    struct vq q[2]; /* hiprio, request */
    u32 feat = 0;
    const char *e = virtio_init(base, 0, &feat, q, 2);
    if (e) {
        fail("fs_init", e);
        fail_end();
        return;
    }
    /* Config space: the tag (NUL padded) and num_request_queues == 1. */
    const char *want_tag = param("probe.fs_tag");
    u32 nreq = rd32(base + VM_CONFIG + FS_TAG_LEN);
    if (nreq != 1) {
        fail_hex("fs_init", "num_request_queues ", nreq);
        return;
    }
    if (want_tag) {
        u32 j = 0;
        while (j < FS_TAG_LEN && want_tag[j] && !is_space(want_tag[j]) &&
               rd8(base + VM_CONFIG + j) == (u8)want_tag[j])
            j++;
        int end = (want_tag[j] == 0 || is_space(want_tag[j])) &&
                  (j == FS_TAG_LEN || rd8(base + VM_CONFIG + j) == 0);
        if (!end) {
            fail_hex("fs_init", "tag differs at byte ", j);
            return;
        }
    }
    u64 req = alloc_page(), reply = alloc_page();
    if (!req || !reply) {
        fail("fs_init", "out of probe memory");
        fail_end();
        return;
    }
    /* FUSE_INIT: fuse_init_in { major 7, minor 31, max_readahead, flags }. */
    fuse_hdr(req, FUSE_INIT, 1, 0, 16);
    wr32(req + FUSE_IN_HDR, 7);
    wr32(req + FUSE_IN_HDR + 4, 31);
    wr32(req + FUSE_IN_HDR + 8, 0x20000);
    wr32(req + FUSE_IN_HDR + 12, 0);
    long used = fuse_call(&q[FS_REQUEST_QUEUE], req, FUSE_IN_HDR + 16, reply, 1);
    if (used < 0) {
        fail("fs_init", used == -1 ? "no answer to FUSE_INIT" : "FUSE_INIT reply not ours");
        fail_end();
        return;
    }
    if (rd32(reply + 4) != 0) {
        fail_hex("fs_init", "FUSE_INIT error ", rd32(reply + 4));
        return;
    }
    if (rd32(reply + FUSE_OUT_HDR) != 7 || (u64)used != rd32(reply) || used < FUSE_OUT_HDR + 8) {
        fail_hex("fs_init", "FUSE_INIT reply major/used ",
                 ((u64)rd32(reply + FUSE_OUT_HDR) << 32) | (u64)used);
        return;
    }
    ok("fs_init");

    /* FUSE_LOOKUP of probe.fs_file under the root; fuse_entry_out.attr.size at +40+8. */
    const char *file = param("probe.fs_file");
    u64 want;
    if (!file || !parse_u64(param("probe.fs_size"), 10, &want)) {
        fail("fs_lookup", "no probe.fs_file / probe.fs_size");
        fail_end();
        return;
    }
    u32 n = 0;
    while (file[n] && !is_space(file[n]) && n < 255) {
        *(volatile u8 *)(uintptr_t)(req + FUSE_IN_HDR + n) = (u8)file[n];
        n++;
    }
    *(volatile u8 *)(uintptr_t)(req + FUSE_IN_HDR + n) = 0;
    fuse_hdr(req, FUSE_LOOKUP, 2, FUSE_ROOT_ID, n + 1);
    used = fuse_call(&q[FS_REQUEST_QUEUE], req, FUSE_IN_HDR + n + 1, reply, 2);
    if (used < 0) {
        fail("fs_lookup", used == -1 ? "no answer to FUSE_LOOKUP" : "FUSE_LOOKUP reply not ours");
        fail_end();
    } else if (rd32(reply + 4) != 0) {
        fail_hex("fs_lookup", "FUSE_LOOKUP error ", rd32(reply + 4));
    } else if (used < FUSE_OUT_HDR + 40 + 16) {
        fail_hex("fs_lookup", "short reply ", (u64)used);
    } else if (rd64(reply + FUSE_OUT_HDR + 40 + 8) != want) {
        fail_hex("fs_lookup", "size ", rd64(reply + FUSE_OUT_HDR + 40 + 8));
    } else {
        ok("fs_lookup");
    }
}

/* Parses "<size>@<base>:<irq>" (size with optional K/M suffix). */
static int parse_mmio_dev(const char *s, u64 *size, u64 *base, u64 *irq) {
    u64 v = 0;
    int n = 0;
    for (; *s >= '0' && *s <= '9'; s++, n++) v = v * 10 + (u64)(*s - '0');
    if (!n) return 0;
    if (*s == 'K' || *s == 'k') v <<= 10, s++;
    else if (*s == 'M' || *s == 'm') v <<= 20, s++;
    *size = v;
    if (*s++ != '@') return 0;
    if (s[0] != '0' || s[1] != 'x') return 0;
    s += 2;
    v = 0;
    n = 0;
    for (;; s++, n++) {
        int d;
        if (*s >= '0' && *s <= '9') d = *s - '0';
        else if (*s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
        else break;
        v = (v << 4) | (u64)d;
    }
    if (!n || *s++ != ':') return 0;
    *base = v;
    return parse_u64(s, 10, irq);
}

/* Drives every virtio-mmio device named on the command line, then reports devices the
 * command line expects (probe.blkN_sum, probe.vsock_port, probe.fs_file) that were not found. */
static void check_virtio_mmio(void) {
    static const char key[] = "virtio_mmio.device=";
    char name[32], pkey[40];
    u64 ndev = 0, nblk = 0, nvsock = 0, nfs = 0, nnet = 0;
    for (const char *p = cmdline; *p;) {
        while (is_space(*p)) p++;
        const char *k = key, *q = p;
        while (*k && *q == *k) k++, q++;
        if (!*k) {
            u64 size, base, irq;
            nm(name, "virtio", ndev++, "");
            if (!parse_mmio_dev(q, &size, &base, &irq) || size < 0x200) {
                fail(name, "cannot parse virtio_mmio.device");
                fail_end();
            } else if (rd32(base + VM_MAGIC) != VIRTIO_MAGIC) {
                fail(name, "no device at ");
                puthex(base);
                puts_(" magic=");
                puthex(rd32(base + VM_MAGIC));
                fail_end();
            } else if (rd32(base + VM_VERSION) != 2) {
                fail_hex(name, "version ", rd32(base + VM_VERSION));
            } else {
                u32 id = rd32(base + VM_DEVICE_ID);
                if (id == 1) {
                    ok(name);
                    check_net(base, nnet++);
                } else if (id == 2) {
                    ok(name);
                    check_blk(base, nblk++);
                } else if (id == 19) {
                    ok(name);
                    nvsock++;
                    check_vsock(base);
                } else if (id == 26) {
                    ok(name);
                    nfs++;
                    check_fs(base);
                } else {
                    fail_hex(name, "unknown device id ", id);
                }
            }
        }
        while (*p && !is_space(*p)) p++;
    }
    for (u64 i = nblk; i < 8; i++) {
        if (param(nm(pkey, "probe.blk", i, "_sum"))) {
            fail(nm(name, "blk", i, ""), "expected by the command line but not found");
            fail_end();
        }
    }
    for (u64 i = nnet; i < 8; i++) {
        if (param(nm(pkey, "probe.net", i, "_mac"))) {
            fail(nm(name, "net", i, ""), "expected by the command line but not found");
            fail_end();
        }
    }
    if (!nvsock && param("probe.vsock_port")) {
        fail("vsock", "expected by the command line but not found");
        fail_end();
    }
    if (!nfs && param("probe.fs_file")) {
        fail("fs", "expected by the command line but not found");
        fail_end();
    }
}

static void __attribute__((noreturn)) triple_fault(void) {
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } idtr = {0, 0};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    __asm__ volatile("ud2");
    for (;;) __asm__ volatile("hlt");
}

static void __attribute__((noreturn)) spin(void) {
    volatile u64 *counter = (volatile u64 *)PROBE_COUNTER_ADDR;
    *counter = 0;
    for (;;) *counter = *counter + 1;
}

static void __attribute__((noreturn)) reset(void) {
    outb(0x64, 0xfe);
    for (;;) __asm__ volatile("cli; hlt");
}

void probe_main(u64 bp) {
    u64 flag;
    serial_init();
    puts_("PROBE start boot_params=");
    puthex(bp);
    putc_('\n');
    check_boot_params(bp);
    e820_n = rd8(bp + BP_E820_ENTRIES) <= 128 ? rd8(bp + BP_E820_ENTRIES) : 0;
    check_cmdline(bp);
    check_e820(bp);
    check_initrd(bp);
    check_cpus();
    check_virtio_mmio();
    puts_("PROBE done ");
    putdec(passed);
    putc_('/');
    putdec(total);
    putc_('\n');
    if (parse_u64(param("probe.triple_fault"), 10, &flag) && flag) {
        puts_("PROBE triple_fault now\n");
        triple_fault();
    }
    if (parse_u64(param("probe.spin"), 10, &flag) && flag) {
        puts_("PROBE spin counter=");
        puthex(PROBE_COUNTER_ADDR);
        putc_('\n');
        spin();
    }
    reset();
}
