#!/usr/bin/env bash
# Installs what building and testing snapfw needs, idempotently: QEMU, iPXE ROMs, GRUB for
# BIOS, xorriso and mtools (grub-mkrescue), qemu-img, the NBD client tools (libnbd-bin:
# nbdinfo, nbdcopy) and fio for the network block device tests; and the Rust target from
# rust-toolchain.toml. Packages already present are left alone; apt-get update runs only
# when something is missing.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd qemu-system-x86_64 || need+=(qemu-system-x86)
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || [ -e /usr/share/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
[ -d /usr/lib/grub/i386-pc ] || need+=(grub-pc-bin)
have_cmd grub-mkrescue || need+=(grub-common)
have_cmd xorriso || need+=(xorriso)
have_cmd mformat || need+=(mtools)
have_cmd qemu-img || need+=(qemu-utils)
have_cmd objcopy || need+=(binutils)
have_cmd nbdinfo || need+=(libnbd-bin)
have_cmd fio || need+=(fio)

if [ ${#need[@]} -gt 0 ]; then
    echo "deps: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # One transaction first; if apt refuses (held or conflicting packages), one at a time so
    # a single problem does not block the rest.
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; then
        for p in "${need[@]}"; do $SUDO apt-get install -y -qq --no-install-recommends "$p" || true; done
    fi
fi

# rustup reads rust-toolchain.toml and installs the pinned toolchain, target and components.
if have_cmd rustup; then
    rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
    rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-none || rustup target add x86_64-unknown-none
fi

missing=()
for c in qemu-system-x86_64 grub-mkrescue xorriso qemu-img objcopy cargo; do have_cmd "$c" || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: still missing: ${missing[*]}" >&2
    exit 1
fi
