#!/usr/bin/env bash
# Builds a real Debian 12 system the way its admins build one, as a vdisk, and caches it:
#   debian.img         1 GiB ext4: debootstrap minbase + systemd + nbd-client +
#                      initramfs-tools, the kernel's modules, a unit that prints a marker
#                      on ttyS0 once multi-user.target is reached and powers off
#   vmlinuz-debian     the kernel (Debian's linux-image package)
#   initrd-debian.img  the initramfs Debian's own update-initramfs made (its nbd hook
#                      mounts the root from nbdroot=... on the kernel command line)
# Usage: build-debian.sh [OUT]   (default: ~/.cache/osstream-test/netboot-debian)
# Needs: debootstrap, apt-get (download only), dpkg, mkfs.ext4; network access to the
# Debian mirror this machine's apt uses. Takes a few minutes the first time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/osstream-test/netboot-debian}"
version="v1-$(sha256sum "$0" | cut -c1-12)"
if [ -f "$out/.built-$version" ]; then
  exit 0
fi
mkdir -p "$out"
work="$(mktemp -d)"
root="$work/root"
cleanup() {
  for m in dev/pts dev proc sys; do umount "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
in_root() { env PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" "$@"; }

mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
  mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

echo "== debian vdisk: debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include=systemd-sysv,udev,dbus,kmod,procps,iproute2,ifupdown,nbd-client,initramfs-tools,zstd \
  bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

echo "== debian vdisk: kernel and its modules"
pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
(cd "$work" && apt-get download -qq "$pkg")
# Unpacked aside and copied in: unpacking into the root would replace its merged-/usr
# links (/lib -> usr/lib) with plain folders.
dpkg -x "$work"/"$pkg"_*.deb "$work/kernel"
kver="$(ls "$work/kernel/lib/modules")"
mkdir -p "$root/usr/lib/modules"
cp -a "$work/kernel/lib/modules/$kver" "$root/usr/lib/modules/"
cp -a "$work/kernel/boot/." "$root/boot/"

echo "== debian vdisk: configuration"
echo '/dev/nbd0 / ext4 errors=remount-ro 0 1' > "$root/etc/fstab"
# The initramfs configured eth0 and it carries the root: nothing may take it down.
printf 'auto lo\niface lo inet loopback\n' > "$root/etc/network/interfaces"
# The machine-id and hostname come from the kernel command line (one image, many machines).
: > "$root/etc/machine-id"
rm -f "$root/etc/hostname"
echo "osstream-debian-marker-91c2" > "$root/etc/osstream-marker"
cat > "$root/etc/systemd/system/osstream-marker.service" <<'UNIT'
[Unit]
Description=Say on the serial console that the system is up, then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "debian: marker=$(cat /etc/osstream-marker) hostname=$(hostname) machine_id=$(cat /etc/machine-id) target=$(systemctl is-active multi-user.target)" > /dev/ttyS0; echo "written by $(hostname)" > /root/written-by-$(hostname); sync; systemctl poweroff'

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/osstream-marker.service "$root/etc/systemd/system/multi-user.target.wants/osstream-marker.service"
# Root without a password, for the serial console.
sed -i "s/^root:[^:]*:/root::/" "$root/etc/shadow"
printf 'nbd\nvirtio_pci\nvirtio_net\n' >> "$root/etc/initramfs-tools/modules"

echo "== debian vdisk: update-initramfs -c -k $kver"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
in_root depmod "$kver"
in_root update-initramfs -c -k "$kver" > "$work/initramfs.log" 2>&1 || { tail -30 "$work/initramfs.log"; exit 1; }
for m in dev/pts dev proc sys; do umount "$root/$m"; done
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz-debian"
cp "$root/boot/initrd.img-$kver" "$out/initrd-debian.img"
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*

echo "== debian vdisk: ext4 image"
rm -f "$out/debian.img"
mkfs.ext4 -q -F -L debian-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$root" "$out/debian.img" 1G
rm -f "$out"/.built-*
touch "$out/.built-$version"
echo "== debian vdisk ready in $out ($(du -h "$out/initrd-debian.img" | cut -f1) initrd)"
