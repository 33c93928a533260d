//! The image's first code: Multiboot 1 and Multiboot 2 headers and the 32-bit protected-mode
//! entry that switches to long mode and calls the kernel's `kernel_main(magic, info)`.
//!
//! Multiboot 1 (spec 0.6.96 §3.1) with flags bit 16 ("address fields valid") so loaders that
//! do not parse ELF64 (QEMU `-kernel`, iPXE) load the file linearly; Multiboot 2 (spec 2.0
//! §3.1) with address and entry-address tags for GRUB's `multiboot2`. Both enter `_start32` in
//! 32-bit protected mode with paging off, EAX = magic and EBX = physical info pointer.
//!
//! The trampoline identity-maps the first 4 GiB with 2 MiB pages (PML4[0] → one PDPT → four
//! page directories), so the local APIC, IOAPIC and 32-bit PCI BARs are reachable. The tables
//! are exported (`boot_pml4`, `boot_pdpt`) so the kernel can add mappings above 4 GiB later.

core::arch::global_asm!(
    r#"
    .set MB1_MAGIC, 0x1BADB002
    .set MB1_FLAGS, 0x00010003          /* page-align modules, memory info, address fields */
    .set MB2_MAGIC, 0xE85250D6

    .section .multiboot, "a"
    .balign 8
mb1_header:
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long -(MB1_MAGIC + MB1_FLAGS)
    .long mb1_header                    /* header_addr */
    .long __load_start                  /* load_addr */
    .long __load_end                    /* load_end_addr */
    .long __bss_end                     /* bss_end_addr */
    .long _start32                      /* entry_addr */

    .balign 8
mb2_header:
    .long MB2_MAGIC
    .long 0                             /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long -(MB2_MAGIC + (mb2_header_end - mb2_header))
    .balign 8
    .short 2, 0                         /* address tag */
    .long 24
    .long mb2_header, __load_start, __load_end, __bss_end
    .balign 8
    .short 3, 0                         /* entry address tag */
    .long 12
    .long _start32
    .balign 8
    .short 0, 0                         /* end tag */
    .long 8
mb2_header_end:

    .section .boot.text, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov $boot_stack_top, %esp
    mov %eax, %edi                      /* boot protocol magic */
    mov %ebx, %esi                      /* boot info pointer */

    /* Long mode available? CPUID 0x80000001 EDX bit 29. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb no_long_mode
    mov $0x80000001, %eax
    cpuid
    test $(1 << 29), %edx
    jz no_long_mode

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories. */
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 1b

    /* 2048 2 MiB pages: present | writable | page size. */
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax                  /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx               /* EFER */
    rdmsr
    or $(1 << 8), %eax                  /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* PG | PE */
    mov %eax, %cr0

    lgdt boot_gdt_pointer
    ljmp $0x08, $long_mode_entry

no_long_mode:
    mov $no_long_mode_message, %esi
3:  lodsb
    test %al, %al
    jz 5f
    mov %al, %bl
    mov $0x3FD, %dx                     /* COM1 line status: wait for THR empty */
4:  in %dx, %al
    test $0x20, %al
    jz 4b
    mov $0x3F8, %dx
    mov %bl, %al
    out %al, %dx
    jmp 3b
5:  hlt
    jmp 5b

    .code64
long_mode_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    mov %edi, %edi                      /* zero-extend magic and info pointer */
    mov %esi, %esi
    xor %ebp, %ebp
    call kernel_main
6:  cli
    hlt
    jmp 6b

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10: data */
boot_gdt_end:
boot_gdt_pointer:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
no_long_mode_message:
    .asciz "snapfw: this CPU has no long mode (x86_64); halting\r\n"

    .section .bss.boot_tables, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
    .global boot_pdpt
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .global boot_stack_bottom
boot_stack_bottom:
    .skip 64 * 1024
    .global boot_stack_top
boot_stack_top:
"#,
    options(att_syntax)
);
