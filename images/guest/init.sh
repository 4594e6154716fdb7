#!/bin/sh
# Kiln distro-guest /init (busybox sh), packed by images/guest/build-guest.sh.
# Kernel parameters without a dot arrive as environment variables (kiln_disk=1 ...). The
# KILN-GUEST-* lines are the interface the tests match (images/guest/README.md): keep them
# stable, extend rather than change them.
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
[ -x /bin/mount ] || /bin/busybox --install -s

mkdir -p /proc /sys /dev /tmp /mnt /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=70% tmpfs /tmp
exec </dev/console >/dev/console 2>&1

say() { echo "kiln-init: $*"; }

# wait_for PATH: poll up to $kiln_wait seconds (default 10).
wait_for() {
    i=0
    n=$(( ${kiln_wait:-10} * 5 ))
    while [ ! -e "$1" ]; do
        [ "$i" -ge "$n" ] && return 1
        sleep 0.2 2>/dev/null || sleep 1
        i=$((i + 1))
    done
    return 0
}

# Guest uptime in milliseconds.
uptime_ms() {
    read -r up _ < /proc/uptime
    echo $(( ${up%.*} * 1000 + $(echo "${up#*.}" | sed 's/^0*//; s/^$/0/') * 10 ))
}

kver=$(uname -r)
moddir=/lib/modules/$kver
if [ -f "$moddir/load-order" ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        insmod "$moddir/$m" || echo "KILN-GUEST-MODULE fail $m"
    done < "$moddir/load-order"
else
    say "no $moddir/load-order (kernel $kver does not match this initramfs?)"
fi

cpus=0
oldifs=$IFS
IFS=,
for r in $(cat /sys/devices/system/cpu/online 2>/dev/null); do
    case $r in
        *-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1)) ;;
        ?*) cpus=$((cpus + 1)) ;;
    esac
done
IFS=$oldifs
[ "$cpus" -gt 0 ] || cpus=$(grep -c '^processor' /proc/cpuinfo)
echo "KILN-GUEST-READY kernel=$kver cpus=$cpus"

if [ "${kiln_info:-}" = 1 ]; then
    mem=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    echo "KILN-GUEST-INFO cpus=$cpus mem_kb=$mem"
    echo "KILN-GUEST-CMDLINE $(cat /proc/cmdline)"
fi

if [ -n "${kiln_sleep:-}" ]; then
    t0=$(uptime_ms)
    sleep "$kiln_sleep"
    t1=$(uptime_ms)
    echo "KILN-GUEST-SLEEP ok ms=$((t1 - t0))"
fi

if [ "${kiln_acpid:-}" = 1 ]; then
    # The ACPI power button (button.ko) reports through an input device; busybox acpid maps
    # its KEY_POWER to the PWRF action.
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\necho "KILN-GUEST-POWERBUTTON" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
    chmod 0755 /etc/acpi/PWRF/00000080
    printf 'PWRF PWRF/00000080\n' > /etc/acpid.conf
    if acpid -c /etc/acpi -a /etc/acpid.conf -l /tmp/acpid.log; then
        echo "KILN-GUEST-ACPID ok"
    else
        echo "KILN-GUEST-ACPID fail"
    fi
fi

if [ "${kiln_disk:-}" = 1 ]; then
    if ! wait_for /dev/vda; then
        say "no /dev/vda"
        echo "KILN-GUEST-DISK fail"
    elif ! mount -t ext4 -o ro /dev/vda /mnt; then
        say "cannot mount /dev/vda"
        echo "KILN-GUEST-DISK fail"
    elif [ ! -r /mnt/kiln-marker ]; then
        say "no /kiln-marker on /dev/vda"
        echo "KILN-GUEST-DISK fail"
        umount /mnt
    else
        echo "KILN-GUEST-DISK ok $(head -n 1 /mnt/kiln-marker)"
        umount /mnt
    fi
fi

# kiln_blk=write: the block-device checks of the layer-3 suite. vda: ext4 (raw image) written,
# trimmed; vdb: ext4 (qcow2 overlay) written; vdc: read-only; vdd: 4096-byte blocks.
# kiln_blk=verify: print the checksums of what a first boot wrote.
blk_line() { echo "KILN-GUEST-BLK $*"; }
if [ "${kiln_blk:-}" = write ]; then
    for d in vda vdb vdc vdd; do wait_for /dev/$d || blk_line "missing $d"; done
    if mount -t ext4 /dev/vda /mnt; then
        dd if=/dev/urandom of=/mnt/data bs=1M count=4 2>/dev/null
        blk_line "vda-data $(md5sum < /mnt/data | cut -d' ' -f1)"
        dd if=/dev/urandom of=/mnt/junk bs=1M count=32 2>/dev/null
        sync
        rm /mnt/junk
        sync
        if out=$(fstrim -v /mnt 2>&1); then blk_line "vda-fstrim ok $out"; else blk_line "vda-fstrim fail $out"; fi
        umount /mnt && blk_line "vda-umount ok"
    else
        blk_line "vda-mount fail"
    fi
    if mount -t ext4 /dev/vdb /mnt; then
        blk_line "vdb-base $(head -n 1 /mnt/kiln-marker 2>/dev/null)"
        dd if=/dev/urandom of=/mnt/data bs=1M count=4 2>/dev/null
        blk_line "vdb-data $(md5sum < /mnt/data | cut -d' ' -f1)"
        umount /mnt && blk_line "vdb-umount ok"
    else
        blk_line "vdb-mount fail"
    fi
    ro=$(cat /sys/block/vdc/ro 2>/dev/null)
    if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync 2>/dev/null; then
        blk_line "vdc-ro fail flag=$ro write-accepted"
    else
        blk_line "vdc-ro ok flag=$ro"
    fi
    blk_line "vdd-bs logical=$(cat /sys/block/vdd/queue/logical_block_size 2>/dev/null) physical=$(cat /sys/block/vdd/queue/physical_block_size 2>/dev/null)"
    if dd if=/dev/urandom of=/tmp/bs bs=4096 count=16 2>/dev/null &&
       dd if=/tmp/bs of=/dev/vdd bs=4096 conv=fsync 2>/dev/null &&
       [ "$(dd if=/dev/vdd bs=4096 count=16 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum < /tmp/bs)" ]; then
        blk_line "vdd-io ok $(md5sum < /tmp/bs | cut -d' ' -f1)"
    else
        blk_line "vdd-io fail"
    fi
    sync
