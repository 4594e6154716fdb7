#!/usr/bin/env bash
# Kiln distro-guest recipe (layers 2 and 3 of design/GUESTS.md).
#
# Builds, from Debian packages only and without installing anything on the
# host, a cached set of guest artefacts:
#   vmlinuz            Debian cloud kernel (bzImage)
#   vmlinux            the ELF kernel decompressed from vmlinuz (PVH entry)
#   kernel-version     the kernel release (uname -r)
#   initramfs.cpio.gz  busybox + virtio-mmio modules + a marker-printing /init
#   rootfs.ext4        a small ext4 root image carrying /kiln-marker
# Run with --help for usage.
set -euo pipefail

# Bump when the layout of the outputs changes in a way the stamps cannot see.
RECIPE_VERSION=1

PROG=${0##*/}
KERNEL_META_PKG=${KILN_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
BUSYBOX_PKG=busybox-static
GUEST_MODULES=${KILN_GUEST_MODULES:-virtio_mmio virtio_blk virtio_net button evdev}
ROOTFS_SIZE=${KILN_GUEST_ROOTFS_SIZE:-64M}
EPOCH=${SOURCE_DATE_EPOCH:-0}

# depmod, modprobe and mkfs.ext4 live in sbin, which is not in a normal user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

usage() {
    cat <<EOF
Usage: $PROG [--kernel-only] [CACHE_DIR]

Build Kiln's distro guest from Debian packages (apt-get download + dpkg-deb -x;
nothing is installed on the host) into CACHE_DIR, which defaults to
\${KILN_GUEST_CACHE:-\$HOME/.cache/kiln/guest}.

Outputs (in CACHE_DIR):
  vmlinuz            the Debian cloud kernel ($KERNEL_META_PKG), a bzImage
  vmlinux            the ELF kernel extracted from vmlinuz (has the Xen PVH note)
  kernel-version     the kernel release string (uname -r)
  initramfs.cpio.gz  busybox initramfs; loads the virtio-mmio modules and prints
                     KILN-GUEST-READY (see images/guest/README.md)
  rootfs.ext4        $ROOTFS_SIZE ext4 image containing /kiln-marker ("kiln-rootfs")

Steps whose outputs exist and whose recorded package versions (stamp files
.stamp-*) match what apt resolves now are skipped. Downloaded packages are kept
in CACHE_DIR/debs (safe to delete).

Options:
  --kernel-only   build only vmlinuz, vmlinux and kernel-version
  -h, --help      show this help

On success the produced paths are printed on stdout as NAME=PATH lines;
progress goes to stderr.

Environment:
  KILN_GUEST_CACHE        default cache directory
  KILN_GUEST_KERNEL_PKG   kernel metapackage (default linux-image-cloud-amd64)
  KILN_GUEST_MODULES      modules for the initramfs (default "$GUEST_MODULES")
  KILN_GUEST_ROOTFS_SIZE  size of rootfs.ext4 (default 64M)
  SOURCE_DATE_EPOCH       timestamp for files in the images (default 0)

Needs: apt-get, apt-cache, dpkg-deb, lz4, readelf (binutils), and unless
--kernel-only: cpio, gzip, depmod/modprobe (kmod), mkfs.ext4/debugfs/e2fsck
(e2fsprogs). Kernels compressed otherwise than LZ4 (6.12 uses zstd) need that
decompressor; .ko.xz modules need xz (xz-utils).
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments
KERNEL_ONLY=0
CACHE_DIR=
while [ $# -gt 0 ]; do
    case $1 in
        --kernel-only) KERNEL_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [ -z "$CACHE_DIR" ] || die "more than one CACHE_DIR given (see --help)"
            CACHE_DIR=$1 ;;
    esac
    shift
done
if [ $# -gt 0 ]; then
    [ -z "$CACHE_DIR" ] && [ $# -eq 1 ] || die "too many arguments (see --help)"
    CACHE_DIR=$1
fi
if [ -z "$CACHE_DIR" ]; then
    if [ -n "${KILN_GUEST_CACHE:-}" ]; then
        CACHE_DIR=$KILN_GUEST_CACHE
    elif [ -n "${HOME:-}" ]; then
        CACHE_DIR=$HOME/.cache/kiln/guest
    else
        die "no CACHE_DIR given and neither KILN_GUEST_CACHE nor HOME is set"
    fi
fi

# ---------------------------------------------------------------- tools
check_tools() {
    local missing=() pkgs=() entry tool pkg
    local list=(
        apt-get:apt apt-cache:apt dpkg-deb:dpkg lz4:lz4 readelf:binutils
        grep:grep od:coreutils sha256sum:coreutils
    )
    if [ "$KERNEL_ONLY" = 0 ]; then
        list+=(cpio:cpio gzip:gzip depmod:kmod modprobe:kmod
               mkfs.ext4:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs)
    fi
    for entry in "${list[@]}"; do
        tool=${entry%%:*} pkg=${entry#*:}
        if ! command -v "$tool" >/dev/null 2>&1; then
            missing+=("$tool (apt package $pkg)")
            case " ${pkgs[*]-} " in *" $pkg "*) ;; *) pkgs+=("$pkg") ;; esac
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        printf '%s: error: missing tool: %s\n' "$PROG" "${missing[@]}" >&2
        die "install them with: apt-get install --no-install-recommends ${pkgs[*]}"
    fi
}
check_tools

# A tool that is only needed for some inputs (e.g. .ko.xz modules).
need_tool() { # tool package why
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' is needed to $3; install it with: apt-get install $2"
}

# ---------------------------------------------------------------- workspace
mkdir -p "$CACHE_DIR" || die "cannot create cache directory '$CACHE_DIR'"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd -P)
DEBS=$CACHE_DIR/debs
mkdir -p "$DEBS"

if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/.lock"
    flock 9 || die "cannot lock $CACHE_DIR/.lock"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kiln-guest.XXXXXX")
cleanup() {
    rm -rf "$TMP"
    # Partial outputs of an interrupted step.
    rm -f "$CACHE_DIR"/*.part "$CACHE_DIR"/.stamp-*.part "$DEBS"/*.part
}
trap cleanup EXIT
trap 'exit 130' INT TERM

START=$SECONDS

# ---------------------------------------------------------------- apt helpers
# apt-cache is slow (it loads every package list), so ask once for the
# candidate records of all packages we need: one "PKG<TAB>VERSION<TAB>DEPENDS"
# line per package apt can install.
APT_RECORDS=
load_apt_records() { # packages... (adds to APT_RECORDS)
    APT_RECORDS+=$'\n'$(apt-cache show --no-all-versions "$@" 2>/dev/null |
        awk 'function flush() { if (p != "") print p "\t" v "\t" d; p = v = d = "" }
             /^$/ { flush(); next }
             /^Package: / { p = substr($0, 10) }
             /^Version: / { v = substr($0, 10) }
             /^Depends: / { d = substr($0, 10) }
             END { flush() }') || true
}
apt_field() { # package field-number(2=version, 3=depends)
    printf '%s\n' "$APT_RECORDS" | awk -F'\t' -v p="$1" -v f="$2" '$1 == p { print $f; exit }'
}

# Resolve the kernel metapackage to the real versioned image package.
# Sets KPKG (e.g. linux-image-6.1.0-56-cloud-amd64) and KVER (its version).
resolve_kernel() {
    local meta_ver dep
    meta_ver=$(apt_field "$KERNEL_META_PKG" 2)
    [ -n "$meta_ver" ] || return 1
    # "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    dep=$(apt_field "$KERNEL_META_PKG" 3 | tr ',|' '\n\n' |
        sed 's/^ *//; s/ *$//' | grep -E '^linux-image-[0-9]' | head -n 1) || true
    [ -n "$dep" ] || die "cannot find the linux-image-<version> dependency of $KERNEL_META_PKG=$meta_ver"
    KPKG=${dep%% *}
    KVER=
    case $dep in
        *"(= "*")") KVER=${dep#*(= }; KVER=${KVER%)} ;;
    esac
    if [ -z "$KVER" ]; then
        load_apt_records "$KPKG"
        KVER=$(apt_field "$KPKG" 2)
    fi
    [ -n "$KVER" ] || die "apt has no installable version of $KPKG (needed by $KERNEL_META_PKG)"
}

resolve_busybox() { # sets BBVER
    BBVER=$(apt_field "$BUSYBOX_PKG" 2)
    [ -n "$BBVER" ]
}

# fetch_deb PACKAGE VERSION -> prints the path of the .deb (cached in $DEBS)
fetch_deb() {
    local pkg=$1 ver=$2 safe deb dl got old
    safe=${ver//:/%3a}
    deb=$DEBS/${pkg}_${safe}.deb
    if [ -f "$deb" ] &&
       [ "$(dpkg-deb -f "$deb" Package 2>/dev/null)" = "$pkg" ] &&
       [ "$(dpkg-deb -f "$deb" Version 2>/dev/null)" = "$ver" ]; then
        printf '%s\n' "$deb"
        return 0
    fi
    dl=$TMP/download-$pkg
    mkdir -p "$dl"
    # Let apt's unprivileged download user write here (avoids apt's
    # "unsandboxed as root" warning).
    if [ "$(id -u)" = 0 ] && id -u _apt >/dev/null 2>&1; then
        chmod 755 "$TMP"
        chown _apt "$dl"
    fi
    log "downloading $pkg=$ver"
    (cd "$dl" && apt-get download -q "$pkg=$ver" >&2) ||
        die "apt-get download $pkg=$ver failed (is the apt index current? try apt-get update)"
    got=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n 1)
    [ -n "$got" ] || die "apt-get download $pkg=$ver produced no .deb"
    [ "$(dpkg-deb -f "$got" Package)" = "$pkg" ] || die "downloaded $got is not $pkg"
    mv -f "$got" "$deb.part"
    mv -f "$deb.part" "$deb"
    # Drop older cached versions of the same package.
    for old in "$DEBS/${pkg}_"*.deb; do
        [ "$old" = "$deb" ] || rm -f "$old"
    done
    printf '%s\n' "$deb"
}

# ---------------------------------------------------------------- stamps
stamp_ok() { # name expected-content outputs...
    local name=$1 want=$2 f
    shift 2
    for f in "$@"; do [ -s "$CACHE_DIR/$f" ] || return 1; done
    [ -f "$CACHE_DIR/.stamp-$name" ] && [ "$(cat "$CACHE_DIR/.stamp-$name")" = "$want" ]
}
write_stamp() { printf '%s\n' "$2" > "$CACHE_DIR/.stamp-$1.part" && mv -f "$CACHE_DIR/.stamp-$1.part" "$CACHE_DIR/.stamp-$1"; }
outputs_present() { # names...
    local f
    for f in "$@"; do
        [ -s "$CACHE_DIR/$f" ] && [ -f "$CACHE_DIR/.stamp-${f%%.*}" ] || return 1
    done
}

# ---------------------------------------------------------------- kernel tree
KTREE=
KREL=
# Extract the kernel package once per run; sets KTREE and KREL.
kernel_tree() {
    [ -z "$KTREE" ] || return 0
    local deb vmlinuz
    deb=$(fetch_deb "$KPKG" "$KVER")
    KTREE=$TMP/kernel
    mkdir -p "$KTREE"
    log "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$KTREE" || die "dpkg-deb -x $deb failed"
    vmlinuz=$(find "$KTREE/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -n 1)
    [ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
    KREL=${vmlinuz##*/vmlinuz-}
}

kernel_moddir() { # -> lib/modules/KREL directory inside the extracted package
    local d
    for d in "$KTREE/lib/modules/$KREL" "$KTREE/usr/lib/modules/$KREL"; do
        [ -d "$d" ] && { printf '%s\n' "$d"; return 0; }
    done
    die "no lib/modules/$KREL in $KPKG"
}

# ---------------------------------------------------------------- vmlinux
# hex_bytes FILE OFFSET COUNT -> "7f454c46"
hex_bytes() { od -An -tx1 -j "$2" -N "$3" -v "$1" | tr -d ' \n'; }

# Accept FILE only if it is a complete ELF image: magic, readable headers, and
# every program segment inside the file (a truncated decompression fails this).
valid_elf() {
    local f=$1 size end max=0 h
    [ -s "$f" ] || return 1
    [ "$(hex_bytes "$f" 0 4)" = 7f454c46 ] || return 1
    readelf -h "$f" >/dev/null 2>&1 || return 1
    size=$(stat -c %s "$f")
    while read -ra h; do
        # Type Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align
        [ ${#h[@]} -ge 6 ] && [[ ${h[0]} =~ ^[A-Z_]+$ ]] && [[ ${h[1]} == 0x* ]] &&
            [[ ${h[4]} == 0x* ]] || continue
        end=$(( ${h[1]} + ${h[4]} ))
        [ "$end" -le "$max" ] || max=$end
    done < <(readelf -lW "$f" 2>/dev/null)
    [ "$max" -gt 0 ] && [ "$max" -le "$size" ]
}

has_pvh_note() { # XEN_ELFNOTE_PHYS32_ENTRY = 18 (0x12), owner "Xen"
    readelf -nW "$1" 2>/dev/null |
        grep -E '^[[:space:]]*Xen[[:space:]]' | grep -qiE 'type: \(0x0*12\)|PHYS32_ENTRY'
}

# Decompress the payload of a bzImage. The compressed kernel sits inside the
# image at an offset we do not parse; look for each format's magic bytes and
# decompress from there, keeping the first result that is a complete ELF.
# Decompressors may complain about the data that follows the stream (the
# bzImage appends the uncompressed size and more); the ELF check decides.
extract_vmlinux() { # bzImage output
    local in=$1 out=$2 entry fmt magic tool cmd offsets off n tried=
    local formats=(
        "lz4|\\x02\\x21\\x4c\\x18|lz4|lz4 -dc"
        "gzip|\\x1f\\x8b\\x08|gzip|gzip -dc"
        "xz|\\xfd\\x37\\x7a\\x58\\x5a\\x00|xz|xz -dc --single-stream"
        "zstd|\\x28\\xb5\\x2f\\xfd|zstd|zstd -dcq"
        "bzip2|\\x42\\x5a\\x68|bzip2|bzip2 -dcq"
        "lzma|\\x5d\\x00\\x00\\x00|xz|xz -dc --format=lzma --single-stream"
    )
    for entry in "${formats[@]}"; do
        IFS='|' read -r fmt magic tool cmd <<<"$entry"
        offsets=$(grep -aobUP "$magic" "$in" 2>/dev/null | cut -d: -f1 | head -n 64) || true
        [ -n "$offsets" ] || continue
        if ! command -v "$tool" >/dev/null 2>&1; then
            warn "vmlinuz may be $fmt-compressed but '$tool' is not installed"
            continue
        fi
        n=0
        for off in $offsets; do
            n=$((n + 1))
            tail -c +$((off + 1)) "$in" | $cmd > "$out" 2>/dev/null || true
            if valid_elf "$out"; then
                log "vmlinux: $fmt stream at offset $off of vmlinuz ($(stat -c %s "$out") bytes)"
                return 0
            fi
        done
        tried+=" $fmt($n)"
    done
    rm -f "$out"
    die "could not extract an ELF vmlinux from $in (magic found and tried:${tried:- none})"
}

# ---------------------------------------------------------------- step: kernel
build_kernel() {
    local want=$1 tmp_elf
    kernel_tree
    log "building kernel outputs for $KREL"
    cp -f "$KTREE/boot/vmlinuz-$KREL" "$CACHE_DIR/vmlinuz.part"
    tmp_elf=$CACHE_DIR/vmlinux.part
    extract_vmlinux "$CACHE_DIR/vmlinuz.part" "$tmp_elf"
    has_pvh_note "$tmp_elf" ||
        die "vmlinux has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12); Kiln needs a PVH-capable kernel"
    printf '%s\n' "$KREL" > "$CACHE_DIR/kernel-version.part"
    mv -f "$CACHE_DIR/vmlinuz.part" "$CACHE_DIR/vmlinuz"
    mv -f "$tmp_elf" "$CACHE_DIR/vmlinux"
    mv -f "$CACHE_DIR/kernel-version.part" "$CACHE_DIR/kernel-version"
    write_stamp kernel "$want"
}

# ---------------------------------------------------------------- guest scripts
# /init of the initramfs and /sbin/init of rootfs.ext4 live beside this script. Their KILN-GUEST-*
# lines are the interface the layer-3 suite matches; keep them stable.
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
INIT_SCRIPT=$(cat "$GUEST_DIR/init.sh") || die "cannot read $GUEST_DIR/init.sh"
ROOT_INIT_SCRIPT=$(cat "$GUEST_DIR/root-init.sh") || die "cannot read $GUEST_DIR/root-init.sh"

sha() { printf '%s' "$1" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- busybox
BBTREE=
busybox_tree() { # extract busybox-static once; sets BB (path of the binary)
    [ -z "$BBTREE" ] || return 0
    local deb
    deb=$(fetch_deb "$BUSYBOX_PKG" "$BBVER")
    BBTREE=$TMP/busybox
    mkdir -p "$BBTREE"
    dpkg-deb -x "$deb" "$BBTREE" || die "dpkg-deb -x $deb failed"
    BB=
    for f in "$BBTREE/bin/busybox" "$BBTREE/usr/bin/busybox"; do
        [ -f "$f" ] && { BB=$f; break; }
    done
    [ -n "$BB" ] || die "no bin/busybox in $deb"
}

# install_busybox STAGE: /bin/busybox plus a symlink per applet.
install_busybox() {
    local stage=$1 applet
    mkdir -p "$stage/bin" "$stage/sbin" "$stage/usr/bin" "$stage/usr/sbin"
    install -m 0755 "$BB" "$stage/bin/busybox"
    if "$BB" --list-full > "$TMP/applets" 2>/dev/null && [ -s "$TMP/applets" ]; then
        while read -r applet; do
            [ -n "$applet" ] && [ "$applet" != bin/busybox ] || continue
            mkdir -p "$stage/$(dirname "$applet")"
            [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
        done < "$TMP/applets"
    else
        # Cannot run it here: /init falls back to "busybox --install -s".
        warn "cannot list busybox applets on this host; the guest installs them at boot"
        ln -sf busybox "$stage/bin/sh"
    fi
}

# ---------------------------------------------------------------- step: initramfs
# One newc cpio member without data (directory or device node): lets the
# archive carry /dev/console without needing mknod (root) on the host.
newc_entry() { # name mode(octal) rdevmajor rdevminor ino
    local name=$1 mode=$((8#$2)) namesize=$(( ${#1} + 1 )) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$5" "$mode" 0 0 1 "$EPOCH" 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    head -c "$pad" /dev/zero
}

build_initramfs() {
    local want=$1 stage moddir mods modroot out ko base list=() seen=" " w
    kernel_tree
    busybox_tree
    log "building initramfs.cpio.gz (kernel $KREL, busybox $BBVER)"
    moddir=$(kernel_moddir)

    # depmod/modprobe want BASE/lib/modules/RELEASE; give them a clean base
    # (and an empty modprobe config, so the host's does not leak in).
    modroot=$TMP/modroot
    mkdir -p "$modroot/lib/modules" "$modroot/usr/lib" "$TMP/modprobe.d"
    ln -s "$moddir" "$modroot/lib/modules/$KREL"
    ln -s ../../lib/modules "$modroot/usr/lib/modules"
    depmod -b "$modroot" "$KREL" || die "depmod -b $modroot $KREL failed"
    for mods in $GUEST_MODULES; do
        out=$(modprobe -C "$TMP/modprobe.d" -d "$modroot" -S "$KREL" --show-depends "$mods" 2>&1) ||
            die "module $mods not found in $KPKG: $out"
        while read -ra w; do
            # "insmod /path/to/mod.ko [options]"; "builtin mod" needs nothing
            [ ${#w[@]} -ge 2 ] && [ "${w[0]}" = insmod ] || continue
            case $seen in *" ${w[1]} "*) continue ;; esac
            seen+="${w[1]} "
            list+=("${w[1]}")
        done <<<"$out"
    done

    stage=$TMP/initramfs
    mkdir -p "$stage"/{etc,lib/modules/"$KREL",mnt,newroot,proc,root,sys,tmp}
    chmod 1777 "$stage/tmp"
    install_busybox "$stage"
    : > "$stage/lib/modules/$KREL/load-order"
    for ko in "${list[@]}"; do
        # modprobe prints paths through our symlinked base; the file is real.
        [ -f "$ko" ] || die "modprobe listed $ko but it does not exist"
        base=${ko##*/}
        case $base in
            *.ko) cp "$ko" "$stage/lib/modules/$KREL/$base" ;;
            *.ko.xz) need_tool xz xz-utils "decompress $base"
                     base=${base%.xz}; xz -dc "$ko" > "$stage/lib/modules/$KREL/$base" ;;
            *.ko.zst) need_tool zstd zstd "decompress $base"
                      base=${base%.zst}; zstd -dcq "$ko" > "$stage/lib/modules/$KREL/$base" ;;
            *.ko.gz) base=${base%.gz}; gzip -dc "$ko" > "$stage/lib/modules/$KREL/$base" ;;
            *) die "unexpected module file $ko" ;;
        esac
        printf '%s\n' "$base" >> "$stage/lib/modules/$KREL/load-order"
    done
    log "modules (load order): $(tr '\n' ' ' < "$stage/lib/modules/$KREL/load-order")"

    printf '%s\n' "$INIT_SCRIPT" > "$stage/init"
    chmod 0755 "$stage/init"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
    printf 'root:x:0:\n' > "$stage/etc/group"
    printf 'kiln-guest\n' > "$stage/etc/hostname"

    # The kernel opens /dev/console before it runs /init. As root, make real
    # nodes; otherwise append a second, hand-written archive holding them
    # (the kernel unpacks concatenated archives; "cpio -t" shows only the first).
    local devs_appended=0
    mkdir -p "$stage/dev"
    if ! { mknod -m 0600 "$stage/dev/console" c 5 1 &&
           mknod -m 0666 "$stage/dev/null" c 1 3; } 2>/dev/null; then
        rm -f "$stage/dev/console" "$stage/dev/null"
        devs_appended=1
    fi
    find "$stage" -exec touch -h -d "@$EPOCH" {} +

    local cpio_opts=(-o -H newc -R 0:0 --quiet)
    cpio --help 2>/dev/null | grep -q -- --reproducible && cpio_opts+=(--reproducible)
    {
        (cd "$stage" && find . -mindepth 1 -printf '%P\n' | sort | cpio "${cpio_opts[@]}")
        if [ "$devs_appended" = 1 ]; then
            newc_entry dev/console 020600 5 1 1
            newc_entry dev/null 020666 1 3 2
            newc_entry TRAILER!!! 0 0 0 0
        fi
    } | gzip -9 -n > "$CACHE_DIR/initramfs.cpio.gz.part"
    mv -f "$CACHE_DIR/initramfs.cpio.gz.part" "$CACHE_DIR/initramfs.cpio.gz"
    write_stamp initramfs "$want"
}

# ---------------------------------------------------------------- step: rootfs
build_rootfs() {
    local want=$1 stage img cmds f
    busybox_tree
    log "building rootfs.ext4 ($ROOTFS_SIZE)"
    stage=$TMP/rootfs
    mkdir -p "$stage"/{dev,etc,lib,mnt,proc,root,run,sys,tmp,var/tmp}
    chmod 1777 "$stage/tmp" "$stage/var/tmp"
    chmod 0700 "$stage/root"
    install_busybox "$stage"
    printf '%s\n' "$ROOT_INIT_SCRIPT" > "$stage/sbin/init.kiln"
    rm -f "$stage/sbin/init"    # busybox's own init applet link
    mv "$stage/sbin/init.kiln" "$stage/sbin/init"
    chmod 0755 "$stage/sbin/init"
    printf 'kiln-rootfs\n' > "$stage/kiln-marker"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
    printf 'root:x:0:\n' > "$stage/etc/group"
    printf 'kiln-guest\n' > "$stage/etc/hostname"
    printf '/dev/vda / ext4 rw 0 1\n' > "$stage/etc/fstab"
    find "$stage" -exec touch -h -d "@$EPOCH" {} +

    img=$CACHE_DIR/rootfs.ext4.part
    rm -f "$img"
    mkfs.ext4 -q -F -L kiln-rootfs -E root_owner=0:0 \
        -d "$stage" "$img" "$ROOTFS_SIZE" >"$TMP/mkfs.out" 2>&1 ||
        die "mkfs.ext4 -d $stage $img $ROOTFS_SIZE failed: $(cat "$TMP/mkfs.out")"

    # Device nodes (no mknod needed on the host) and, when not built as root,
    # root ownership for everything, all written with debugfs.
    cmds=$TMP/debugfs.cmds
    {
        # debugfs's mknod takes a name in the current directory.
        echo "cd /dev"
        echo "mknod console c 5 1"
        echo "mknod null c 1 3"
        echo "cd /"
        echo "sif /dev/console mode 020600"
        echo "sif /dev/null mode 020666"
        if [ "$(id -u)" != 0 ]; then
            (cd "$stage" && find . -mindepth 1 -printf '/%P\n') | while read -r f; do
                echo "sif $f uid 0"
                echo "sif $f gid 0"
            done
        fi
    } > "$cmds"
    debugfs -w -f "$cmds" "$img" >/dev/null 2>"$TMP/debugfs.err" ||
        die "debugfs on $img failed: $(cat "$TMP/debugfs.err")"
    e2fsck -fn "$img" >"$TMP/e2fsck.out" 2>&1 ||
        die "e2fsck -fn $img reports errors: $(cat "$TMP/e2fsck.out")"
    [ "$(debugfs -R 'cat /kiln-marker' "$img" 2>/dev/null)" = kiln-rootfs ] ||
        die "rootfs image check failed: /kiln-marker not readable in $img"
    [ "$(debugfs -R 'stat /dev/console' "$img" 2>/dev/null | grep -c 'Type: character special')" = 1 ] ||
        die "rootfs image check failed: no /dev/console in $img"
    mv -f "$img" "$CACHE_DIR/rootfs.ext4"
    write_stamp rootfs "$want"
}

# ---------------------------------------------------------------- main
print_outputs() {
    local name
    for name in "$@"; do
        printf '%s=%s\n' "$name" "$CACHE_DIR/$name"
    done
}

KERNEL_OUTPUTS=(vmlinuz vmlinux kernel-version)
ALL_OUTPUTS=("${KERNEL_OUTPUTS[@]}")
[ "$KERNEL_ONLY" = 1 ] || ALL_OUTPUTS+=(initramfs.cpio.gz rootfs.ext4)

if [ "$KERNEL_ONLY" = 1 ]; then
    load_apt_records "$KERNEL_META_PKG"
else
    load_apt_records "$KERNEL_META_PKG" "$BUSYBOX_PKG"
fi
if ! resolve_kernel || { [ "$KERNEL_ONLY" = 0 ] && ! resolve_busybox; }; then
    # Offline or without apt lists: a complete cache is still usable.
    if [ -s "$CACHE_DIR/vmlinuz" ] && [ -f "$CACHE_DIR/.stamp-kernel" ] &&
       { [ "$KERNEL_ONLY" = 1 ] || outputs_present initramfs.cpio.gz rootfs.ext4; } &&
       [ -s "$CACHE_DIR/vmlinux" ] && [ -s "$CACHE_DIR/kernel-version" ]; then
        warn "apt cannot resolve $KERNEL_META_PKG/$BUSYBOX_PKG; using the cached build as is"
        print_outputs "${ALL_OUTPUTS[@]}"
        exit 0
    fi
    die "apt cannot resolve $KERNEL_META_PKG or $BUSYBOX_PKG (run apt-get update; is Debian main enabled?)"
fi
log "kernel: $KERNEL_META_PKG -> $KPKG $KVER"

KSTAMP="recipe=$RECIPE_VERSION
kernel-package=$KPKG=$KVER"
if stamp_ok kernel "$KSTAMP" "${KERNEL_OUTPUTS[@]}"; then
    log "kernel outputs are up to date"
else
    build_kernel "$KSTAMP"
fi

if [ "$KERNEL_ONLY" = 0 ]; then
    log "busybox: $BUSYBOX_PKG $BBVER"
    ISTAMP="recipe=$RECIPE_VERSION
kernel-package=$KPKG=$KVER
busybox-package=$BUSYBOX_PKG=$BBVER
modules=$GUEST_MODULES
init=$(sha "$INIT_SCRIPT")"
    if stamp_ok initramfs "$ISTAMP" initramfs.cpio.gz; then
        log "initramfs.cpio.gz is up to date"
    else
        build_initramfs "$ISTAMP"
    fi

    RSTAMP="recipe=$RECIPE_VERSION
busybox-package=$BUSYBOX_PKG=$BBVER
size=$ROOTFS_SIZE
init=$(sha "$ROOT_INIT_SCRIPT")"
    if stamp_ok rootfs "$RSTAMP" rootfs.ext4; then
        log "rootfs.ext4 is up to date"
    else
        build_rootfs "$RSTAMP"
    fi
fi

log "done in $((SECONDS - START))s"
print_outputs "${ALL_OUTPUTS[@]}"
