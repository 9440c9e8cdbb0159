/* 64-bit entry of the probe guest, entered exactly like a vmlinux:
 * long mode, identity-mapped paging, rsi = struct boot_params *. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    cli
    lea     stack_top(%rip), %rsp
    mov     %rsi, %rdi
    call    probe_main
1:  cli
    hlt
    jmp     1b

    .section .bss
    .balign 16
stack_bottom:
    .skip   65536
stack_top:
