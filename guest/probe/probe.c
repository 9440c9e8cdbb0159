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

/* LATER: virtio-mmio device checks (discover devices from the command line,
 * negotiate features, drive a queue) go here, each reporting ok/FAIL. */
static void check_virtio_mmio(void) {}

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
