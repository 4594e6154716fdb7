/*
 * Kiln probe guest: a small freestanding x86-64 program entered like a Linux kernel.
 * It reads a command list from the kernel command line (probe=...) and reports on COM1.
 * See README.md for the command language; the output lines are a public interface.
 *
 * General-purpose instructions only: the PVM emulator this runs under on our CI hosts
 * executes roughly a million instructions per second and lacks some instructions.
 */

#include "probe.h"

/* [a, a+len) lies in the identity-mapped low 4 GiB. */
int reachable(u64 a, u64 len) { return a < FOUR_GIB && len <= FOUR_GIB - a; }

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *dd = d;
	const u8 *ss = s;
	while (n--)
		*dd++ = *ss++;
	return d;
}

void *memset(void *d, int c, u64 n)
{
	u8 *dd = d;
	while (n--)
		*dd++ = (u8)c;
	return d;
}

static int eq(const char *a, u32 alen, const char *b)
{
	u32 i = 0;
	for (; i < alen; i++)
		if (b[i] != a[i])
			return 0;
	return b[i] == 0;
}

/* Waits about `ticks` TSC ticks (at most `max_iter` iterations), or until *flag >= want. */
static void wait_until(volatile u32 *flag, u32 want, u64 ticks, u64 max_iter)
{
	u64 t0 = rdtsc();
	for (u64 i = 0; i < max_iter; i++) {
		if (flag && *flag >= want)
			return;
		if (rdtsc() - t0 >= ticks)
			return;
		pause();
	}
}

/* ------------------------------------------------------------------------------------ */
/* Serial output: COM1, polled, one spinlock around whole lines.                        */

static volatile u32 print_lock;

