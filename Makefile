# snapfw: the front door. `make run` boots the appliance in QEMU; `make test` runs every test.
SHELL       := /bin/bash
CARGO       ?= cargo
TARGET      := x86_64-unknown-none
PROFILE     ?= release
BUILD       := build
IMAGE       := $(BUILD)/snapfw.elf
ISO         := $(BUILD)/snapfw.iso
PXE_DIR     := $(BUILD)/pxe
KERNEL_OUT  := $(or $(CARGO_TARGET_DIR),target)/$(TARGET)/$(PROFILE)/snapfw
QEMU        ?= qemu-system-x86_64
ACCEL       ?= tcg
MACHINE     ?= q35
MEMORY      ?= 512M
APPEND      ?= console=ttyS0,115200 loglevel=info
# `make run` forwards this host port (on 127.0.0.1 only) to the appliance's NBD server.
NBD_PORT    ?= 10809
DEMO_DISKS  := $(BUILD)/disks/vda.img $(BUILD)/disks/vdb.img $(BUILD)/disks/nvme0n1.img

CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: all deps build run test test-host test-qemu check fmt clippy iso pxe bench doc clean fuzz fuzz-cmin

all: build

deps:
	@./scripts/deps.sh

# The image: the kernel ELF with debug info stripped (the unstripped one stays in target/).
build:
	$(CARGO) build -p kernel --bin snapfw --target $(TARGET) $(CARGO_PROFILE_FLAG)
	@mkdir -p $(BUILD)
	objcopy --strip-debug $(KERNEL_OUT) $(IMAGE)
	@echo "image: $(IMAGE) ($$(stat -c %s $(IMAGE)) bytes)"

$(BUILD)/disks/%.img:
	@mkdir -p $(BUILD)/disks
	qemu-img create -f raw $@ 256M >/dev/null

# Boots the appliance with demo disks (two virtio-blk, one NVMe namespace) and a NIC on QEMU
# user networking (the NBD port forwarded from 127.0.0.1:$(NBD_PORT)); the console is this
# terminal.
# Leave QEMU with `poweroff` at the prompt, or Ctrl-A then X.
run: deps build $(DEMO_DISKS)
	@echo "snapfw: booting in QEMU ($(ACCEL)). Leave with 'poweroff' or Ctrl-A X."
	$(QEMU) -accel $(ACCEL) -M $(MACHINE) -m $(MEMORY) -display none -serial mon:stdio \
	    -kernel $(IMAGE) -append "$(APPEND)" \
	    -drive file=$(BUILD)/disks/vda.img,if=none,format=raw,id=vda,cache=none,aio=threads \
	    -device virtio-blk-pci,drive=vda,serial=SNAPFW-VDA \
	    -drive file=$(BUILD)/disks/vdb.img,if=none,format=raw,id=vdb,cache=none,aio=threads \
	    -device virtio-blk-pci,drive=vdb,serial=SNAPFW-VDB \
	    -device nvme,id=nvme0,serial=SNAPFW-NVME \
	    -drive file=$(BUILD)/disks/nvme0n1.img,if=none,format=raw,id=nvme0n1,cache=none,aio=threads \
	    -device nvme-ns,drive=nvme0n1,bus=nvme0,nsid=1 \
	    -netdev user,id=net0,hostfwd=tcp:127.0.0.1:$(NBD_PORT)-:10809 \
	    -device virtio-net-pci,netdev=net0

iso: build
	./scripts/mkiso.sh $(IMAGE) $(ISO)

# The PXE folder: snapfw.elf, boot.ipxe (BIOS iPXE boots the image, UEFI iPXE chains GRUB's
# EFI netboot image) and that image with its menu.
pxe: build
	./scripts/mkpxe.sh $(IMAGE) $(PXE_DIR)

# Every test: host unit tests, then QEMU tests that boot the real image every way.
# The snapshot crate's crash enumeration prints how many crash states it checked; its log
# is kept in build/snapshot-tests.log and the counts are summed here.
test: deps build iso pxe
	SNAPFW_BUILD=$(CURDIR)/$(BUILD) ACCEL=$(ACCEL) $(CARGO) test --workspace --exclude snapshot --release -- --test-threads=2
	@if ! $(CARGO) test -p snapshot --release -- --nocapture > $(BUILD)/snapshot-tests.log 2>&1; then \
	    tail -n 150 $(BUILD)/snapshot-tests.log; echo "snapshot tests failed (log: $(BUILD)/snapshot-tests.log)"; exit 1; fi
	@grep -E "^test result|CRASH STATES CHECKED|negative control" $(BUILD)/snapshot-tests.log
	@grep -E "crash states checked" $(BUILD)/snapshot-tests.log | awk '{n += $$(NF-3)} END {print "snapshot crash enumeration: " n " crash states checked in this run"}'

# Benchmarks (not tests): the appliance's disk path in QEMU, then the snapshot engine's
# deterministic host bench.
bench: deps build
	SNAPFW_BUILD=$(CURDIR)/$(BUILD) ACCEL=$(ACCEL) $(CARGO) run --release -q -p tests --bin bench
	$(CARGO) run --release -q -p snapshot --example bench

# Fuzzing (not part of `make test`, which replays the corpora): every cargo fuzz target of
# tests/fuzz for FUZZ_TIME seconds under a memory limit (scripts/fuzz.sh; FUZZ_TARGETS to
# pick some). New inputs land in tests/fuzz/corpus/TARGET/; `make fuzz-cmin` minimises them.
FUZZ_TIME    ?= 60
FUZZ_TARGETS ?=
fuzz:
	FUZZ_TIME=$(FUZZ_TIME) CARGO=$(CARGO) ./scripts/fuzz.sh $(FUZZ_TARGETS)

fuzz-cmin:
	CARGO=$(CARGO) ./scripts/fuzz.sh --cmin $(FUZZ_TARGETS)

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p kernel -p nbd -p volume -p drivers -p boot -p snapshot --target $(TARGET) -- -D warnings
	./scripts/unsafe-allowlist.sh

doc:
	$(CARGO) doc --workspace --no-deps

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
