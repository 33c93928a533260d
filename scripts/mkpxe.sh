#!/usr/bin/env bash
# Fills a PXE folder (TFTP or HTTP root) from which one DHCP boot file, boot.ipxe, boots the
# snapfw image on BIOS and on UEFI clients that run iPXE: snapfw.elf, boot.ipxe, and GRUB's
# x86_64 EFI netboot image (grub-mknetdir: boot/grub/x86_64-efi/core.efi and its modules) with
# its menu boot/grub/grub.cfg. UEFI firmware without iPXE can be given core.efi as its boot
# file directly (see README). Usage: mkpxe.sh IMAGE DIR
set -euo pipefail
image=$1
dir=$2
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d /usr/lib/grub/x86_64-efi ]; then
    echo "mkpxe: GRUB for x86_64-efi is missing (/usr/lib/grub/x86_64-efi): run \`make deps\`" >&2
    exit 1
fi
mkdir -p "$dir"
rm -rf "$dir/boot"
cp "$image" "$dir/snapfw.elf"
cp "$here/boot/ipxe/boot.ipxe" "$dir/boot.ipxe"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Only the modules the menu needs, so GRUB fetches few files by TFTP (and the folder stays small).
grub-mknetdir --net-directory="$dir" --subdir=boot/grub -d /usr/lib/grub/x86_64-efi \
    --locales= --fonts= --themes= \
    --install-modules="normal echo test multiboot2 serial terminal efinet tftp net" \
    --modules="normal echo test multiboot2 serial terminal efinet tftp net" \
    >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
cp "$here/boot/grub/grub-net.cfg" "$dir/boot/grub/grub.cfg"
[ -s "$dir/boot/grub/x86_64-efi/core.efi" ] || { echo "mkpxe: grub-mknetdir made no core.efi" >&2; exit 1; }
echo "PXE folder: $dir (boot file boot.ipxe; UEFI without iPXE: boot/grub/x86_64-efi/core.efi)"
