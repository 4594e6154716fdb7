#!/usr/bin/env bash
# Layer 3: boots real Linux guests under Kiln and checks them (tests/linux/scenarios.sh).
#
#   tests/linux/run.sh [--nested | --direct] [SCENARIO...]
#
# --direct runs the scenarios on this host (it needs VMX or SVM: a KVM that runs Linux), in a
# network namespace of their own. --nested boots an L1 Linux under QEMU's TCG, whose emulated
# SVM gives it a real /dev/kvm, and runs them there (slow, but real hardware-virtualisation
# semantics on any machine: design/GUESTS.md). Without either, --direct where the host can, else
# --nested. Prints "KILN-L3-MODE direct|nested", one "KILN-SCENARIO NAME ok|fail ..." line per
# scenario, and "KILN-SCENARIOS-DONE"; each scenario's log is in DIR/logs/NAME.log.
#
# Environment: KILN (default target/release/kiln), KILN_L3_DIR (default target/layer3),
# KILN_L3_TIMEOUT (seconds per guest run, default 240), KILN_L3_QEMU_TIMEOUT (seconds for the
# whole nested run, default 3000), KILN_L3_L1_CPUS (L1's vCPUs, default 1: see below).
set -euo pipefail
cd "$(dirname "$0")/../.."
die() { echo "run.sh: $*" >&2; exit 2; }
MODE=auto
case ${1:-} in
    --nested) MODE=nested; shift ;;
    --direct) MODE=direct; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
esac
KILN=$(realpath "${KILN:-target/release/kiln}")
DIR=${KILN_L3_DIR:-target/layer3}
CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
export KILN_L3_TIMEOUT=${KILN_L3_TIMEOUT:-240}
[ -x "$KILN" ] || die "no kiln binary at $KILN (cargo build --release, or set KILN)"
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
rm -rf "$DIR/logs" "$DIR/work"
mkdir -p "$DIR/logs"

if [ "$MODE" = auto ]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] && [ -w /dev/kvm ]; then
        MODE=direct
    else
        MODE=nested
    fi
fi
bash tests/linux/prepare.sh "$DIR/guests" >/dev/null
echo "KILN-L3-MODE $MODE"

