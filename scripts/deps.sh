#!/usr/bin/env bash
# Installs what building and testing snapfw needs, idempotently, on the machine image as it
# comes new: the Debian packages in `tools` below (QEMU, iPXE ROMs, the OVMF UEFI firmware,
# GRUB for BIOS and for x86_64 EFI, xorriso and mtools for grub-mkrescue, qemu-utils, the NBD
# clients libnbd-bin, fio, nbdkit, and ip, unshare and nsenter for the tap test's network
# namespace) with apt-get when a tool they provide is missing, and the
# Rust target from rust-toolchain.toml.
#
# QEMU's packages are asked for as one set of one version: qemu-system-x86 and qemu-utils
# share qemu-system-common's files, so apt removes a qemu-utils of another version (the image
# ships a 10.0 backport; Debian's qemu-system-x86 is 7.2) when only qemu-system-x86 is asked
# for. Whatever an install removed is installed again before the final check, which names each
# missing tool and its package.
#
# Then the Linux guest of the interop tests (tests/tests/linux_interop.rs) and of the bench's
# Linux rows (tests/src/bin/bench/linux.rs): Debian's cloud kernel, busybox-static, dmsetup,
# fio and nbd-server with the library packages they depend on (followed through Depends and
# Pre-Depends, library packages only), fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` under build/linux-guest/ (nothing is installed on the host, so no kernel hook
# runs), then scripts/linux-initramfs.sh packs the guest's initramfs. Done once: a second run
# finds build/linux-guest/ complete (every package of `guest_pkgs` in its packages.txt) and
# does nothing.
#
# `deps.sh --packages-only` does the Debian packages and their check, nothing else.
# DEPS_ROOT prefixes the paths checked for files (tests/tests/deps_script.rs runs the script
# that way against fake apt-get, apt-cache and dpkg-query on PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DEPS_ROOT:-}
packages_only=false
case "${1:-}" in
    "") ;;
    --packages-only) packages_only=true ;;
    *) echo "usage: $0 [--packages-only]" >&2; exit 2 ;;
esac

# What the build, the tests and the bench run, and the package that provides it: a command,
# or an absolute path (alternatives separated by '|').
tools=(
    "qemu-system-x86_64 qemu-system-x86"
    "qemu-img qemu-utils"
    "qemu-io qemu-utils"
    "qemu-nbd qemu-utils"
    "/usr/lib/ipxe/qemu/efi-virtio.rom|/usr/share/qemu/efi-virtio.rom ipxe-qemu"
    "/usr/share/OVMF/OVMF_CODE_4M.fd|/usr/share/OVMF/OVMF_CODE.fd ovmf"
    "/usr/lib/grub/i386-pc grub-pc-bin"
    "/usr/lib/grub/x86_64-efi grub-efi-amd64-bin"
    "grub-mkrescue grub-common"
    "xorriso xorriso"
    "mformat mtools"
    "objcopy binutils"
    "nbdinfo libnbd-bin"
    "nbdcopy libnbd-bin"
    "fio fio"
    "nbdkit nbdkit"
    "ip iproute2"
    "unshare util-linux"
    "nsenter util-linux"
)
qemu_set=(qemu-system-x86 qemu-utils)

have_cmd() { command -v "$1" >/dev/null 2>&1; }
present() {
    local alt alts
    IFS='|' read -ra alts <<<"$1"
    for alt in "${alts[@]}"; do
        case "$alt" in
            /*) [ -e "$root$alt" ] && return 0 ;;
            *) have_cmd "$alt" && return 0 ;;
        esac
    done
    return 1
}
# The packages whose tools are missing, each once, in the table's order.
missing_packages() {
    local entry seen=" "
    for entry in "${tools[@]}"; do
        local what=${entry% *} pkg=${entry##* }
        if ! present "$what" && [[ $seen != *" $pkg "* ]]; then
            seen+="$pkg "
            echo "$pkg"
        fi
    done
}
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
candidate_version() { apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" {print $2; exit}'; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# Installs the packages named: one transaction first; if apt refuses (held or conflicting
# packages), one at a time so a single problem does not block the rest. A QEMU package among
# them brings the whole set, pinned to the version of qemu-system-x86 that is installed, or
# else the one apt would install (--allow-downgrades: the image's newer qemu-utils steps back).
apt_install() {
    local want=() p qemu=false
    for p in "$@"; do
        if [[ " ${qemu_set[*]} " == *" $p "* ]]; then qemu=true; else want+=("$p"); fi
    done
    if $qemu; then
        local v
        v=$(installed_version qemu-system-x86)
        [ -n "$v" ] || v=$(candidate_version qemu-system-x86)
        for p in "${qemu_set[@]}"; do want+=("$p${v:+=$v}"); done
    fi
    echo "deps: installing ${want[*]}"
    if ! $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${want[@]}"; then
        for p in "${want[@]}"; do
            $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "$p" || true
        done
    fi
}

mapfile -t need < <(missing_packages)
if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    apt_install "${need[@]}"
    # An install may remove what another package conflicts with: put back whatever is gone.
    mapfile -t again < <(missing_packages)
    if [ ${#again[@]} -gt 0 ]; then
        echo "deps: missing after the install, installing again: ${again[*]}"
        apt_install "${again[@]}"
    fi
fi

missing=()
for entry in "${tools[@]}"; do
    present "${entry% *}" || missing+=("${entry% *} (package ${entry##* })")
done
if ! $packages_only; then
    have_cmd cargo || missing+=("cargo (the Rust toolchain: install rustup, then run this again)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: still missing:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
$packages_only && exit 0

# rustup reads rust-toolchain.toml and installs the pinned toolchain, target and components.
if have_cmd rustup; then
    rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
    rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-none || rustup target add x86_64-unknown-none
fi

# --- The Linux guest -------------------------------------------------------------------------
guest=$here/build/linux-guest
guest_pkgs=(busybox-static dmsetup fio nbd-server)
# The packages named and the library packages they depend on (Depends and Pre-Depends whose
# names start with lib or zlib; the rest, such as nbd-server's debconf and adduser or fio's
# python3, is for scripts the guest never runs), one apt-cache call per level.
lib_closure() {
    local seen=" " level=("$@") next p
    while [ ${#level[@]} -gt 0 ]; do
        for p in "${level[@]}"; do seen+="$p "; done
        printf '%s\n' "${level[@]}"
        mapfile -t next < <(apt-cache depends --important "${level[@]}" 2>/dev/null |
            awk '$1 ~ /^(Pre)?Depends:$/ && $2 ~ /^(lib|zlib)/ {print $2}' | sort -u)
        level=()
        for p in "${next[@]}"; do [[ $seen == *" $p "* ]] || level+=("$p"); done
    done
}
guest_complete() {
    local p
    [ -s "$guest/vmlinuz" ] && [ -s "$guest/packages.txt" ] || return 1
    for p in "${guest_pkgs[@]}"; do grep -q "^$p " "$guest/packages.txt" || return 1; done
}
if ! guest_complete; then
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
    mapfile -t fetch < <(lib_closure "${guest_pkgs[@]}")
    echo "deps: fetching the Linux guest for the interop tests and the bench ($kpkg ${fetch[*]})"
    rm -rf "$guest"
    mkdir -p "$guest/debs" "$guest/root"
    # As root, apt's download sandbox user cannot write here: download as ourselves.
    sandbox=()
    [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
    (cd "$guest/debs" && apt-get -qq "${sandbox[@]}" download "$kpkg" "${fetch[@]}")
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

