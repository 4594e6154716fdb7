#!/bin/sh
# /init of the nested layer's L1 (tests/linux/build-l1.sh): loads KVM (nested SVM), mounts the
# guests, runs the scenarios named by kiln_scenarios=a,b (all when empty), each guest run
# bounded by kiln_timeout= seconds, and reports on ttyS0;
# each scenario's log goes to ttyS1 as it ends. Then it powers L1 off.
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
mkdir -p /proc /sys /dev /tmp /payload
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# KVM's tracepoints, for the scenarios' report on a guest that outlived its bound.
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=90% tmpfs /tmp
exec </dev/console >/dev/console 2>&1

moddir=/lib/modules/$(uname -r)
while read -r m; do
    insmod "$moddir/$m" || echo "KILN-L1 module $m failed"
done < "$moddir/load-order"
i=0
while [ ! -e /dev/vda ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
mount -t ext4 -o ro /dev/vda /payload || echo "KILN-L1 cannot mount the payload"
if [ -e /dev/kvm ]; then
    echo "KILN-L1-READY uptime=$(cut -d' ' -f1 /proc/uptime) $(dmesg | grep -oE 'Nested (Virtualization|Paging) enabled' | tr '\n' ' ')"
else
    echo "KILN-L1 no /dev/kvm: $(dmesg | grep -iE 'kvm|svm' | tail -n 3)"
fi
ip link set lo up
# A heartbeat for the runner: an L1 that stops printing it is hung (run.sh restarts it).
(while :; do sleep 20; echo "KILN-L1-ALIVE $(cut -d' ' -f1 /proc/uptime)"; done) &

KILN_L3_TIMEOUT=${kiln_timeout:-300} KILN_L3_NESTED=1 KILN_L3_LOG_SINK=/dev/ttyS1 KILN=/bin/kiln GUESTS=/payload WORK=/tmp/work \
    LOGS=/tmp/logs sh /scenarios.sh $(echo "${kiln_scenarios:-}" | tr ',' ' ')
echo "KILN-L1-DONE"
sync
poweroff -f
