/*
 * Kiln probe guest: entry points, GDT, static page tables, AP trampoline.
 *
 *  pvh_start32  PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info).
 *  _start64     Linux 64-bit boot protocol entry (long mode, %rsi = boot_params).
 *  tramp_start  real-mode AP start-up code, copied to 0x8000 (SIPI vector 0x08).
 *
 * All three end in 64-bit mode on the GDT and page tables below and call C:
 *  probe_main(kind, info) on the BSP, ap_main() on APs.
 */

#define KIND_PVH	1
#define KIND_LINUX64	2
#define KIND_AP		3

#define SEL_CODE64	0x08
#define SEL_DATA	0x10
#define SEL_CODE32	0x18

#define TRAMP_ADDR	0x8000
#define T(sym)		(TRAMP_ADDR + (sym) - tramp_start)

#define BSP_STACK_SIZE	16384
#define AP_STACK_SHIFT	12		/* 4 KiB per AP */
#define AP_STACKS	64

/* ---------------------------------------------------------------------------------------- */
/* Page tables: PML4 -> PDPT -> 4 page directories of 2 MiB pages, identity 0-4 GiB.       */
/* 0xC0000000-0xFFFFFFFF (MMIO: LAPIC, IOAPIC, virtio) is mapped uncached (PCD|PWT).        */

	.section .pagetables, "aw", @progbits
	.balign 4096
	.globl pml4
pml4:
	.quad	pdpt + 0x003
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + 0x003
	.quad	pd + 0x1000 + 0x003
	.quad	pd + 0x2000 + 0x003
	.quad	pd + 0x3000 + 0x003
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	1536
	.quad	(i << 21) | 0x083		/* P | RW | PS */
	.set	i, i + 1
	.endr
	.rept	512
	.quad	(i << 21) | 0x09b		/* P | RW | PWT | PCD | PS */
	.set	i, i + 1
	.endr

/* ---------------------------------------------------------------------------------------- */

	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* 0x08: 64-bit code, accessed */
	.quad	0x00cf93000000ffff	/* 0x10: flat data, accessed */
	.quad	0x00cf9b000000ffff	/* 0x18: flat 32-bit code, accessed */
gdt_end:
	.balign 16
gdt_desc:				/* lgdt in 32-bit mode reads limit + low 4 bytes of base */
	.word	gdt_end - gdt - 1
	.quad	gdt

	.balign 4
	.globl	ap_arrivals
ap_arrivals:				/* arrival order of APs: index of their stack */
	.long	0

	.section .stack, "aw", @nobits
	.balign 4096
bsp_stack:
	.skip	BSP_STACK_SIZE
bsp_stack_top:
	.globl	ap_stacks
ap_stacks:
	.skip	AP_STACKS << AP_STACK_SHIFT

/* ---------------------------------------------------------------------------------------- */

	.section .text.entry, "ax", @progbits

/* PVH: 32-bit protected mode, paging off, flat segments, %ebx = struct hvm_start_info. */
	.code32
	.globl	pvh_start32
pvh_start32:
	cli
	cld
	movl	%ebx, %esi
	movl	$KIND_PVH, %edi
	jmp	pm32_common

/* APs arrive here from the trampoline: protected mode on our GDT, CS = 0x18, but the
 * data segments still have real-mode limits (64 KiB): load flat ones first. */
ap_pm32:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	$KIND_AP, %edi
	xorl	%esi, %esi

/* %edi = kind, %esi = boot information pointer. */
pm32_common:
	lgdt	gdt_desc
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx	/* EFER */
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $long64

	.code64
long64:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	cmpl	$KIND_AP, %edi
	je	ap64
	jmp	bsp64

/* Linux 64-bit boot protocol: long mode, paging on (low memory identity mapped),
 * %rsi = struct boot_params. Switch to our own GDT, stack and page tables. */
	.globl	_start64
_start64:
	cli
	cld
	leaq	bsp_stack_top(%rip), %rsp
	lgdt	gdt_desc(%rip)
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	pushq	$SEL_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	leaq	pml4(%rip), %rax
	movq	%rax, %cr3
	movl	$KIND_LINUX64, %edi

/* BSP: %edi = kind, %rsi = boot information. */
bsp64:
	leaq	bsp_stack_top(%rip), %rsp
	leaq	__bss_start(%rip), %rax
	leaq	__bss_end(%rip), %rcx
2:	cmpq	%rcx, %rax
	jae	3f
	movq	$0, (%rax)
	addq	$8, %rax
	jmp	2b
3:	call	probe_main
	jmp	halt_forever

ap64:
	movl	$1, %eax
	lock xaddl %eax, ap_arrivals(%rip)
	cmpl	$AP_STACKS, %eax
	jae	halt_forever
	incl	%eax
	shlq	$AP_STACK_SHIFT, %rax
	leaq	ap_stacks(%rip), %rsp
	addq	%rax, %rsp
	call	ap_main

	.globl	halt_forever
halt_forever:
	cli
	hlt
	jmp	halt_forever

/* ---------------------------------------------------------------------------------------- */
/* AP trampoline, copied to TRAMP_ADDR: starts in real mode at CS:IP = 0x0800:0000. */

	.section .rodata.tramp, "a", @progbits
	.code16
	.globl	tramp_start, tramp_end
tramp_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	lgdtl	T(tramp_gdtr)
	movl	%cr0, %eax
	orl	$1, %eax		/* PE */
	movl	%eax, %cr0
	ljmpl	$SEL_CODE32, $ap_pm32
	.balign 8
tramp_gdtr:
	.word	gdt_end - gdt - 1
	.long	gdt
tramp_end:
	.code64
