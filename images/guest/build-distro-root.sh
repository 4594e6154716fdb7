#!/usr/bin/env bash
# Kiln's distro root for the layer-3 suite: a Debian root file system with systemd, made by
# debootstrap --variant=minbase from Debian's packages, as an ext4 image.
#
#   images/guest/build-distro-root.sh [CACHE_DIR]      (root needed: debootstrap chroots)
#
# Output: CACHE_DIR/distro-root.ext4 (default CACHE_DIR: ${KILN_GUEST_CACHE:-$HOME/.cache/kiln/guest}).
# The root boots with the guest initramfs of build-guest.sh and root=/dev/vda. A unit,
# kiln-report.service, waits for the boot to finish and prints on the console
#   KILN-DISTRO-UP state=<systemctl is-system-running> target=<default target> failed=<units>
# and, when the kernel command line has kiln_poweroff=1, runs `systemctl poweroff`.
# Cached: rebuilt only when this script, the suite or the mirror change.
set -euo pipefail
PROG=${0##*/}
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

CACHE_DIR=${1:-${KILN_GUEST_CACHE:-$HOME/.cache/kiln/guest}}
SIZE=${KILN_DISTRO_SIZE:-640M}
PACKAGES=systemd-sysv,udev
# The suite and mirror of this host's own apt sources: the one registry we may reach.
SUITE=${KILN_DISTRO_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
MIRROR=${KILN_DISTRO_MIRROR:-$( (grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?$' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) | awk 'NR == 1 { print $2 }')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export PATH="$PATH:/usr/sbin:/sbin"

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
for t in debootstrap mkfs.ext4 e2fsck; do
    command -v "$t" >/dev/null || die "missing $t (apt-get install debootstrap e2fsprogs)"
done
mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd -P)
OUT=$CACHE_DIR/distro-root.ext4
STAMP="script=$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16) suite=$SUITE mirror=$MIRROR size=$SIZE"
if [ -s "$OUT" ] && [ "$(cat "$CACHE_DIR/.stamp-distro-root" 2>/dev/null)" = "$STAMP" ]; then
    log "distro-root.ext4 is up to date"
    echo "distro-root.ext4=$OUT"
    exit 0
fi

exec 9>"$CACHE_DIR/.lock-distro"
flock 9
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kiln-distro.XXXXXX")
cleanup() {
    # debootstrap may leave proc/sys mounted inside the tree when it fails.
    for m in proc sys dev/pts dev; do umount -l "$TMP/root/$m" 2>/dev/null || true; done
    rm -rf "$TMP" "$OUT.part"
}
trap cleanup EXIT
START=$SECONDS
log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TMP/root" "$MIRROR" \
    >"$TMP/debootstrap.log" 2>&1 || die "debootstrap failed: $(tail -n 20 "$TMP/debootstrap.log")"
R=$TMP/root
# What the image does not need: package caches and lists, documentation.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* \
    "$R"/usr/share/man/* "$R"/usr/share/locale/*

echo kiln-distro > "$R/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$R/etc/fstab"
: > "$R/etc/machine-id"
printf 'kiln-distro\n' > "$R/kiln-marker"
cat > "$R/usr/local/sbin/kiln-report" <<'EOF'
#!/bin/sh
# Reports the finished boot on the console, then powers off when asked (kiln_poweroff=1).
state=$(systemctl is-system-running --wait 2>/dev/null)
failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{ printf "%s%s", sep, $1; sep = "," }')
echo "KILN-DISTRO-UP state=$state target=$(systemctl get-default) failed=${failed:-none}" > /dev/console
if grep -qw kiln_poweroff=1 /proc/cmdline; then
    echo "KILN-DISTRO-POWEROFF" > /dev/console
    systemctl poweroff
fi
EOF
chmod 0755 "$R/usr/local/sbin/kiln-report"
cat > "$R/etc/systemd/system/kiln-report.service" <<'EOF'
[Unit]
Description=Report the finished boot to Kiln's layer-3 suite

[Service]
# simple, not oneshot: the boot must be able to finish while this waits for it.
Type=simple
ExecStart=/usr/local/sbin/kiln-report

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/kiln-report.service \
    "$R/etc/systemd/system/multi-user.target.wants/kiln-report.service"
# Root logs in on the serial console without a password (a test machine).
sed -i 's/^root:[^:]*:/root::/' "$R/etc/shadow"

log "mkfs.ext4 -d ($SIZE)"
mkfs.ext4 -q -F -L kiln-distro -d "$R" "$OUT.part" "$SIZE" >"$TMP/mkfs.log" 2>&1 ||
    die "mkfs.ext4 failed: $(cat "$TMP/mkfs.log")"
e2fsck -fn "$OUT.part" >/dev/null 2>&1 || die "e2fsck finds errors in the new image"
mv -f "$OUT.part" "$OUT"
printf '%s\n' "$STAMP" > "$CACHE_DIR/.stamp-distro-root"
log "done in $((SECONDS - START)) s ($(du -h "$OUT" | cut -f1) used of $SIZE)"
echo "distro-root.ext4=$OUT"