void ser_putc(char c)
{
	for (u32 i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		pause();
	outb(COM1, (u8)c);
}

void line_begin(void)
{
	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		while (print_lock)
			pause();
}

void line_end(void)
{
	ser_putc('\r');
	ser_putc('\n');
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

void ps(const char *s)
{
	while (*s)
		ser_putc(*s++);
}

void pn(const char *s, u32 n)
{
	for (u32 i = 0; i < n; i++)
		ser_putc(s[i]);
}

void phex_w(u64 v, int min_digits)
{
	char buf[16];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v || n < min_digits);
	ps("0x");
	while (n)
		ser_putc(buf[--n]);
}
void phex(u64 v) { phex_w(v, 1); }

void pdec(u64 v)
{
	char buf[20];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		ser_putc(buf[--n]);
}

/* A 4-character ACPI signature, non-printable bytes as '?'. */
static void psig(const char *sig)
{
	for (int i = 0; i < 4; i++)
		ser_putc(sig[i] >= 0x20 && sig[i] < 0x7f ? sig[i] : '?');
}

void say(const char *a) { line_begin(); ps(a); line_end(); }

/* ------------------------------------------------------------------------------------ */
/* Boot information, copied at start-up (low memory may be reused later, e.g. 0x8000).  */

#define CMDLINE_MAX 4095
#define E820_MAX 128

struct e820e {
	u64 addr, size;
	u32 type;
};

static u32 entry_kind;
static u32 boot_nr;
/* Large buffers are filled before use: .noinit keeps them out of the .bss clear, which
 * costs ~1 ms per KiB where the guest is emulated instruction by instruction. */
char cmdline[CMDLINE_MAX + 1] NOINIT;
u32 cmdline_len;
static struct e820e e820[E820_MAX] NOINIT;
static u32 e820_n;
static u64 initrd_addr, initrd_size;
static u64 rsdp_hint;

static void copy_cmdline(u64 a)
{
	if (!a)
		return;
	u32 n = 0;
	while (n < CMDLINE_MAX && reachable(a + n, 1)) {
		char c = (char)r8(a + n);
		if (!c)
			break;
		cmdline[n++] = c;
	}
	cmdline[n] = 0;
	cmdline_len = n;
}

static void add_e820(u64 addr, u64 size, u32 type)
{
	if (e820_n < E820_MAX)
		e820[e820_n++] = (struct e820e){ addr, size, type };
}

#define PVH_MAGIC 0x336ec578

static void read_pvh(u64 si)
{
	if (!si || !reachable(si, 56) || r32(si) != PVH_MAGIC) {
		say("PROBE-FAIL boot bad-pvh-start-info");
		return;
	}
	u32 version = r32(si + 4);
	u32 nr_modules = r32(si + 12);
	u64 modlist = r64(si + 16);
	copy_cmdline(r64(si + 24));
	rsdp_hint = r64(si + 32);
	if (nr_modules && modlist && reachable(modlist, 32)) {
		initrd_addr = r64(modlist);
		initrd_size = r64(modlist + 8);
	}
	if (version >= 1) {
		u64 mm = r64(si + 40);
		u32 n = r32(si + 48);
		for (u32 i = 0; mm && i < n && i < E820_MAX && reachable(mm + 24 * i, 24); i++)
			add_e820(r64(mm + 24 * i), r64(mm + 24 * i + 8), r32(mm + 24 * i + 16));
	}
}

static void read_zero_page(u64 bp)
{
	if (!bp || !reachable(bp, 4096)) {
		say("PROBE-FAIL boot bad-boot-params");
		return;
	}
	rsdp_hint = r64(bp + 0x070);
	copy_cmdline(r32(bp + 0x228) | ((u64)r32(bp + 0x0c8) << 32));
	initrd_addr = r32(bp + 0x218) | ((u64)r32(bp + 0x0c0) << 32);
	initrd_size = r32(bp + 0x21c) | ((u64)r32(bp + 0x0c4) << 32);
	u32 n = r8(bp + 0x1e8);
	for (u32 i = 0; i < n && i < E820_MAX; i++) {
		u64 e = bp + 0x2d0 + 20 * i;
		add_e820(r64(e), r64(e + 8), r32(e + 16));
	}
}

/* ------------------------------------------------------------------------------------ */
/* ACPI                                                                                 */

#define MAX_TABLES 32

static struct {
	int done;
	int status;		/* 1 ok, 0 no RSDP, -1 invalid */
	u64 rsdp;
	u64 fadt, fadt_len, madt, madt_len, dsdt, dsdt_len;
	char sigs[MAX_TABLES][4];
	u32 nsigs;
	const char *err;	/* failure: "what" */
	char err_sig[4];	/* ... and a signature, or */
	u64 err_addr;		/* ... an address (when err_sig[0] == 0) */
} acpi;

static int sig_is(u64 a, const char *s)
{
	return r8(a) == (u8)s[0] && r8(a + 1) == (u8)s[1] && r8(a + 2) == (u8)s[2] &&
	       r8(a + 3) == (u8)s[3];
}

static u8 sum(u64 a, u64 len)
{
	u8 s = 0;
	const volatile u8 *p = (const volatile u8 *)P(a);
	for (u64 i = 0; i < len; i++)
		s = (u8)(s + p[i]);
	return s;
}

static int acpi_fail_sig(const char *what, const char *sig)
{
	acpi.err = what;
	memcpy(acpi.err_sig, sig, 4);
	acpi.status = -1;
	return -1;
}

static int acpi_fail_addr(const char *what, u64 a)
{
	acpi.err = what;
	acpi.err_sig[0] = 0;
	acpi.err_addr = a;
	acpi.status = -1;
	return -1;
}

/* Checks one table (header, length, checksum); `expect` is its required signature or 0.
 * Records its signature in the visited list. Returns its length, or 0 after a failure. */
static u64 check_table(u64 a, const char *expect)
{
	char sig[4];
	if (!a || !reachable(a, 36)) {
		if (expect)
			acpi_fail_sig("bad-address", expect);
		else
			acpi_fail_addr("bad-address", a);
		return 0;
	}
	for (int i = 0; i < 4; i++)
		sig[i] = (char)r8(a + i);
	if (expect && !sig_is(a, expect)) {
		acpi_fail_sig("signature", expect);
		return 0;
	}
	u64 len = r32(a + 4);
	if (len < 36 || len > (16UL << 20) || !reachable(a, len)) {
		acpi_fail_sig("bad-length", sig);
		return 0;
	}
	if (sum(a, len)) {
		acpi_fail_sig("checksum", sig);
		return 0;
	}
	if (acpi.nsigs < MAX_TABLES)
		memcpy(acpi.sigs[acpi.nsigs++], sig, 4);
	return len;
}

#define RSDP_SIG 0x2052545020445352UL /* "RSD PTR " */

static u64 scan_rsdp(u64 start, u64 len)
{
	for (u64 a = start; a + 20 <= start + len; a += 16)
		if (r64(a) == RSDP_SIG && sum(a, 20) == 0)
			return a;
	return 0;
}

static int acpi_init(void)
{
	if (acpi.done)
		return acpi.status;
	acpi.done = 1;

	u64 rsdp = rsdp_hint;
	if (!rsdp) {
		u64 ebda = (u64)r16(0x40e) << 4;
		if (ebda >= 0x400 && ebda < 0xa0000)
			rsdp = scan_rsdp(ebda, 1024);
		if (!rsdp)
			rsdp = scan_rsdp(0xe0000, 0x20000);
	}
	if (!rsdp) {
		acpi.status = 0;
		acpi.err = "no-rsdp";
		return 0;
	}
	acpi.rsdp = rsdp;
	if (!reachable(rsdp, 36))
		return acpi_fail_addr("bad-address", rsdp);
	if (r64(rsdp) != RSDP_SIG)
		return acpi_fail_sig("signature", "RSDP");
	if (sum(rsdp, 20))
		return acpi_fail_sig("checksum", "RSDP");

	u8 rev = r8(rsdp + 15);
	u64 root = 0;
	u32 esize = 4;
	const char *rsig = "RSDT";
	if (rev >= 2) {
		u32 xlen = r32(rsdp + 20);
		if (xlen < 36 || xlen > 4096 || !reachable(rsdp, xlen))
			return acpi_fail_sig("bad-length", "RSDP");
		if (sum(rsdp, xlen))
			return acpi_fail_sig("ext-checksum", "RSDP");
		root = r64(rsdp + 24);
		if (root) {
			esize = 8;
			rsig = "XSDT";
		}
	}
	if (!root)
		root = r32(rsdp + 16);

	u64 rlen = check_table(root, rsig);
	if (!rlen)
		return -1;
	u32 n = (u32)((rlen - 36) / esize);
	for (u32 i = 0; i < n; i++) {
		u64 e = root + 36 + (u64)i * esize;
		u64 t = esize == 8 ? r64(e) : r32(e);
		u64 len = check_table(t, 0);
		if (!len)
			return -1;
		if (sig_is(t, "FACP") && !acpi.fadt) {
			acpi.fadt = t;
			acpi.fadt_len = len;
		} else if (sig_is(t, "APIC") && !acpi.madt) {
			acpi.madt = t;
			acpi.madt_len = len;
		}
	}
	if (acpi.fadt) {
		u64 d = 0;
		if (acpi.fadt_len >= 148)
			d = r64(acpi.fadt + 140);
		if (!d)
			d = r32(acpi.fadt + 40);
		u64 len = check_table(d, "DSDT");
		if (!len)
			return -1;
		acpi.dsdt = d;
		acpi.dsdt_len = len;
	}
	acpi.status = 1;
	return 1;
}

/* Common prefix for commands that need ACPI: prints the FAIL line and returns 0 if the
 * tables are missing or invalid. */
static int need_acpi(const char *cmd)
{
	int s = acpi_init();
	if (s == 1)
		return 1;
	line_begin();
	ps("PROBE-FAIL ");
	ps(cmd);
	ps(s == 0 ? " no-acpi" : " bad-acpi");
	line_end();
	return 0;
}

/* FADT fields */
static u32 fadt32(u32 off) { return acpi.fadt_len >= off + 4 ? r32(acpi.fadt + off) : 0; }
static u8 fadt8(u32 off) { return acpi.fadt_len >= off + 1U ? r8(acpi.fadt + off) : 0; }

/* A generic address structure at FADT offset `off`. */
struct gas {
	u8 space, bit_width;
	u64 addr;
};
static struct gas fadt_gas(u32 off)
{
	struct gas g = { 0, 0, 0 };
	if (acpi.fadt_len >= off + 12) {
		g.space = r8(acpi.fadt + off);
		g.bit_width = r8(acpi.fadt + off + 1);
		g.addr = r64(acpi.fadt + off + 4);
	}
	return g;
}

/* Writes through a generic address: system memory (0) or system I/O (1). */
static int gas_write(struct gas g, u32 width, u32 v)
{
	if (g.space == 1 && g.addr <= 0xffff) {
		if (width == 8)
			outb((u16)g.addr, (u8)v);
		else if (width == 16)
			outw((u16)g.addr, (u16)v);
		else
			outl((u16)g.addr, v);
		return 1;
	}
	if (g.space == 0 && reachable(g.addr, width / 8)) {
		if (width == 8)
			w8(g.addr, (u8)v);
		else if (width == 16)
			w16(g.addr, (u16)v);
		else
			w32(g.addr, v);
		return 1;
	}
	return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Commands                                                                             */

static void cmd_cmdline(void)
{
	line_begin();
	ps("PROBE-OK cmdline ");
	pn(cmdline, cmdline_len);
	line_end();
}

/* The CPUID words the VMM filters: leaf 1 ECX/EDX, leaf 7 EBX/ECX/EDX, leaf 0xD EAX. */
static void cmd_cpuid(void)
{
	u32 a, b, c, d, b7, c7, d7, ad;
	cpuid(1, &a, &b, &c, &d);
	cpuid(7, &a, &b7, &c7, &d7);
	cpuid(0xd, &ad, &a, &a, &a);
	line_begin();
	ps("PROBE-OK cpuid 1.ecx=");
	phex(c);
	ps(" 1.edx=");
	phex(d);
	ps(" 7.ebx=");
	phex(b7);
	ps(" 7.ecx=");
	phex(c7);
	ps(" 7.edx=");
	phex(d7);
	ps(" d.eax=");
	phex(ad);
	line_end();
}

/* XCR0 against CPUID leaf 0xD: turns on every x87/SSE/AVX component the leaf offers, then
 * reads XCR0 back and CPUID.(0xD,0).EBX, the XSAVE area size for the components now enabled.
 * A hypervisor must see the XSETBV to keep that size in step (Linux checks it at boot). */
static void cmd_xcr0(void)
{
	u32 a, b, c, d, offered, before, after, max;
	u64 cr4;
	cpuid(1, &a, &b, &c, &d);
	if (!(c & (1u << 26))) {
		say("PROBE-FAIL xcr0 no-xsave");
		return;
	}
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | (1ull << 18)) : "memory"); /* OSXSAVE */
	cpuid(0xd, &offered, &before, &max, &d);
	__asm__ volatile("xsetbv" : : "c"(0), "a"(offered & 7), "d"(0) : "memory");
	u32 lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	cpuid(0xd, &a, &after, &c, &d);
	line_begin();
	ps("PROBE-OK xcr0 xcr0=");
	phex(((u64)hi << 32) | lo);
	ps(" size-before=");
	pdec(before);
	ps(" size-after=");
	pdec(after);
	ps(" size-max=");
	pdec(max);
	line_end();
}

