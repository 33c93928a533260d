#!/usr/bin/env bash
# Installs what building and testing snapfw needs, idempotently: QEMU, iPXE ROMs, GRUB for
# BIOS, xorriso and mtools (grub-mkrescue), qemu-img, the NBD client tools (libnbd-bin:
# nbdinfo, nbdcopy) and fio for the network block device tests; and the Rust target from
# rust-toolchain.toml. Packages already present are left alone; apt-get update runs only
# when something is missing.
#
# Then the Linux guest of the interop tests (tests/tests/linux_interop.rs): Debian's cloud
# kernel, dmsetup with its libraries and busybox-static, fetched with `apt-get download` and
# unpacked with `dpkg-deb -x` under build/linux-guest/ (nothing is installed on the host, so
# no kernel hook runs), then scripts/linux-initramfs.sh packs the guest's initramfs. Done once:
# a second run finds build/linux-guest/ complete and does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

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

# --- The Linux guest -------------------------------------------------------------------------
guest=$here/build/linux-guest
guest_pkgs=(dmsetup libdevmapper1.02.1 libselinux1 libudev1 libpcre2-8-0 libc6 busybox-static)
if [ ! -s "$guest/vmlinuz" ] || [ ! -s "$guest/packages.txt" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # The kernel package the metapackage points at (e.g. linux-image-6.1.0-56-cloud-amd64);
    # apt's lists are refreshed once if apt does not know it (or any guest package) yet.
    kernel_pkg() {
        for meta in linux-image-cloud-amd64 linux-image-amd64; do
            apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' | grep . && return
        done
        return 1
    }
    if ! kpkg=$(kernel_pkg) || ! apt-cache show --no-all-versions "${guest_pkgs[@]}" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        kpkg=$(kernel_pkg) || { echo "deps: apt knows no linux-image-cloud-amd64 or linux-image-amd64" >&2; exit 1; }
    fi
    echo "deps: fetching the Linux guest for the interop tests ($kpkg ${guest_pkgs[*]})"
    rm -rf "$guest"
    mkdir -p "$guest/debs" "$guest/root"
    # As root, apt's download sandbox user cannot write here: download as ourselves.
    sandbox=()
    [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
    (cd "$guest/debs" && apt-get -qq "${sandbox[@]}" download "$kpkg" "${guest_pkgs[@]}")
    for deb in "$guest"/debs/*.deb; do
        dpkg-deb -x "$deb" "$guest/root"
        dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$guest/packages.tmp"
    done
    rm -rf "$guest/debs"
    cp "$guest"/root/boot/vmlinuz-* "$guest/vmlinuz"
    mv "$guest/packages.tmp" "$guest/packages.txt"
fi
# Repacked whenever its script is newer than the initramfs.
if [ ! -s "$guest/initramfs.gz" ] || [ "$here/scripts/linux-initramfs.sh" -nt "$guest/initramfs.gz" ]; then
    "$here/scripts/linux-initramfs.sh" "$guest/root" "$guest/initramfs.gz"
fi

missing=()
for c in qemu-system-x86_64 grub-mkrescue xorriso qemu-img objcopy cargo; do have_cmd "$c" || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: still missing: ${missing[*]}" >&2
    exit 1
fi
