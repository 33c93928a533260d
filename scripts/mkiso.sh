#!/usr/bin/env bash
# Builds a BIOS-bootable GRUB ISO whose menu boots the snapfw image by `multiboot` (default)
# or `multiboot2`, with GRUB's menu on the serial line. Usage: mkiso.sh IMAGE ISO
set -euo pipefail
image=$1
iso=$2
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/boot/grub"
cp "$image" "$work/boot/snapfw.elf"
cp "$here/boot/grub/grub.cfg" "$work/boot/grub/grub.cfg"
grub-mkrescue --output="$iso" --compress=xz "$work" >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
echo "ISO: $iso ($(stat -c %s "$iso") bytes)"