elif [ "${kiln_blk:-}" = verify ]; then
    for d in vda vdb; do
        if wait_for /dev/$d && mount -t ext4 -o ro /dev/$d /mnt; then
            blk_line "$d-verify $(md5sum < /mnt/data | cut -d' ' -f1)"
            umount /mnt
        else
            blk_line "$d-verify fail"
        fi
    done
fi

if [ -n "${kiln_ip:-}" ]; then
    ifc=${kiln_if:-eth0}
    ip link set lo up
    if ! wait_for "/sys/class/net/$ifc"; then
        say "no network interface $ifc"
        echo "KILN-GUEST-PING fail"
    elif ! ip link set "$ifc" up || ! ip addr add "$kiln_ip" dev "$ifc"; then
        say "cannot configure $ifc with $kiln_ip"
        echo "KILN-GUEST-PING fail"
    elif [ -z "${kiln_peer:-}" ]; then
        say "$ifc is $kiln_ip; no kiln_peer to ping"
    elif ping -c 3 -W 5 "$kiln_peer"; then
        echo "KILN-GUEST-PING ok"
    else
        echo "KILN-GUEST-PING fail"
    fi
fi

# kiln_net=1 (with kiln_ip, kiln_peer): TCP both ways with checked bytes, over HTTP (busybox
# httpd and wget). The guest serves kiln_net_mib MiB (default 64) of random bytes as
# http://<guest>:8080/guest.bin, fetches http://<peer>:8080/peer.bin, and waits (up to
# kiln_net_wait s, default 600) until the peer has http://<peer>:8080/done.
if [ "${kiln_net:-}" = 1 ] && [ -n "${kiln_peer:-}" ]; then
    ifc=${kiln_if:-eth0}
    dev=$(basename "$(readlink -f "/sys/class/net/$ifc/device")")
    echo "KILN-GUEST-NET features $(cat "/sys/bus/virtio/devices/$dev/features" 2>/dev/null)"
    mkdir -p /tmp/www
    dd if=/dev/urandom of=/tmp/www/guest.bin bs=1M count="${kiln_net_mib:-64}" 2>/dev/null
    echo "KILN-GUEST-NET sent-md5 $(md5sum < /tmp/www/guest.bin | cut -d' ' -f1)"
    httpd -p 8080 -h /tmp/www && echo "KILN-GUEST-NET serving"
    echo "KILN-GUEST-NET recv-md5 $(wget -q -O - "http://$kiln_peer:8080/peer.bin" | md5sum | cut -d' ' -f1)"
    i=0
    until wget -q -O /dev/null "http://$kiln_peer:8080/done" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -ge "${kiln_net_wait:-600}" ] && break
        sleep 1
    done
    echo "KILN-GUEST-NET done"
fi

# kiln_tick=1: a line a second with the guest's uptime, in the background (a live guest).
if [ "${kiln_tick:-}" = 1 ]; then
    (while :; do echo "KILN-GUEST-TICK $(uptime_ms)"; sleep 1; done) &
fi

# Misbehaviour on purpose: a kernel panic (with panic=-1 the kernel resets the machine), or a
# reboot (with reboot=t the kernel reboots by triple fault).
if [ "${kiln_panic:-}" = 1 ]; then
    echo "KILN-GUEST-PANIC"
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger
fi
if [ "${kiln_reboot:-}" = 1 ]; then
    echo "KILN-GUEST-REBOOT"
    reboot -f
fi

# root=DEV on the kernel command line (or kiln_switch_root=1, meaning /dev/vda): mount it and
# hand over to its /sbin/init (a distro's systemd, or rootfs.ext4's marker script).
rootdev=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^root=/) print substr($i, 6) }' /proc/cmdline)
[ "${kiln_switch_root:-}" = 1 ] && rootdev=${rootdev:-/dev/vda}
if [ -n "$rootdev" ]; then
    if wait_for "$rootdev" && mount -t ext4 "$rootdev" /newroot &&
        { [ -x /newroot/sbin/init ] || [ -L /newroot/sbin/init ]; }; then
        umount /tmp 2>/dev/null
        for m in dev proc sys; do
            mount --move "/$m" "/newroot/$m" 2>/dev/null || umount "/$m" 2>/dev/null
        done
        exec switch_root /newroot /sbin/init
    fi
    say "switch_root to $rootdev failed"
    echo "KILN-GUEST-ROOT fail"
fi

if [ "${kiln_poweroff:-}" = 1 ]; then
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger 2>/dev/null
    while :; do sleep 60; done
fi

say "starting a shell on the console"
while :; do
    if command -v cttyhack >/dev/null 2>&1; then setsid cttyhack sh -l; else sh -l; fi
    sleep 1
done
