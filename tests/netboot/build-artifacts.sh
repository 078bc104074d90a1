#!/usr/bin/env bash
# Builds what the netboot tests boot, from Debian packages, and caches it:
#   vmlinuz     Debian's kernel (the linux-image package unpacked with dpkg, not installed)
#   initrd.img  busybox-static, Debian's nbd-client with its libraries, the kernel modules
#               a virtio NIC, a virtio disk (the agent's cache), NBD and ext4 need, and
#               init.sh as /init (the agent test appends osstream-agent in a second cpio)
#   root.img    a 32 MiB ext4 file system (mkfs.ext4 -d) holding the marker the test reads
#   san.img     a 16 MiB disk whose boot sector (sanboot.asm) reads and prints a marker
# Usage: build-artifacts.sh [OUT]   (default: ~/.cache/osstream-test/netboot)
# Needs: apt-get (download only), dpkg, busybox-static, nbd-client, cpio, mkfs.ext4, nasm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/osstream-test/netboot}"
# Bump when what is built changes, so caches rebuild.
version="v1-$(sha256sum "$here/init.sh" "$here/sanboot.asm" "$0" | sha256sum | cut -c1-12)"
if [ -f "$out/.built-$version" ]; then
  exit 0
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== netboot artifacts: downloading the kernel package"
pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
(cd "$work" && apt-get download -qq "$pkg")
dpkg -x "$work"/"$pkg"_*.deb "$work/kernel"
kver="$(ls "$work/kernel/lib/modules")"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

echo "== netboot artifacts: initramfs for $kver"
root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,etc,lib/modules,run,tmp}
cp /bin/busybox "$root/bin/busybox"
cp "$here/init.sh" "$root/init"
chmod 755 "$root/init"
# Debian's nbd-client and the shared libraries it needs, at the paths ldd gives.
cp /usr/sbin/nbd-client "$root/bin/nbd-client"
ldd /usr/sbin/nbd-client | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Modules and their dependencies, listed in load order (dependencies first).
moddir="$work/kernel/lib/modules/$kver"
declare -A seen=()
order=()
add_module() {
  local name="$1" file deps dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  file="$(find "$moddir" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)"
  if [ -z "$file" ]; then
    return 0 # built into the kernel
  fi
  deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -n1 | cut -d= -f2 | tr ',' ' ')"
  for dep in $deps; do add_module "$dep"; done
  cp "$file" "$root/lib/modules/"
  order+=("$(basename "$file")")
}
for m in virtio_pci virtio_net virtio_blk e1000 nbd crc32c_generic ext4; do add_module "$m"; done
printf '%s\n' "${order[@]}" > "$root/lib/modules/load-order"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.img"

echo "== netboot artifacts: root file system"
rootfs="$work/rootfs"
mkdir -p "$rootfs/etc"
echo "osstream-netboot-marker-7d3f" > "$rootfs/marker.txt"
echo "streamed root of the netboot tests" > "$rootfs/etc/motd"
rm -f "$out/root.img"
mkfs.ext4 -q -F -L osstream-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$rootfs" "$out/root.img" 32M

echo "== netboot artifacts: HTTP SAN disk"
nasm -f bin -o "$work/sector.bin" "$here/sanboot.asm"
rm -f "$out/san.img"
truncate -s 16M "$out/san.img"
dd if="$work/sector.bin" of="$out/san.img" conv=notrunc status=none
printf 'sanboot: marker osstream-san-5c1e\r\n\0' | dd of="$out/san.img" bs=512 seek=2048 conv=notrunc status=none

rm -f "$out"/.built-*
touch "$out/.built-$version"
echo "== netboot artifacts ready in $out"