static void cmd_e820(void)
{
	for (u32 i = 0; i < e820_n; i++) {
		line_begin();
		ps("PROBE-E820 base=");
		phex(e820[i].addr);
		ps(" size=");
		phex(e820[i].size);
		ps(" type=");
		pdec(e820[i].type);
		line_end();
	}
	if (!e820_n) {
		say("PROBE-FAIL e820 none");
		return;
	}
	line_begin();
	ps("PROBE-OK e820 entries=");
	pdec(e820_n);
	line_end();
}

static void cmd_initrd(void)
{
	if (!initrd_addr || !initrd_size) {
		say("PROBE-FAIL initrd none");
		return;
	}
	if (!reachable(initrd_addr, initrd_size)) {
		say("PROBE-FAIL initrd unreachable");
		return;
	}
	u32 h = 0x811c9dc5;
	const volatile u8 *p = (const volatile u8 *)P(initrd_addr);
	for (u64 i = 0; i < initrd_size; i++)
		h = (h ^ p[i]) * 0x01000193;
	line_begin();
	ps("PROBE-OK initrd addr=");
	phex(initrd_addr);
	ps(" size=");
	pdec(initrd_size);
	ps(" fnv1a=");
	phex_w(h, 8);
	line_end();
}

static void cmd_acpi(void)
{
	int s = acpi_init();
	line_begin();
	if (s == 1) {
		ps("PROBE-OK acpi rsdp=");
		phex(acpi.rsdp);
		ps(" tables=");
		for (u32 i = 0; i < acpi.nsigs; i++) {
			if (i)
				ser_putc(',');
			psig(acpi.sigs[i]);
		}
	} else {
		ps("PROBE-FAIL acpi ");
		ps(acpi.err);
		if (s < 0) {
			ser_putc(' ');
			if (acpi.err_sig[0])
				psig(acpi.err_sig);
			else
				phex(acpi.err_addr);
		}
	}
	line_end();
}

