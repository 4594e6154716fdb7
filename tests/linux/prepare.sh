#!/usr/bin/env bash
# Builds (cached) every guest the layer-3 scenarios boot, from Debian packages only, and lays
# them out in OUT as tests/linux/scenarios.sh expects them (GUESTS):
#   cloud/{vmlinux,vmlinuz,initramfs.cpio.gz,rootfs.ext4}   Debian's cloud kernel + busybox guest
#   generic/{vmlinuz,initramfs.cpio.gz}                     Debian's generic kernel (ext4 as a module)
#   distro-root.ext4                                        debootstrap minbase + systemd
#   blk/{base.ext4,overlay.qcow2}                           a qcow2 overlay on a raw ext4 base
#
#   tests/linux/prepare.sh OUT        (root needed for debootstrap; caches in ~/.cache/kiln)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: prepare.sh OUT}
CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
GUEST=images/guest

bash $GUEST/build-guest.sh "$CACHE/guest" >/dev/null
KILN_GUEST_KERNEL_PKG=linux-image-amd64 \
KILN_GUEST_MODULES="virtio_mmio virtio_blk virtio_net ext4 crc32c_generic button evdev" \
    bash $GUEST/build-guest.sh "$CACHE/guest-generic" >/dev/null
bash $GUEST/build-distro-root.sh "$CACHE/guest" >/dev/null

rm -rf "$OUT"
mkdir -p "$OUT/cloud" "$OUT/generic" "$OUT/blk"
# Hard links where the cache shares the file system (no copy), else copies; never symlinks
# (kiln serve's --image-dir resolves them, and the nested layer packs OUT into an image).
put() { ln -f "$1" "$2" 2>/dev/null || cp --sparse=always "$1" "$2"; }
for f in vmlinux vmlinuz initramfs.cpio.gz rootfs.ext4; do put "$CACHE/guest/$f" "$OUT/cloud/$f"; done
for f in vmlinuz initramfs.cpio.gz; do put "$CACHE/guest-generic/$f" "$OUT/generic/$f"; done
put "$CACHE/guest/distro-root.ext4" "$OUT/distro-root.ext4"
cp --sparse=always "$CACHE/guest/rootfs.ext4" "$OUT/blk/base.ext4"
# The backing file is named relative to the overlay, so the pair can move together.
(cd "$OUT/blk" && qemu-img create -q -f qcow2 -b base.ext4 -F raw overlay.qcow2)
echo "GUESTS=$OUT"
