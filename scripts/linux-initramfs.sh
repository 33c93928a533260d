#!/usr/bin/env bash
# Packs the initramfs of the Linux guest used by the interop tests (tests/tests/linux_interop.rs)
# and the bench's Linux rows (tests/src/bin/bench/linux.rs) from Debian packages unpacked under
# ROOT (scripts/deps.sh fetches them): busybox-static; dmsetup, fio and nbd-server with the
# shared libraries the loader names for each; the kernel modules for virtio-blk, virtio-net and
# dm-snapshot (only those the kernel's config builds as modules, with their dependencies); and
# an /init that loads them, gives eth0 (if there is one) QEMU user networking's guest address
# 10.0.2.15/24 with the gateway 10.0.2.2, and then runs each line read from the serial console
# as a shell command (the test drives it like the appliance's console).
# Usage: linux-initramfs.sh ROOT OUT
set -euo pipefail
root=$(cd "$1" && pwd)
out=$2
busybox=$root/bin/busybox
[ -x "$busybox" ] || { echo "linux-initramfs: no busybox in $root (busybox-static)" >&2; exit 1; }
programs=(sbin/dmsetup usr/bin/fio bin/nbd-server)
for p in "${programs[@]}"; do
    [ -x "$root/$p" ] || { echo "linux-initramfs: no $p in $root" >&2; exit 1; }
done
version=$(basename "$(ls -d "$root"/lib/modules/*/ | head -n 1)")
config=$root/boot/config-$version
[ -f "$config" ] || { echo "linux-initramfs: no $config" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,etc,tmp,run,var}
ln -s ../run "$stage/var/run"

# busybox; its applet links are made by /init.
cp "$busybox" "$stage/bin/busybox"

# The programs and the libraries the extracted loader resolves for each, at the same paths
# (librados finds libceph-common by its RUNPATH, ceph/ under the library folder).
loader=$root/lib64/ld-linux-x86-64.so.2
libpath=$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/ceph
for p in "${programs[@]}"; do
    mkdir -p "$stage/$(dirname "$p")"
    cp "$root/$p" "$stage/$p"
    "$loader" --library-path "$libpath" --list "$root/$p" |
        awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}' |
        while read -r lib; do
            case $lib in "$root"/*) ;; *) echo "linux-initramfs: $p needs $lib, not under $root" >&2; exit 1 ;; esac
            rel=${lib#"$root"}
            mkdir -p "$stage/$(dirname "$rel")"
            cp -L "$lib" "$stage/$rel"
        done
done
[ -e "$stage/lib64/ld-linux-x86-64.so.2" ] || {
    mkdir -p "$stage/lib64"
    cp -L "$loader" "$stage/lib64/ld-linux-x86-64.so.2"
}

# Kernel modules: each feature the config builds as a module, with what modules.dep says it
# needs (busybox's depmod writes modules.dep into ROOT once; the package ships none).
mods=$root/lib/modules/$version
[ -f "$mods/modules.dep" ] || "$busybox" depmod -b "$root" "$version"
wanted=()
for pair in VIRTIO_PCI:virtio_pci VIRTIO_BLK:virtio_blk VIRTIO_NET:virtio_net BLK_DEV_DM:dm-mod DM_SNAPSHOT:dm-snapshot; do
    opt=${pair%%:*}
    mod=${pair#*:}
    case $(grep -E "^CONFIG_$opt=" "$config" | cut -d= -f2) in
        y) ;;
        m) wanted+=("$mod") ;;
        *) echo "linux-initramfs: $version has no CONFIG_$opt" >&2; exit 1 ;;
    esac
done
files=()
for mod in "${wanted[@]}"; do
    line=$(grep -E "/${mod}\.ko(\.[a-z]+)?:" "$mods/modules.dep") ||
        { echo "linux-initramfs: module $mod not found" >&2; exit 1; }
    files+=(${line//:/})
done
for f in $(printf '%s\n' "${files[@]}" | sort -u); do
    mkdir -p "$stage/lib/modules/$version/$(dirname "$f")"
    cp "$mods/$f" "$stage/lib/modules/$version/$f"
done
"$busybox" depmod -b "$stage" "$version"
printf '%s\n' "${wanted[@]}" >"$stage/etc/modules"

cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# The interop tests' and the bench's Linux guest: load the modules, set up the network, then run
# each line read from the console as a shell command (stdin /dev/null), until the test powers
# the machine off.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -s /etc/modules ] && modprobe -a $(cat /etc/modules)
# No udev here: libdevmapper makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1
stty -echo 2>/dev/null
ip link set lo up
# QEMU user networking (slirp): the guest address its hostfwd forwards to by default.
if [ -e /sys/class/net/eth0 ]; then
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2
fi
n=0
while [ ! -e /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
echo "linux-guest: ready ($(uname -r); disks: $(cd /sys/block && echo vd*))"
while IFS= read -r line; do
    sh -c "$line" </dev/null
done
poweroff -f
EOF
chmod 755 "$stage/init"

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -9 >"$out.tmp"
mv "$out.tmp" "$out"
echo "linux-initramfs: $out ($(stat -c %s "$out") bytes; kernel $version; modules: ${wanted[*]:-none})"
