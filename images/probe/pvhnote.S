/* Xen PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), desc = 32-bit physical address of the
 * 32-bit PVH entry point. Linked into probe.elf only. 4-byte aligned (p_align 4), as
 * loaders that align the name to p_align expect. */
	.section .note.Xen, "a", @note
	.balign 4
	.long	4		/* namesz: "Xen\0" */
	.long	4		/* descsz */
	.long	18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign 4
	.long	pvh_start32
	.balign 4