/* MADT: enabled processors (local APIC type 0 and x2APIC type 9, flags bit 0). */
#define MAX_CPUS 256
static u32 cpu_ids[MAX_CPUS] NOINIT;

static u32 madt_cpus(void)
{
	u32 n = 0;
	u64 p = acpi.madt + 44, end = acpi.madt + acpi.madt_len;
	while (p + 2 <= end) {
		u8 type = r8(p), len = r8(p + 1);
		if (len < 2 || p + len > end)
			break;
		u32 id = 0, en = 0;
		if (type == 0 && len >= 8) {
			id = r8(p + 3);
			en = r32(p + 4) & 1;
		} else if (type == 9 && len >= 16) {
			id = r32(p + 4);
			en = r32(p + 8) & 1;
		}
		if (en) {
			if (n < MAX_CPUS)
				cpu_ids[n] = id;
			n++;
		}
		p += len;
	}
	return n;
}

static void cmd_cpus(void)
{
	if (!need_acpi("cpus"))
		return;
	if (!acpi.madt) {
		say("PROBE-FAIL cpus no-madt");
		return;
	}
	line_begin();
	ps("PROBE-OK cpus ");
	pdec(madt_cpus());
	line_end();
}

static volatile u32 ap_started;

void ap_main(void)
{
	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	line_begin();
	ps("PROBE-AP apic=");
	pdec(b >> 24);
	ps(" up");
	line_end();
	__atomic_fetch_add(&ap_started, 1, __ATOMIC_SEQ_CST);
	halt_forever();
}

