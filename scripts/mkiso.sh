#!/usr/bin/env bash
# Builds one hybrid ISO that boots under BIOS and under UEFI (x86_64): grub-mkrescue puts
# GRUB for both platforms on it (the El Torito BIOS image and an EFI system partition image).
# Its menu (boot/grub/grub.cfg) boots the snapfw image by `multiboot` or `multiboot2`
# (the default under UEFI), on the serial line and the screen. Usage: mkiso.sh IMAGE ISO
set -euo pipefail
image=$1
iso=$2
here=$(cd "$(dirname "$0")/.." && pwd)
for platform in i386-pc x86_64-efi; do
    if [ ! -d "/usr/lib/grub/$platform" ]; then
        echo "mkiso: GRUB for $platform is missing (/usr/lib/grub/$platform): run \`make deps\`" >&2
        exit 1
    fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/iso/boot/grub"
cp "$image" "$work/iso/boot/snapfw.elf"
cp "$here/boot/grub/grub.cfg" "$work/iso/boot/grub/grub.cfg"
grub-mkrescue --output="$iso" --compress=xz "$work/iso" >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
# Both platforms made it into the El Torito catalogue.
catalogue=$(xorriso -indev "$iso" -report_el_torito plain 2>/dev/null)
for platform in BIOS UEFI; do
    if ! grep -Eq "^El Torito boot img : +[0-9]+ +$platform " <<<"$catalogue"; then
        echo "mkiso: $iso has no $platform boot image" >&2
        exit 1
    fi
done
echo "ISO: $iso ($(stat -c %s "$iso") bytes; BIOS and UEFI)"
