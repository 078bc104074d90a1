; The boot sector of the netboot tests' HTTP SAN disk (nasm -f bin).
; BIOS loads it from the disk iPXE's `sanboot` attached; it prints a line, reads
; sector 2048 (1 MiB into the disk) with an INT 13h extended read, which iPXE turns into
; an HTTP Range GET, and prints the text it finds there. Output goes to COM1 directly
; and through the BIOS, so the test sees it on the serial console.
bits 16
org 0x7c00
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [drive], dl
    mov si, hello
    call print
    mov si, packet
    mov ah, 0x42
    mov dl, [drive]
    int 0x13
    jc failed
    mov si, 0x8000
    call print
    jmp halt
failed:
    mov si, readfail
    call print
halt:
    cli
    hlt
    jmp halt
print:
    lodsb
    test al, al
    jz .done
    mov dx, 0x3f8
    out dx, al
    jmp print
.done:
    ret
drive: db 0
hello: db 'sanboot: boot sector running', 13, 10, 0
readfail: db 'sanboot: disk read FAILED', 13, 10, 0
align 4
packet:
    db 0x10, 0
    dw 1
    dw 0x8000, 0
    dq 2048
times 446-($-$$) db 0
; One partition from sector 2048 to the end of a 16 MiB disk, so firmware sees a disk.
    db 0x80, 0, 0, 0, 0x83, 0, 0, 0
    dd 2048
    dd 30720
times 510-($-$$) db 0
    dw 0xaa55
