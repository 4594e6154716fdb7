#!/usr/bin/env python3
"""Boot benchmark: process start -> probe-guest banner and -> process exit, and peak RSS.

Runs Kiln (`kiln run`, the embedded probe guest, power-off) and QEMU microvm (the same probe
guest, which resets and QEMU exits with -no-reboot) side by side, N runs each, interleaved, and
prints medians. Run from the repository root after `cargo build --release`.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

BANNER = b"KILN-PROBE v1 "


def find_probe_elf():
    """The probe.elf that build.rs embedded into target/release/kiln."""
    root = os.path.join("target", "release", "build")
    best = None
    for d in os.listdir(root):
        p = os.path.join(root, d, "out", "probe.elf")
        if d.startswith("kiln-") and os.path.exists(p):
            if best is None or os.path.getmtime(p) > os.path.getmtime(best):
                best = p
    if best is None:
        sys.exit("probe.elf not found: run `cargo build --release` first")
    return best


def one_run(cmd):
    """Returns (seconds to banner, seconds to exit, peak RSS KiB, exit status)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    buf = b""
    banner = None
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if banner is None and BANNER in buf:
            banner = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if banner is None:
        raise RuntimeError(f"no banner from {cmd[0]}: {buf[-500:]!r}")
    return banner, end, usage.ru_maxrss, proc.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()

    probe = find_probe_elf()
    subjects = {
        "kiln": [args.kiln, "run", "--cpus", "1", "--memory", "256MiB",
                 "--cmdline", "console=ttyS0 probe=poweroff"],
    }
    qemu = shutil.which("qemu-system-x86_64")
    if qemu and not args.no_qemu:
        subjects["qemu-microvm"] = [
            qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-smp", "1", "-m", "256", "-kernel", probe, "-append", "console=ttyS0 probe=reboot"]
    results = {name: [] for name in subjects}
    for _ in range(args.runs):
        for name, cmd in subjects.items():
            results[name].append(one_run(cmd))
    print(f"{'subject':14} {'runs':>4} {'banner ms':>10} {'exit ms':>9} {'peak RSS MiB':>13}")
    for name, rs in results.items():
        b = statistics.median(r[0] for r in rs) * 1000
        e = statistics.median(r[1] for r in rs) * 1000
        rss = statistics.median(r[2] for r in rs) / 1024
        codes = sorted({r[3] for r in rs})
        print(f"{name:14} {len(rs):4} {b:10.1f} {e:9.1f} {rss:13.1f}   exit {codes}")


if __name__ == "__main__":
    main()