if [ "$MODE" = direct ]; then
    # The scenarios' tools are busybox's, as inside the nested L1; the TAPs and addresses they
    # make live in a network namespace of their own.
    bb=$DIR/busybox
    rm -rf "$bb"
    mkdir -p "$bb/x"
    dpkg-deb -x "$(ls "$CACHE"/guest/debs/busybox-static_*.deb | head -n 1)" "$bb/x"
    mv "$bb/x/bin/busybox" "$bb/busybox"
    rm -rf "$bb/x"
    for a in $("$bb/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$bb/$a"; done
    ln -sf "$(command -v curl)" "$bb/curl"
    exec env PATH="$bb:$PATH" KILN="$KILN" GUESTS="$DIR/guests" WORK="$DIR/work" LOGS="$DIR/logs" \
        unshare -n -- "$bb/sh" -c 'ip link set lo up; exec sh tests/linux/scenarios.sh "$@"' sh "$@"
fi

command -v qemu-system-x86_64 >/dev/null || die "the nested layer needs qemu-system-x86_64 (tests/install-deps.sh)"
bash tests/linux/build-l1.sh "$DIR/l1" "$KILN" "$DIR/guests" >/dev/null
# shellcheck disable=SC2207
remaining=($(if [ $# -gt 0 ]; then echo "$@"; else sh tests/linux/scenarios.sh --list; fi))
declare -A died=() deaths=()
: > "$DIR/l1-console.txt"
: > "$DIR/l1-logs.txt"
# The emulated host is not flawless: QEMU's nested SVM has crashed or hung L1 itself under
# Kiln's reboot loops (a kernel oops in L1's KVM_RUN path: QEMU delivers a reschedule IPI
# right after a #VMEXIT although GIF is clear; a TCG vCPU spinning). Kiln cannot
# cause either (it is a user process of L1), so when L1 dies or stops making progress in the
# middle of a scenario, that scenario runs again in a fresh L1, up to four times, and the run
# says so. A scenario whose L1 dies five times fails. (With QEMU 7.2 and one L1 CPU, L1 hung
# three times in each of two CI runs, in different scenarios, a 1-vCPU boot among them; every
# rerun passed: ~3 deaths in ~13 tries, so at three tries some scenario would fail for the
# host alone in about one run of seven, at five in about one of a hundred.)
max_deaths=5
stall=$(( KILN_L3_TIMEOUT * 4 ))
# L1 prints a heartbeat every 20 s (l1-init.sh): two minutes without one is a hung L1.
heartbeat=120
progress='^KILN-(SCENARIO |SCENARIO-START|L1-READY|L1-DONE|L1 )'
l1_broken='(BUG: .*|Oops.*|Kernel panic.*|watchdog: BUG: soft lockup.*|rcu: INFO: rcu_preempt self-detected stall.*|KILN-L1-SICK .*)'
deadline=$(( SECONDS + ${KILN_L3_QEMU_TIMEOUT:-3000} ))
attempt=0
while [ ${#remaining[@]} -gt 0 ]; do
    attempt=$((attempt + 1))
    con=$DIR/l1-console.$attempt.txt
    : > "$con"
    list=$(IFS=,; echo "${remaining[*]}")
    # L1: one vCPU by default (KILN_L3_L1_CPUS). With two, L1's KVM kicks a vCPU that is in
    # guest mode on the other CPU with a reschedule IPI, and QEMU 7.2's multi-threaded TCG
    # sometimes delivers it right after the #VMEXIT, before L1 has its GS base back (GIF
    # should hold it off): L1 oopses ("stack guard page was hit" in __svm_vcpu_run) or hangs.
    # That killed a CI run's reboot-loop three times in a row (a 2-vCPU guest rebooting: IPIs
    # all the time). With one L1 CPU there is no cross-CPU IPI to mistime; L2 guests keep their
    # two vCPUs, time-shared (layer 3 takes ~1.3 x as long, and leaves a host core to the
    # other tests). tsc=reliable keeps L1's clock steady under emulation. Its console (ttyS0)
    # carries the results, ttyS1 the scenarios' logs.
    qemu-system-x86_64 \
        -accel "${KILN_L3_ACCEL:-tcg,thread=multi}" -cpu "${KILN_L3_CPU:-max}" -smp "${KILN_L3_L1_CPUS:-1}" -m 6G -M pc -nodefaults -no-user-config \
        -display none -no-reboot \
        -kernel "$DIR/l1/vmlinuz" -initrd "$DIR/l1/initramfs.cpio.gz" \
        -drive "file=$DIR/l1/payload.ext4,format=raw,if=virtio,readonly=on" \
        -serial "file:$con" -serial "file:$DIR/l1-logs.$attempt.txt" \
        -append "console=ttyS0 panic=-1 tsc=reliable quiet kiln_timeout=$KILN_L3_TIMEOUT kiln_scenarios=$list" </dev/null &
    qemu=$!
    seen=0 last=$SECONDS alive=$SECONDS beats=0 hung=
    while kill -0 "$qemu" 2>/dev/null; do
        sleep 2
        n=$(tr -d '\r' < "$con" | grep -caE "$progress" || true)
        if [ "$n" -gt "$seen" ]; then
            tr -d '\r' < "$con" | grep -aE "$progress" | tail -n +$((seen + 1))
            seen=$n
            last=$SECONDS
        fi
        b=$(tr -d '\r' < "$con" | grep -caE '^KILN-L1-ALIVE' || true)
        if [ "$b" -gt "$beats" ]; then
            beats=$b
            alive=$SECONDS
        fi
        # L1's own kernel saying it is broken ends it at once: an oops, or a CPU stuck in
        # L2 (a soft lockup: QEMU stopped delivering L1's interrupts while L2 ran).
        if sick=$(tr -d '\r' < "$con" | grep -aoE "$l1_broken" | head -n 1) && [ -n "$sick" ]; then
            hung="L1: $sick"
            echo "KILN-L1 $hung: stopping it"
            kill -9 "$qemu" 2>/dev/null || true
            break
        elif [ $((SECONDS - alive)) -gt "$heartbeat" ]; then
            hung="L1 hung: no heartbeat for $((SECONDS - alive)) s"
            echo "KILN-L1 $hung: stopping it"
            kill -9 "$qemu" 2>/dev/null || true
            break
        elif [ $((SECONDS - last)) -gt "$stall" ] || [ "$SECONDS" -gt "$deadline" ]; then
            hung="L1 made no progress for $((SECONDS - last)) s"
            echo "KILN-L1 $hung: stopping it"
            kill -9 "$qemu" 2>/dev/null || true
            break
        fi
    done
    wait "$qemu" 2>/dev/null || true
    tr -d '\r' < "$con" >> "$DIR/l1-console.txt"
    cat "$DIR/l1-logs.$attempt.txt" >> "$DIR/l1-logs.txt"
    grep -qa '^KILN-SCENARIOS-DONE' <(tr -d '\r' < "$con") && break
    [ "$SECONDS" -le "$deadline" ] || die "the nested run took longer than ${KILN_L3_QEMU_TIMEOUT:-3000} s"
    # L1 died or hung: who was running, and what L1 said last.
    current=$(tr -d '\r' < "$con" | grep -aE '^KILN-SCENARIO-START ' | tail -n 1 | cut -d' ' -f2)
    why=$(echo "${hung:-L1 ended without a word}" | cut -c1-120)
    [ -n "$current" ] || die "L1 died before any scenario started (${why}); L1's console: $DIR/l1-console.txt"
    next=()
    for s in "${remaining[@]}"; do
        # (Not a pipe into grep -q: under pipefail, tr killed by SIGPIPE would read as no match.)
        grep -qaE "^KILN-SCENARIO $s " <(tr -d '\r' < "$con") && continue
        next+=("$s")
    done
    deaths[$current]=$(( ${deaths[$current]:-0} + 1 ))
    died[$current]="${died[$current]:+${died[$current]}; }$why"
    if [ "${deaths[$current]}" -ge "$max_deaths" ]; then
        echo "KILN-SCENARIO $current fail L1 died $max_deaths times while it ran: ${died[$current]}"
        next=("${next[@]:1}")
    else
        echo "KILN-L1-RESTART L1 died during $current ($why): running it again in a fresh L1"
    fi
    remaining=("${next[@]}")
done
# Split the logs by scenario; a scenario run twice keeps its last log.
awk -v d="$DIR/logs" '{ sub(/\r$/, "") } /^=== KILN-LOG / { f = d "/" $3 ".log"; printf "" > f; next } f { print > f }' "$DIR/l1-logs.txt"
for s in "${!died[@]}"; do
    echo "KILN-L1-RERUN $s ${died[$s]}"
done
echo "KILN-SCENARIOS-DONE"