#define MSR_APIC_BASE 0x1b
#define X2APIC_ID 0x802
#define X2APIC_SVR 0x80f
#define X2APIC_ICR 0x830
#define ICR_INIT 0x4500
#define ICR_SIPI (0x4600 | (TRAMP_ADDR >> 12))

static void short_delay(void)
{
	for (int i = 0; i < 200; i++)
		pause();
}

static void cmd_smp(void)
{
	if (!need_acpi("smp"))
		return;
	if (!acpi.madt) {
		say("PROBE-FAIL smp no-madt");
		return;
	}
	u32 expected = madt_cpus();

	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	int x2 = (c >> 21) & 1;
	u64 base = rdmsr(MSR_APIC_BASE);
	u64 mmio = base & 0xffffff000UL;
	u32 self;
	if (x2) {
		if ((base & 0xc00) != 0xc00)
			wrmsr(MSR_APIC_BASE, base | 0xc00);
		self = (u32)rdmsr(X2APIC_ID);
		wrmsr(X2APIC_SVR, rdmsr(X2APIC_SVR) | 0x1ff);
	} else {
		if (!mmio || !reachable(mmio, 0x1000))
			mmio = 0xfee00000;
		self = r32(mmio + 0x20) >> 24;
		w32(mmio + 0xf0, r32(mmio + 0xf0) | 0x1ff);
	}

	if (expected > 1)
		memcpy((void *)P(TRAMP_ADDR), tramp_start, (u64)(tramp_end - tramp_start));
	ap_started = 0;
	u32 sent = 0;
	for (u32 i = 0; i < expected && i < MAX_CPUS; i++) {
		u32 id = cpu_ids[i];
		if (id == self)
			continue;
		if (!x2 && id > 255)
			continue;
		for (int step = 0; step < 3; step++) {
			u32 cmd = step ? ICR_SIPI : ICR_INIT;
			if (x2) {
				wrmsr(X2APIC_ICR, ((u64)id << 32) | cmd);
			} else {
				w32(mmio + 0x310, id << 24);
				w32(mmio + 0x300, cmd);
				for (int k = 0; k < 1000 && (r32(mmio + 0x300) & 0x1000); k++)
					pause();
			}
			short_delay();
		}
		sent++;
	}
	/* ~2 s of TSC ticks at common TSC rates, bounded by iterations too. */
	if (sent)
		wait_until(&ap_started, sent, 5000000000UL, 50000000UL);
	u32 started = 1 + ap_started;
	line_begin();
	ps(started == expected ? "PROBE-OK smp " : "PROBE-FAIL smp ");
	pdec(started);
	ser_putc('/');
	pdec(expected);
	line_end();
}

static void still_running(const char *cmd)
{
	wait_until(0, 0, 2000000000UL, 20000000UL);
	line_begin();
	ps("PROBE-FAIL ");
	ps(cmd);
	ps(" still-running");
	line_end();
}

/* SLP_TYPa of \_S5_ from the DSDT, or -1. */
static int s5_type(void)
{
	u64 a = acpi.dsdt, end = acpi.dsdt + acpi.dsdt_len;
	if (!a)
		return -1;
	for (u64 p = a + 36; p + 8 <= end; p++) {
		if (r8(p) != '_' || !sig_is(p, "_S5_") || r8(p + 4) != 0x12)
			continue;
		u64 q = p + 5;
		q += 1 + (r8(q) >> 6);	/* PkgLength */
		q += 1;			/* NumElements */
		if (q + 2 > end)
			return -1;
		u8 op = r8(q);
		if (op == 0x00 || op == 0x01)
			return op;
		if (op == 0x0a)
			return r8(q + 1) & 7;
		return op & 7;
	}
	return -1;
}

