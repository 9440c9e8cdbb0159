// kvm-probe: the nested test host's helper (scripts/nested-host.sh), built on the host with gcc.
//
//   kvm-probe run       (in L1) one tiny KVM guest: 16-bit code at GPA 0 writes 0x4a to I/O port
//                       0x10 and halts. Prints "kvm-probe: ok ..." and exits 0 when KVM_RUN gives
//                       exactly that I/O exit, then the HLT exit; otherwise says why and exits 1.
//                       A KVM whose clock cannot be set up (L1 booted with a TSC rate of 0) spins
//                       in KVM_RUN forever: the caller runs this under a deadline.
//   kvm-probe tsc-khz   (on the host) prints the TSC rate in kHz, measured against
//                       CLOCK_MONOTONIC_RAW (QEMU-TCG gives its guest the host's TSC).
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "kvm-probe: %s: %s\n", what, strerror(errno));
    return 1;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_RAW, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int run_probe(void) {
    // mov al, 0x4a ; out 0x10, al ; hlt
    static const uint8_t code[] = {0xb0, 0x4a, 0xe6, 0x10, 0xf4};
    uint64_t t0 = now_ns();
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        return fail("KVM_GET_API_VERSION");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return fail("mmap guest memory");
    memcpy(mem, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = 0x1000, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return fail("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        return fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return fail("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        return fail("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return fail("KVM_SET_REGS");
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        return fail("first KVM_RUN");
    const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT || run->io.port != 0x10 ||
        run->io.size != 1 || run->io.count != 1 || data[0] != 0x4a) {
        fprintf(stderr, "kvm-probe: first exit is reason %u (port 0x%x), not `out 0x10, 0x4a`\n",
                run->exit_reason, run->io.port);
        return 1;
    }
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        return fail("second KVM_RUN");
    if (run->exit_reason != KVM_EXIT_HLT) {
        fprintf(stderr, "kvm-probe: second exit is reason %u, not HLT\n", run->exit_reason);
        return 1;
    }
    printf("kvm-probe: ok (KVM_RUN: out + hlt, %llu us)\n", (unsigned long long)((now_ns() - t0) / 1000));
    return 0;
}

static uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

// Median of five 20 ms samples, so that one preemption between the two clock reads does not count.
static int tsc_khz(void) {
    uint64_t khz[5];
    for (int i = 0; i < 5; i++) {
        uint64_t n0 = now_ns(), c0 = rdtsc();
        struct timespec d = {0, 20 * 1000 * 1000};
        nanosleep(&d, NULL);
        uint64_t n1 = now_ns(), c1 = rdtsc();
        khz[i] = (c1 - c0) * 1000000u / (n1 - n0);
    }
    for (int i = 1; i < 5; i++)
        for (int j = i; j > 0 && khz[j - 1] > khz[j]; j--) {
            uint64_t t = khz[j];
            khz[j] = khz[j - 1];
            khz[j - 1] = t;
        }
    printf("%llu\n", (unsigned long long)khz[2]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "run") == 0)
        return run_probe();
    if (argc == 2 && strcmp(argv[1], "tsc-khz") == 0)
        return tsc_khz();
    fprintf(stderr, "usage: kvm-probe run|tsc-khz\n");
    return 2;
}
