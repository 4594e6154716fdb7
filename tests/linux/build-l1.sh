#!/usr/bin/env bash
# Builds the nested layer's L1: a Linux VM that QEMU's TCG runs with emulated AMD SVM, so that
# it has a real /dev/kvm in which Kiln boots the layer-3 guests (design/GUESTS.md, layer 3).
#
#   tests/linux/build-l1.sh OUT KILN GUESTS
#
# OUT/vmlinuz           L1's kernel: Debian's cloud kernel (ships kvm.ko and kvm-amd.ko)
# OUT/initramfs.cpio.gz busybox, the KVM/TAP/virtio-pci/loop modules, KILN with its libraries,
#                       curl, tests/linux/scenarios.sh and tests/linux/l1-init.sh as /init
# OUT/payload.ext4      GUESTS (tests/linux/prepare.sh), which L1 mounts read-only at /payload
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: build-l1.sh OUT KILN GUESTS}
KILN=${2:?usage: build-l1.sh OUT KILN GUESTS}
GUESTS=${3:?usage: build-l1.sh OUT KILN GUESTS}
CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
export PATH="$PATH:/usr/sbin:/sbin"
mkdir -p "$OUT"

# The base: the guest recipe's busybox initramfs with L1's modules in load order (cached).
KILN_GUEST_MODULES="virtio_pci virtio_blk loop tun irqbypass kvm kvm-amd" \
    bash images/guest/build-guest.sh "$CACHE/l1" >/dev/null
cp "$CACHE/l1/vmlinuz" "$OUT/vmlinuz"

# On top of it, a second archive (the kernel unpacks both; later files win): the L1 /init,
# the scenarios, kiln and curl with the shared libraries they load.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
S=$TMP/stage
mkdir -p "$S/bin" "$S/usr/bin"
install -m 0755 tests/linux/l1-init.sh "$S/init"
install -m 0755 tests/linux/scenarios.sh "$S/scenarios.sh"
install -m 0755 "$KILN" "$S/bin/kiln"
install -m 0755 "$(command -v curl)" "$S/usr/bin/curl"
for bin in "$KILN" "$(command -v curl)"; do
    ldd "$bin" | grep -oE '/[^ ]+' | while read -r lib; do
        mkdir -p "$S$(dirname "$lib")"
        cp -L "$lib" "$S$lib"
    done
done
(cd "$S" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 > "$TMP/top.cpio.gz"
cat "$CACHE/l1/initramfs.cpio.gz" "$TMP/top.cpio.gz" > "$OUT/initramfs.cpio.gz"

# The payload: GUESTS as an ext4 image, sized to its content.
kib=$(du -sk --apparent-size "$GUESTS" | cut -f1)
rm -f "$OUT/payload.ext4"
mkfs.ext4 -q -F -L kiln-payload -d "$GUESTS" "$OUT/payload.ext4" "$(( kib * 11 / 10 + 65536 ))K"
echo "L1=$OUT"