static void cmd_poweroff(void)
{
	if (!need_acpi("poweroff"))
		return;
	if (!acpi.fadt) {
		say("PROBE-FAIL poweroff no-fadt");
		return;
	}
	int typ = s5_type();
	if (typ < 0) {
		say("PROBE-FAIL poweroff no-s5");
		return;
	}
	struct gas cnt = fadt_gas(172);		/* X_PM1a_CNT_BLK */
	if (!cnt.addr) {
		cnt.space = 1;
		cnt.addr = fadt32(64);		/* PM1a_CNT_BLK */
	}
	struct gas sleep = fadt_gas(244);	/* SLEEP_CONTROL_REG (hardware-reduced ACPI) */
	if (cnt.addr) {
		say("PROBE-OK poweroff");
		if (!gas_write(cnt, 16, ((u32)typ << 10) | (1u << 13))) {
			say("PROBE-FAIL poweroff bad-pm1a-cnt");
			return;
		}
	} else if (sleep.addr) {
		say("PROBE-OK poweroff");
		if (!gas_write(sleep, 8, ((u32)typ << 2) | (1u << 5))) {
			say("PROBE-FAIL poweroff bad-sleep-control");
			return;
		}
	} else {
		say("PROBE-FAIL poweroff no-pm1a-cnt");
		return;
	}
	still_running("poweroff");
}

static void cmd_reboot(void)
{
	say("PROBE-OK reboot");
	outb(0x64, 0xfe);
	still_running("reboot");
}

static void cmd_reboot_acpi(void)
{
	if (!need_acpi("reboot-acpi"))
		return;
	if (!acpi.fadt) {
		say("PROBE-FAIL reboot-acpi no-fadt");
		return;
	}
	if (acpi.fadt_len < 129 || !(fadt32(112) & (1u << 10))) {
		say("PROBE-FAIL reboot-acpi unsupported");
		return;
	}
	struct gas r = fadt_gas(116);
	if (!r.addr || (r.space != 1 && r.space != 0)) {
		say("PROBE-FAIL reboot-acpi bad-reset-reg");
		return;
	}
	say("PROBE-OK reboot-acpi");
	gas_write(r, 8, fadt8(128));
	still_running("reboot-acpi");
}

static void cmd_triplefault(void)
{
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} idtr = { 0, 0 };
	say("PROBE-OK triplefault");
	__asm__ volatile("lidt %0\n\t"
			 "xorl %%ecx, %%ecx\n\t"
			 "xorl %%eax, %%eax\n\t"
			 "xorl %%edx, %%edx\n\t"
			 "divl %%ecx"
			 :
			 : "m"(idtr)
			 : "eax", "ecx", "edx", "memory");
	say("PROBE-FAIL triplefault still-running");
}

static void cmd_wait_powerbutton(void)
{
	if (!need_acpi("wait-powerbutton"))
		return;
	if (!acpi.fadt) {
		say("PROBE-FAIL wait-powerbutton no-fadt");
		return;
	}
	u32 evt = fadt32(56);			/* PM1a_EVT_BLK */
	if (!evt) {
		struct gas g = fadt_gas(148);	/* X_PM1a_EVT_BLK */
		if (g.space == 1)
			evt = (u32)g.addr;
	}
	u8 len = fadt8(88);			/* PM1_EVT_LEN */
	if (!evt || evt > 0xffff || len < 4) {
		say("PROBE-FAIL wait-powerbutton no-pm1-evt");
		return;
	}
	u16 sts = (u16)evt, en = (u16)(evt + len / 2);
	outw(en, inw(en) | 0x100);
	say("PROBE-OK wait-powerbutton armed");
	while (!(inw(sts) & 0x100)) {
		pause();
		pause();
		pause();
		pause();
	}
	outw(sts, 0x100);
	say("PROBE-OK powerbutton pressed");
	cmd_poweroff();
}

/* Reads one non-empty line from COM1 (ended by CR or LF; bytes past `cap` dropped). */
static u32 read_line(char *buf, u32 cap)
{
	u32 n = 0;
	for (;;) {
		while (!(inb(COM1 + 5) & 1))
			pause();
		char c = (char)inb(COM1);
		if (c != '\r' && c != '\n') {
			if (n < cap)
				buf[n++] = c;
			continue;
		}
		if (n)
			return n;
	}
}

static void cmd_echo(void)
{
	char buf[256];
	say("PROBE-OK echo ready");
	for (;;) {
		u32 n = read_line(buf, sizeof(buf));
		if (eq(buf, n, "quit"))
			break;
		line_begin();
		ps("PROBE-ECHO ");
		pn(buf, n);
		line_end();
	}
	say("PROBE-OK echo done");
}

