#!/usr/bin/env bash
# Installs the Debian packages Kiln's build and tests need, if any is missing.
# Idempotent and quick when everything is present. Needs root (or sudo) to install.
set -euo pipefail

# command -> package
declare -A NEED=(
  [gcc]=gcc
  [ld]=binutils
  [iasl]=acpica-tools
  [lz4]=lz4
  [cpio]=cpio
  [depmod]=kmod
  [mkfs.ext4]=e2fsprogs
  [dpkg-deb]=dpkg
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [hyperfine]=hyperfine
  [ip]=iproute2
  [ping]=iputils-ping
  [/usr/bin/time]=time
  [debootstrap]=debootstrap
  [curl]=curl
  [unshare]=util-linux
)
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
# Installing qemu-system-x86 removes a newer, backported qemu-utils it does not match: install
# the two together so that qemu-img stays.
case " ${missing[*]-} " in
  *" qemu-system-x86 "*) [[ " ${missing[*]} " == *" qemu-utils "* ]] || missing+=(qemu-utils) ;;
esac
# build-guest.sh downloads busybox-static and the cloud kernel with apt-get download:
# that needs package lists.
lists_empty=true
compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null && lists_empty=false

if [ ${#missing[@]} -eq 0 ] && ! $lists_empty; then
  exit 0
fi
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "install-deps: installing ${missing[*]:-(package lists only)}" >&2
$SUDO apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
