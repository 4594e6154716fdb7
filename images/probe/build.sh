#!/bin/sh
# Builds the Kiln probe guest with the host's gcc and binutils.
#   build.sh OUTDIR  ->  OUTDIR/probe.elf          (PVH note: PVH entry + 64-bit entry)
#                        OUTDIR/probe-linux64.elf  (no note: 64-bit boot protocol only)
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi
out=$1
src=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}
LD=${LD:-ld}
obj=$out/probe-obj
mkdir -p "$out" "$obj"

CFLAGS="-m64 -ffreestanding -fno-pic -fno-pie -mgeneral-regs-only -mno-red-zone \
-mcmodel=small -nostdlib -fno-stack-protector -fno-asynchronous-unwind-tables \
-fno-unwind-tables -fno-builtin -fno-tree-loop-distribute-patterns -fno-jump-tables \
-fcf-protection=none -O2 -Wall -Wextra -Werror"
LDFLAGS="-nostdlib -static -z noexecstack -z noseparate-code -z max-page-size=0x1000 \
--build-id=none --no-warn-rwx-segments -T $src/probe.ld"

for f in entry.S probe.c virtio.c blk.c net.c pvhnote.S; do
	# shellcheck disable=SC2086
	$CC $CFLAGS -c "$src/$f" -o "$obj/${f%.*}.o"
done

objs="$obj/entry.o $obj/probe.o $obj/virtio.o $obj/blk.o $obj/net.o"
# shellcheck disable=SC2086
$LD $LDFLAGS -o "$out/probe.elf" $objs "$obj/pvhnote.o"
# shellcheck disable=SC2086
$LD $LDFLAGS -o "$out/probe-linux64.elf" $objs