/* A line kept in guest memory by `note` and printed by `recall`. */
static char note_buf[64];
static u32 note_len;

static void cmd_note(void)
{
	say("PROBE-OK note ready");
	note_len = read_line(note_buf, sizeof(note_buf));
	line_begin();
	ps("PROBE-OK note ");
	pn(note_buf, note_len);
	line_end();
}

static void cmd_recall(void)
{
	line_begin();
	ps("PROBE-OK recall ");
	pn(note_buf, note_len);
	line_end();
}

/* One `count` step: ~0.1 s (2.5e8 TSC ticks, or 2.5e6 polls where the TSC does not move). */
#define COUNT_TICKS 250000000UL
#define COUNT_ITERS 2500000UL

/* Prints PROBE-COUNT 1, 2, ... one step apart: `limit` lines, or forever when 0. The counter
 * lives in guest memory and the steps are timed by the TSC, so a guest restored from a
 * snapshot goes on from where it was. */
static void count_lines(u64 limit)
{
	for (u64 n = 1; !limit || n <= limit; n++) {
		wait_until(0, 0, COUNT_TICKS, COUNT_ITERS);
		line_begin();
		ps("PROBE-COUNT ");
		pdec(n);
		line_end();
	}
	line_begin();
	ps("PROBE-OK count ");
	pdec(limit);
	line_end();
}

static void cmd_count(void) { count_lines(0); }

static void cmd_count_n(const char *args, u32 len)
{
	u64 n = 0;
	if (!len || len > 9) {
		say("PROBE-FAIL count bad-args");
		return;
	}
	for (u32 i = 0; i < len; i++) {
		if (args[i] < '0' || args[i] > '9') {
			say("PROBE-FAIL count bad-args");
			return;
		}
		n = n * 10 + (u64)(args[i] - '0');
	}
	if (!n) {
		say("PROBE-FAIL count bad-args");
		return;
	}
	count_lines(n);
}

/* Channel 0 of an i8254 PIT counts down at 1.193 MHz once programmed: two latched reads a
 * little apart differ. Without a PIT nothing answers the ports and both reads are the same. */
static u16 pit_read0(void)
{
	outb(0x43, 0x00); /* latch channel 0 */
	u16 lo = inb(0x40);
	return (u16)(lo | (u16)inb(0x40) << 8);
}

static void cmd_pit(void)
{
	outb(0x43, 0x34); /* channel 0, low then high byte, mode 2 */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	u16 a = pit_read0();
	wait_until(0, 0, 2000000, 200000);
	u16 b = pit_read0();
	line_begin();
	ps(a != b ? "PROBE-OK pit present " : "PROBE-OK pit absent ");
	phex(a);
	ps(" ");
	phex(b);
	line_end();
}

static void cmd_hlt(void)
{
	say("PROBE-OK hlt");
	halt_forever();
}

/* Guest-physical address in the MMIO gap with no device and no RAM behind it. */
#define UNBACKED_MMIO 0xc0000000UL

/* `lock cmpxchg16b` on an address with no RAM behind it: the access must be emulated, and
 * KVM's instruction emulator does not implement cmpxchg16b, so at CPL 0 KVM_RUN returns
 * KVM_EXIT_INTERNAL_ERROR (suberror 1, emulation failure). The same on PVM, which emulates
 * every instruction of a guest that is not PVM-aware. */
static void cmd_internal_error(void)
{
	u64 lo = 0, hi = 0;
	say("PROBE-OK internal-error");
	__asm__ volatile("lock cmpxchg16b (%4)"
			 : "+a"(lo), "+d"(hi)
			 : "b"(0UL), "c"(0UL), "r"(P(UNBACKED_MMIO))
			 : "memory", "cc");
	say("PROBE-FAIL internal-error still-running");
}

static const struct command {
	const char *name;
	void (*run)(void);
} commands[] = {
	{ "cmdline", cmd_cmdline },
	{ "e820", cmd_e820 },
	{ "cpuid", cmd_cpuid },
	{ "xcr0", cmd_xcr0 },
	{ "initrd", cmd_initrd },
	{ "acpi", cmd_acpi },
	{ "cpus", cmd_cpus },
	{ "smp", cmd_smp },
	{ "poweroff", cmd_poweroff },
	{ "reboot", cmd_reboot },
	{ "reboot-acpi", cmd_reboot_acpi },
	{ "triplefault", cmd_triplefault },
	{ "wait-powerbutton", cmd_wait_powerbutton },
	{ "echo", cmd_echo },
	{ "note", cmd_note },
	{ "recall", cmd_recall },
	{ "hlt", cmd_hlt },
	{ "pit", cmd_pit },
	{ "count", cmd_count },
	{ "internal-error", cmd_internal_error },
	{ "virtio", cmd_virtio },
};

