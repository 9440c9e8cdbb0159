# joey — top-level entry points. On a fresh Debian 12 machine, as root:
#   make run    installs what is missing, builds everything, runs `joeyctl run -- uname -a`
#   make test   builds everything and runs every test
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo
JOEY_CACHE ?= /var/cache/joey
export JOEY_CACHE
GUEST_DIR := build/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/joey-agent
# The guest agent is optimised for size with LTO (6.9 -> 4.7 MB stripped): a smaller initramfs
# touches less guest memory (loaded, then unpacked) and unpacks faster (docs/performance.md).
# Only this build (its own --target directory) uses these; the host binaries keep the release profile.
AGENT_PROFILE := CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
# Extra cargo arguments for the agent (scripts/fault.sh: --features failpoints).
AGENT_FEATURES ?=
# The kernel QEMU boots: the ELF vmlinux through its PVH entry (faster than the bzImage).
GUEST_KERNEL := $(GUEST_DIR)/vmlinux
JOEYCTL := target/release/joeyctl
INSTALL_GUEST_DIR ?= /usr/share/joey/guest

.PHONY: all deps build agent kernel initrd guest l1-kernel nested-host install-guest run test unit-test integration-test fault bench fuzz clean

all: build guest

deps:
	bash scripts/deps.sh

# Progress lines for `make run`/`make test`: one short line per step; chatter goes to logs.
say = @echo "==> $(1)"
KERNEL_LOG := $(GUEST_DIR)/kernel-build.log

build: deps
	$(call say,workspace: cargo build --release (joeyctl, joey-monitor, joey-pool, containerd-shim-joey-v2))
	$(CARGO) build --release --bin joeyctl --bin joey-monitor --bin joey-pool --bin containerd-shim-joey-v2

agent: deps
	$(call say,agent: static joey-agent for the guest)
	RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" $(AGENT_PROFILE) $(CARGO) build --release -p joey-agent --target $(AGENT_TARGET) $(AGENT_FEATURES)

kernel: deps
	mkdir -p $(GUEST_DIR)
	$(call say,guest kernel: Debian linux-source-6.1 + guest/kernel.fragment (cached by input hash; a build takes ~6 min on 2 cores; log: $(KERNEL_LOG)))
	@d=$$(bash guest/build-kernel.sh 2>$(KERNEL_LOG)) || { tail -n 30 $(KERNEL_LOG); echo "guest kernel build failed; whole log: $(KERNEL_LOG)" >&2; exit 1; }; \
	  ln -sfn $$d/bzImage $(GUEST_DIR)/bzImage && ln -sfn $$d/vmlinux $(GUEST_DIR)/vmlinux && echo "    $$(tail -n 1 $(KERNEL_LOG))"

initrd: agent
	mkdir -p $(GUEST_DIR)
	$(call say,guest initramfs: agent + busybox-static (cached by input hash))
	d=$$(bash guest/build-initrd.sh $(AGENT_BIN)) && ln -sfn $$d/initrd.img $(GUEST_DIR)/initrd.img

guest: kernel initrd

# The nested test host (scripts/nested-host.sh, docs/testing.md): its L1 kernel, and a shell in it.
L1_DIR := build/l1
l1-kernel: deps
	mkdir -p $(L1_DIR)
	$(call say,L1 kernel of the nested test host: guest/kernel.fragment + guest/l1/kernel.fragment (cached by input hash; ~6 min to build; log: $(L1_DIR)/kernel-build.log))
	@d=$$(bash guest/build-kernel.sh guest/l1/kernel.fragment 2>$(L1_DIR)/kernel-build.log) || { tail -n 30 $(L1_DIR)/kernel-build.log; exit 1; }; ln -sfn $$d/vmlinux $(L1_DIR)/vmlinux

nested-host: build guest l1-kernel
	bash scripts/nested-host.sh

install-guest: guest
	$(call say,install guest image to $(INSTALL_GUEST_DIR))
	install -d $(INSTALL_GUEST_DIR)
	install -m 0644 $(GUEST_DIR)/bzImage $(INSTALL_GUEST_DIR)/bzImage
	install -m 0644 $(GUEST_DIR)/initrd.img $(INSTALL_GUEST_DIR)/initrd.img
	install -m 0644 $(GUEST_DIR)/vmlinux $(INSTALL_GUEST_DIR)/vmlinux

run: build install-guest
	$(call say,demo: joeyctl run --timings -- uname -a)
	$(JOEYCTL) run --timings -- uname -a
	$(call say,demo: ctr run --runtime io.containerd.joey.v2 on a private containerd)
	bash scripts/demo-ctr.sh

# Every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each (CI-sized by default; e.g.
# `make fuzz FUZZ_SECONDS=600` for a long local run).
FUZZ_SECONDS ?= 20
fuzz: deps
	$(call say,fuzz: every target of fuzz/ for $(FUZZ_SECONDS) s (libFuzzer + ASAN))
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

unit-test: deps
	$(CARGO) test --release --workspace --exclude joey-tests

integration-test: build guest
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_MONITOR=$(CURDIR)/target/release/joey-monitor JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  $(CARGO) test --release -p joey-tests -- --test-threads=2

test: build guest
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_MONITOR=$(CURDIR)/target/release/joey-monitor JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/test.sh

# The fault-injection matrix (docs/faults.md): one table row per fault class, PASS/FAIL.
fault: build guest
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_MONITOR=$(CURDIR)/target/release/joey-monitor JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/fault.sh

bench: build guest
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_MONITOR=$(CURDIR)/target/release/joey-monitor JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/bench.sh
	JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/bench-ctr.sh
	JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/bench-net.sh
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/cri-bench.sh
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/bench-pool.sh
	JOEY_SHIM=$(CURDIR)/target/release/containerd-shim-joey-v2 JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/bench-density.sh
	$(CARGO) bench -p joey-vmm-core --bench probe_boot
	JOEYCTL=$(CURDIR)/$(JOEYCTL) JOEY_KERNEL=$(CURDIR)/$(GUEST_KERNEL) JOEY_INITRD=$(CURDIR)/$(GUEST_DIR)/initrd.img \
	  bash scripts/nested-bench.sh

clean:
	$(CARGO) clean
	rm -rf build
