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
DEMO_DISKS  := $(BUILD)/disks/vda.img $(BUILD)/disks/vdb.img

CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: all deps build run test test-host test-qemu check fmt clippy iso pxe bench doc clean

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

# Boots the appliance with two demo disks; the console is this terminal.
# Leave QEMU with `poweroff` at the prompt, or Ctrl-A then X.
run: deps build $(DEMO_DISKS)
	@echo "snapfw: booting in QEMU ($(ACCEL)). Leave with 'poweroff' or Ctrl-A X."
	$(QEMU) -accel $(ACCEL) -M $(MACHINE) -m $(MEMORY) -display none -serial mon:stdio \
	    -kernel $(IMAGE) -append "$(APPEND)" \
	    -drive file=$(BUILD)/disks/vda.img,if=none,format=raw,id=vda,cache=none,aio=threads \
	    -device virtio-blk-pci,drive=vda,serial=SNAPFW-VDA \
	    -drive file=$(BUILD)/disks/vdb.img,if=none,format=raw,id=vdb,cache=none,aio=threads \
	    -device virtio-blk-pci,drive=vdb,serial=SNAPFW-VDB

iso: build
	./scripts/mkiso.sh $(IMAGE) $(ISO)

pxe: build
	@mkdir -p $(PXE_DIR)
	cp $(IMAGE) $(PXE_DIR)/snapfw.elf
	cp boot/ipxe/boot.ipxe $(PXE_DIR)/boot.ipxe
	@echo "PXE folder: $(PXE_DIR) (serve it by TFTP/HTTP; boot file boot.ipxe)"

# Every test: host unit tests, then QEMU tests that boot the real image every way.
test: deps build iso pxe
	SNAPFW_BUILD=$(CURDIR)/$(BUILD) ACCEL=$(ACCEL) $(CARGO) test --workspace --release -- --test-threads=2

# Benchmarks (not tests): the appliance's disk path in QEMU, then the snapshot engine's
# deterministic host bench.
bench: deps build
	SNAPFW_BUILD=$(CURDIR)/$(BUILD) ACCEL=$(ACCEL) $(CARGO) run --release -q -p tests --bin bench
	$(CARGO) run --release -q -p snapshot --example bench

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p kernel -p drivers -p boot -p snapshot --target $(TARGET) -- -D warnings
	./scripts/unsafe-allowlist.sh

doc:
	$(CARGO) doc --workspace --no-deps

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