/* Commands written "name:ARGS" (virtio.c, blk.c, net.c). */
static const struct arg_command {
	const char *name;
	void (*run)(const char *args, u32 len);
} arg_commands[] = {
	{ "blk-info", cmd_blk_info },
	{ "blk-write", cmd_blk_write },
	{ "blk-verify", cmd_blk_verify },
	{ "blk-flush", cmd_blk_flush },
	{ "blk-id", cmd_blk_id },
	{ "blk-discard", cmd_blk_discard },
	{ "blk-zeroes", cmd_blk_zeroes },
	{ "blk-bad", cmd_blk_bad },
	{ "blk-bench", cmd_blk_bench },
	{ "blk-rbench", cmd_blk_rbench },
	{ "net-info", cmd_net_info },
	{ "net-ip", cmd_net_ip },
	{ "net-serve", cmd_net_serve },
	{ "net-send", cmd_net_send },
	{ "net-blast", cmd_net_blast },
	{ "count", cmd_count_n },
};

static void run_word(const char *w, u32 len)
{
	/* Optional "N:" prefix: only on boot number N. */
	u32 i = 0, nr = 0;
	while (i < len && w[i] >= '0' && w[i] <= '9' && i < 9)
		nr = nr * 10 + (u32)(w[i++] - '0');
	if (i > 0 && i < len && w[i] == ':') {
		if (nr != boot_nr)
			return;
		w += i + 1;
		len -= i + 1;
	}
	if (!len)
		return;
	for (u32 k = 0; k < sizeof(commands) / sizeof(commands[0]); k++) {
		if (eq(w, len, commands[k].name)) {
			commands[k].run();
			return;
		}
	}
	u32 c = 0;
	while (c < len && w[c] != ':')
		c++;
	if (c < len) {
		for (u32 k = 0; k < sizeof(arg_commands) / sizeof(arg_commands[0]); k++) {
			if (eq(w, c, arg_commands[k].name)) {
				arg_commands[k].run(w + c + 1, len - c - 1);
				return;
			}
		}
	}
	line_begin();
	ps("PROBE-FAIL unknown-command ");
	pn(w, len);
	line_end();
}

static const char default_cmds[] = "acpi,cpus,smp,poweroff";

static void run_commands(void)
{
	const char *list = default_cmds;
	u32 len = sizeof(default_cmds) - 1;
	for (u32 i = 0; i + 6 <= cmdline_len; i++) {
		if (i && cmdline[i - 1] != ' ' && cmdline[i - 1] != '\t')
			continue;
		if (cmdline[i] != 'p' || cmdline[i + 1] != 'r' || cmdline[i + 2] != 'o' ||
		    cmdline[i + 3] != 'b' || cmdline[i + 4] != 'e' || cmdline[i + 5] != '=')
			continue;
		list = cmdline + i + 6;
		len = 0;
		while (list[len] && list[len] != ' ' && list[len] != '\t')
			len++;
		break;
	}
	u32 s = 0;
	for (u32 i = 0; i <= len; i++) {
		if (i == len || list[i] == ',') {
			run_word(list + s, i - s);
			s = i + 1;
		}
	}
}

/* ------------------------------------------------------------------------------------ */

static u8 cmos_read(u8 idx)
{
	outb(0x70, idx | 0x80);
	return inb(0x71);
}

static void cmos_write(u8 idx, u8 v)
{
	outb(0x70, idx | 0x80);
	outb(0x71, v);
}

void probe_main(u32 kind, u64 info)
{
	entry_kind = kind;
	outb(COM1 + 1, 0x00);	/* IER: no interrupts */
	outb(COM1 + 3, 0x03);	/* LCR: 8N1, DLAB off */

	boot_nr = cmos_read(CMOS_BOOT_INDEX);
	cmos_write(CMOS_BOOT_INDEX, boot_nr < 255 ? (u8)(boot_nr + 1) : 255);

	line_begin();
	ps("KILN-PROBE v1 boot=");
	pdec(boot_nr);
	ps(kind == KIND_PVH ? " entry=pvh" : " entry=linux64");
	line_end();

	if (kind == KIND_PVH)
		read_pvh(info);
	else
		read_zero_page(info);

	run_commands();
	say("PROBE-DONE");
}
