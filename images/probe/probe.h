/*
 * Kiln probe guest: shared types, low-level helpers and the output functions of probe.c.
 * General-purpose instructions only (see probe.c).
 */
#ifndef PROBE_H
#define PROBE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef u16 u16u __attribute__((aligned(1), may_alias));
typedef u32 u32u __attribute__((aligned(1), may_alias));
typedef u64 u64u __attribute__((aligned(1), may_alias));

#define KIND_PVH 1
#define KIND_LINUX64 2

#define FOUR_GIB 0x100000000UL
#define TRAMP_ADDR 0x8000UL
#define CMOS_BOOT_INDEX 0x38
#define COM1 0x3f8

/* Large buffers that are written before they are read: .noinit keeps them out of the .bss
 * clear, which costs ~1 ms per KiB where the guest is emulated instruction by instruction. */
#define NOINIT __attribute__((section(".noinit")))

extern void halt_forever(void) __attribute__((noreturn));
extern const u8 tramp_start[], tramp_end[];

void probe_main(u32 kind, u64 info);
void ap_main(void);
void *memcpy(void *d, const void *s, u64 n);
void *memset(void *d, int c, u64 n);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
/* Compiler barrier: x86 keeps stores in order and loads in order, which is all the split
 * virtqueue protocol needs from the guest side. */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "0"(leaf), "2"(0));
}

/* A physical address as a pointer the compiler cannot reason about (the low 4 GiB are
 * identity mapped; address 0 and the first page are legitimate). */
static inline u64 P(u64 a)
{
	__asm__("" : "+r"(a));
	return a;
}
static inline u8 r8(u64 a) { return *(const volatile u8 *)P(a); }
static inline u16 r16(u64 a) { return *(const volatile u16u *)P(a); }
static inline u32 r32(u64 a) { return *(const volatile u32u *)P(a); }
static inline u64 r64(u64 a) { return *(const volatile u64u *)P(a); }
static inline void w8(u64 a, u8 v) { *(volatile u8 *)P(a) = v; }
static inline void w16(u64 a, u16 v) { *(volatile u16u *)P(a) = v; }
static inline void w32(u64 a, u32 v) { *(volatile u32u *)P(a) = v; }
static inline void w64(u64 a, u64 v) { *(volatile u64u *)P(a) = v; }

/* [a, a+len) lies in the identity-mapped low 4 GiB. */
int reachable(u64 a, u64 len);

/* COM1 output (probe.c). A line is line_begin(), any of the p* calls, line_end(). */
void ser_putc(char c);
void line_begin(void);
void line_end(void);
void ps(const char *s);
void pn(const char *s, u32 n);
void phex_w(u64 v, int min_digits);
void phex(u64 v);
void pdec(u64 v);
void say(const char *a);

/* The kernel command line as copied at boot. */
extern char cmdline[];
extern u32 cmdline_len;

/* ~2 s of TSC ticks at common TSC rates (as the smp wait), and an iteration bound for a
 * TSC that does not advance. */
#define WAIT_TICKS 5000000000UL
#define WAIT_ITERS 50000000UL

/* virtio.c: lists the virtio-mmio devices of the command line. */
void cmd_virtio(void);

/* Commands with arguments ("name:args"): args points after the first ':'. */
void cmd_blk_info(const char *args, u32 len);
void cmd_blk_write(const char *args, u32 len);
void cmd_blk_verify(const char *args, u32 len);
void cmd_blk_flush(const char *args, u32 len);
void cmd_blk_id(const char *args, u32 len);
void cmd_blk_discard(const char *args, u32 len);
void cmd_blk_zeroes(const char *args, u32 len);
void cmd_blk_bad(const char *args, u32 len);
void cmd_blk_bench(const char *args, u32 len);
void cmd_blk_rbench(const char *args, u32 len);
void cmd_net_info(const char *args, u32 len);
void cmd_net_ip(const char *args, u32 len);
void cmd_net_serve(const char *args, u32 len);
void cmd_net_send(const char *args, u32 len);
void cmd_net_blast(const char *args, u32 len);

#endif
