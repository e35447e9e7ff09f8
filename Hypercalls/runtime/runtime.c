/*
 * runtime.c — the guest runtime between the boot stub (boot.S) and the guest's main:
 * hypervisor detection, the hypercall page, the console, shutdown, the fault report,
 * the heap, and the few C library functions Embedded Swift and C guests need.
 *
 * Freestanding C11: no libc, no SSE/MMX/x87 (built with -mno-sse -mno-mmx).
 */

#include <stddef.h>
#include <stdint.h>

#include <vireo/xen.h>
#include <vireo/sched.h>
#include <vireo/hvm/start_info.h>

#include "vireo_guest.h"

/* Bounds from guest.ld. */
extern char __heap_start[];
extern char __image_start[];
extern void (*__init_array_start[])(void);
extern void (*__init_array_end[])(void);

int main(int argc, char **argv);

/* ---------------------------------------------------------------------------------------
 * Port I/O, CPUID, MSRs
 * ------------------------------------------------------------------------------------- */

static inline void outb(uint16_t port, uint8_t value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t value) {
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline void wrmsr(uint32_t msr, uint64_t value) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

static _Noreturn void halt_forever(void) {
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}

/* ---------------------------------------------------------------------------------------
 * Hypervisor detection and the hypercall page
 * ------------------------------------------------------------------------------------- */

/* The host fills it with 32-byte stubs; identity-mapped and executable (no NX in our map). */
static uint8_t hypercall_page[VIREO_ABI_PAGE_SIZE] __attribute__((aligned(VIREO_ABI_PAGE_SIZE), section(".bss.hypercall_page")));
static int have_hypercalls;
static char hypervisor_name[48] = "none";

static void append(char *buffer, size_t size, size_t *at, const char *text) {
    while (*text && *at + 1 < size) buffer[(*at)++] = *text++;
    buffer[*at] = 0;
}

static void append_decimal(char *buffer, size_t size, size_t *at, uint32_t value) {
    char digits[10];
    int n = 0;
    do { digits[n++] = (char)('0' + value % 10); value /= 10; } while (value);
    while (n && *at + 1 < size) buffer[(*at)++] = digits[--n];
    buffer[*at] = 0;
}

static void detect_hypervisor(void) {
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 31))) return; /* no hypervisor bit: bare metal or an emulator saying none */
    /* Xen's leaves may sit at 0x40000000 or, beside another interface, a multiple of 0x100 above. */
    for (uint32_t base = VIREO_XEN_CPUID_FIRST_LEAF; base <= VIREO_XEN_CPUID_FIRST_LEAF + 0x400; base += 0x100) {
        cpuid(base, &a, &b, &c, &d);
        if (b == VIREO_XEN_CPUID_SIGNATURE_EBX && c == VIREO_XEN_CPUID_SIGNATURE_ECX &&
            d == VIREO_XEN_CPUID_SIGNATURE_EDX && a >= base + 2) {
            uint32_t version, pages, msr, unused;
            cpuid(base + 1, &version, &unused, &unused, &unused);
            cpuid(base + 2, &pages, &msr, &unused, &unused);
            size_t at = 0;
            append(hypervisor_name, sizeof hypervisor_name, &at, "Xen ");
            append_decimal(hypervisor_name, sizeof hypervisor_name, &at, version >> 16);
            append(hypervisor_name, sizeof hypervisor_name, &at, ".");
            append_decimal(hypervisor_name, sizeof hypervisor_name, &at, version & 0xffff);
            append(hypervisor_name, sizeof hypervisor_name, &at, " (XenVMMXenVMM)");
            if (pages >= 1) {
                wrmsr(msr, (uint64_t)(uintptr_t)hypercall_page); /* page index 0 in the low bits */
                have_hypercalls = 1;
            }
            return;
        }
        if (base == VIREO_XEN_CPUID_FIRST_LEAF) {
            /* Remember the first signature (KVM, TCG, ...) in case Xen is not found above it. */
            uint32_t words[3] = {b, c, d};
            const char *bytes = (const char *)words;
            size_t at = 0;
            for (int i = 0; i < 12 && bytes[i]; i++) hypervisor_name[at++] = bytes[i];
            hypervisor_name[at] = 0;
            if (at == 0) append(hypervisor_name, sizeof hypervisor_name, &at, "unknown");
        }
    }
}

const void *vireo_guest_hypercall_page(void) { return have_hypercalls ? hypercall_page : 0; }

long vireo_guest_hypercall(unsigned nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5) {
    if (!have_hypercalls || nr >= VIREO_ABI_HYPERCALL_SLOTS) return -VIREO_XEN_ENOSYS;
    register uint64_t rdi __asm__("rdi") = a1;
    register uint64_t rsi __asm__("rsi") = a2;
    register uint64_t rdx __asm__("rdx") = a3;
    register uint64_t r10 __asm__("r10") = a4;
    register uint64_t r8 __asm__("r8") = a5;
    long rax;
    void *stub = hypercall_page + nr * VIREO_ABI_HYPERCALL_STUB_SIZE;
    /* The argument registers are clobbered (Xen may scribble on them); the stub keeps the rest. */
    __asm__ volatile("call *%[stub]"
                     : "=a"(rax), "+r"(rdi), "+r"(rsi), "+r"(rdx), "+r"(r10), "+r"(r8)
                     : [stub] "r"(stub)
                     : "memory", "cc");
    return rax;
}

int vireo_guest_has_hypercalls(void) { return have_hypercalls; }
const char *vireo_guest_hypervisor(void) { return hypervisor_name; }

/* ---------------------------------------------------------------------------------------
 * Console: putchar buffers a line, so a line costs one hypercall (one exit), not one per byte.
 * ------------------------------------------------------------------------------------- */

static char line[256];
static size_t line_length;

static void console_emit(const char *bytes, size_t count) {
    if (have_hypercalls) {
        while (count) {
            long r = vireo_guest_hypercall(VIREO_HYPERVISOR_console_io, VIREO_CONSOLEIO_write, count,
                                           (uint64_t)(uintptr_t)bytes, 0, 0);
            if (r < 0) return;
            /* Xen returns 0 for "all written"; a positive value is a partial count. */
            size_t written = r > 0 && (size_t)r < count ? (size_t)r : count;
            bytes += written;
            count -= written;
        }
    } else {
        for (size_t i = 0; i < count; i++) outb(VIREO_XEN_HVM_DEBUGCONS_IOPORT, (uint8_t)bytes[i]);
    }
}

void vireo_guest_console_flush(void) {
    if (line_length) console_emit(line, line_length);
    line_length = 0;
}

void vireo_guest_console_write(const char *bytes, size_t count) {
    vireo_guest_console_flush();
    console_emit(bytes, count);
}

int putchar(int c) {
    line[line_length++] = (char)c;
    if (c == '\n' || line_length == sizeof line) vireo_guest_console_flush();
    return (unsigned char)c;
}

static void put_text(const char *text) {
    vireo_guest_console_write(text, strlen(text));
}

static void put_hex(uint64_t value) {
    char text[19] = "0x";
    int n = 2;
    int shift = 60;
    while (shift > 0 && ((value >> shift) & 0xf) == 0) shift -= 4;
    for (; shift >= 0; shift -= 4) text[n++] = "0123456789abcdef"[(value >> shift) & 0xf];
    vireo_guest_console_write(text, (size_t)n);
}

/* ---------------------------------------------------------------------------------------
 * Shutdown
 * ------------------------------------------------------------------------------------- */

/* QEMU's isa-debug-exit port (a convention of this runtime, not of Xen). */
#define DEBUG_EXIT_PORT 0xf4

_Noreturn void vireo_guest_shutdown(unsigned reason) {
    vireo_guest_console_flush();
    if (have_hypercalls) {
        struct vireo_sched_shutdown shutdown = {.reason = reason};
        vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_shutdown,
                              (uint64_t)(uintptr_t)&shutdown, 0, 0, 0);
    } else {
        outl(DEBUG_EXIT_PORT, reason);
    }
    halt_forever();
}

/* ---------------------------------------------------------------------------------------
 * Event upcalls: boot.S's upcall_stub calls here at VIREO_GUEST_UPCALL_VECTOR.
 * ------------------------------------------------------------------------------------- */

static volatile uint8_t *upcall_flag;
static volatile uint64_t upcall_count;

void vireo_runtime_upcall(void) {
    if (upcall_flag) *upcall_flag = 0;
    upcall_count++;
}

void vireo_guest_upcall_acknowledge(volatile uint8_t *upcall_pending) { upcall_flag = upcall_pending; }

uint64_t vireo_guest_upcalls(void) { return upcall_count; }

void vireo_guest_wait_for_event(volatile const uint8_t *upcall_pending) {
    __asm__ volatile("cli" ::: "memory");
    if (*upcall_pending) return;
    /* STI's one-instruction shadow: an upcall already due is taken at the HLT, never lost. */
    __asm__ volatile("sti; hlt; cli" ::: "memory");
}

/* ---------------------------------------------------------------------------------------
 * Faults: boot.S's stubs build this frame and call here on every exception vector.
 * ------------------------------------------------------------------------------------- */

struct vireo_fault_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

static const char *const vector_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode: a Swift trap", "#NM device not available", "#DF double fault", "coprocessor overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection", "reserved", "reserved",
    "reserved", "reserved", "reserved", "reserved", "#HV injection", "#VC VMM communication",
    "#SX security", "reserved",
};

static int in_fault;

void vireo_runtime_fault(struct vireo_fault_frame *frame) {
    if (in_fault) halt_forever(); /* a fault while reporting one: stop rather than loop */
    in_fault = 1;
    put_text("\nvireo: fault: vector ");
    char number[3] = {(char)('0' + frame->vector / 10), (char)('0' + frame->vector % 10), 0};
    put_text(frame->vector >= 10 ? number : number + 1);
    put_text(" (");
    put_text(vector_names[frame->vector & 31]);
    put_text(") error ");
    put_hex(frame->error_code);
    put_text(" rip ");
    put_hex(frame->rip);
    put_text(" rsp ");
    put_hex(frame->rsp);
    if (frame->vector == 14) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        put_text(" cr2 ");
        put_hex(cr2);
    }
    put_text("\nvireo: shutting down (crash)\n");
    vireo_guest_shutdown(VIREO_SHUTDOWN_crash);
}

/* ---------------------------------------------------------------------------------------
 * Memory: a bump allocator with one free list per power-of-two size class. Each block
 * starts with a header recording its class; free puts the block on its class's list.
 * ------------------------------------------------------------------------------------- */

#define HEAP_MINIMUM    (1u << 20)           /* assumed when the loader gives no memory map */
#define IDENTITY_MAPPED (1ull << 30)         /* boot.S maps the first 1 GiB */
#define MIN_CLASS       5                    /* 32-byte blocks: header + 16 bytes */
#define MAX_CLASS       40

struct block_header {
    uint64_t block;   /* the block's start (the list link lives there while it is free) */
    uint32_t class_;  /* log2 of the block size */
    uint32_t magic;
};
#define BLOCK_MAGIC 0x5649524fu /* "VIRO" */

/* Blocks grow up from heap_next; whole pages (page-aligned requests of at most a page: ring
 * pages, grant pages) grow down from heap_end to page_low, each costing exactly one page. */
static uintptr_t heap_next, heap_end, page_low, page_top;
static void *free_lists[MAX_CLASS + 1];
static void *free_pages;

static void heap_init(uintptr_t end) {
    heap_next = (uintptr_t)__heap_start;
    heap_end = end > heap_next ? end : heap_next + HEAP_MINIMUM;
    page_top = page_low = heap_end & ~(uintptr_t)4095;
}

static int is_page_block(uintptr_t p) { return p >= page_low && p < page_top && (p & 4095) == 0; }

int posix_memalign(void **result, size_t alignment, size_t size) {
    if (alignment < 16) alignment = 16;
    if (alignment & (alignment - 1)) return 22; /* EINVAL */
    if (alignment == 4096 && size <= 4096) {
        uintptr_t page;
        if (free_pages) {
            page = (uintptr_t)free_pages;
            free_pages = *(void **)free_pages;
        } else {
            if (page_low < heap_next + 4096) return 12; /* ENOMEM */
            page_low -= 4096;
            page = page_low;
        }
        *result = (void *)page;
        return 0;
    }
    size_t needed = size + sizeof(struct block_header) + (alignment > 16 ? alignment : 0);
    if (needed < size) return 12; /* ENOMEM: overflow */
    unsigned class_ = MIN_CLASS;
    while (class_ < MAX_CLASS && ((size_t)1 << class_) < needed) class_++;
    if (((size_t)1 << class_) < needed) return 12;
    uintptr_t block;
    if (free_lists[class_]) {
        block = (uintptr_t)free_lists[class_];
        free_lists[class_] = *(void **)free_lists[class_];
    } else {
        size_t bytes = (size_t)1 << class_;
        block = (heap_next + 15) & ~(uintptr_t)15;
        if (block + bytes < block || block + bytes > page_low) return 12;
        heap_next = block + bytes;
    }
    uintptr_t user = (block + sizeof(struct block_header) + alignment - 1) & ~(uintptr_t)(alignment - 1);
    struct block_header *header = (struct block_header *)user - 1;
    header->block = block;
    header->class_ = class_;
    header->magic = BLOCK_MAGIC;
    *result = (void *)user;
    return 0;
}

void *malloc(size_t size) {
    void *p;
    return posix_memalign(&p, 16, size) == 0 ? p : NULL;
}

void *calloc(size_t count, size_t size) {
    size_t total = count * size;
    if (size && total / size != count) return NULL;
    void *p = malloc(total);
    if (p) memset(p, 0, total);
    return p;
}

void free(void *pointer) {
    if (!pointer) return;
    if (is_page_block((uintptr_t)pointer)) {
        *(void **)pointer = free_pages;
        free_pages = pointer;
        return;
    }
    struct block_header *header = (struct block_header *)pointer - 1;
    if (header->magic != BLOCK_MAGIC || header->class_ > MAX_CLASS) {
        put_text("\nvireo: free of a pointer the heap did not allocate\n");
        vireo_guest_shutdown(VIREO_SHUTDOWN_crash);
    }
    header->magic = 0; /* a second free of the same pointer is caught above */
    void **block = (void **)(uintptr_t)header->block;
    *block = free_lists[header->class_];
    free_lists[header->class_] = block;
}

/* String instructions rather than loops, so the compiler cannot turn them back into calls. */
void *memset(void *dest, int value, size_t count) {
    void *d = dest;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(count) : "a"(value) : "memory");
    return dest;
}

void *memcpy(void *dest, const void *src, size_t count) {
    void *d = dest;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(count) : : "memory");
    return dest;
}

void *memmove(void *dest, const void *src, size_t count) {
    if ((uintptr_t)dest <= (uintptr_t)src || (uintptr_t)dest >= (uintptr_t)src + count) return memcpy(dest, src, count);
    /* Overlapping with dest above src: copy backwards. */
    void *d = (char *)dest + count - 1;
    const void *s = (const char *)src + count - 1;
    __asm__ volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(count) : : "memory");
    return dest;
}

int memcmp(const void *a, const void *b, size_t count) {
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < count; i++) {
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    }
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

/* Embedded Swift's hashing seeds (Set, Dictionary). A fixed sequence: guests get no entropy here. */
void arc4random_buf(void *buffer, size_t count) {
    static uint64_t state = 0x9e3779b97f4a7c15ull;
    unsigned char *out = buffer;
    for (size_t i = 0; i < count; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out[i] = (unsigned char)state;
    }
}

/* ---------------------------------------------------------------------------------------
 * Start of day: called by boot.S in long mode, on the boot stack, with the IDT loaded.
 * ------------------------------------------------------------------------------------- */

static char cmdline[1024];

const char *vireo_guest_cmdline(void) { return cmdline; }

/*
 * Copies what the guest keeps from hvm_start_info (nothing else reads it later: the heap
 * may cover it) and returns where the heap may end.
 */
static uintptr_t read_start_info(uint32_t start_info_paddr) {
    uintptr_t heap_limit = 0;
    const struct vireo_hvm_start_info *info = (const void *)(uintptr_t)start_info_paddr;
    if (!info || info->magic != VIREO_XEN_HVM_START_MAGIC_VALUE) return 0;
    if (info->cmdline_paddr && info->cmdline_paddr < IDENTITY_MAPPED) {
        const char *text = (const char *)(uintptr_t)info->cmdline_paddr;
        size_t n = 0;
        while (n + 1 < sizeof cmdline && text[n]) { cmdline[n] = text[n]; n++; }
        cmdline[n] = 0;
    }
    /* The heap runs to the end of the RAM range holding the image, inside the identity map. */
    if (info->version >= 1 && info->memmap_paddr && info->memmap_entries) {
        const struct vireo_hvm_memmap_table_entry *map = (const void *)(uintptr_t)info->memmap_paddr;
        uintptr_t start = (uintptr_t)__heap_start;
        for (uint32_t i = 0; i < info->memmap_entries; i++) {
            if (map[i].type != VIREO_XEN_HVM_MEMMAP_TYPE_RAM) continue;
            if (map[i].addr <= (uintptr_t)__image_start && start < map[i].addr + map[i].size) {
                uint64_t end = map[i].addr + map[i].size;
                heap_limit = end < IDENTITY_MAPPED ? (uintptr_t)end : (uintptr_t)IDENTITY_MAPPED;
            }
        }
    }
    /* Modules (an initrd) above the image stay untouched. */
    if (info->nr_modules && info->modlist_paddr) {
        const struct vireo_hvm_modlist_entry *modules = (const void *)(uintptr_t)info->modlist_paddr;
        for (uint32_t i = 0; i < info->nr_modules; i++) {
            if (modules[i].paddr >= (uintptr_t)__heap_start && modules[i].paddr < heap_limit) {
                heap_limit = (uintptr_t)modules[i].paddr;
            }
        }
    }
    return heap_limit;
}

_Noreturn void vireo_runtime_start(uint32_t start_info_paddr) {
    detect_hypervisor();
    heap_init(read_start_info(start_info_paddr));
    for (void (**constructor)(void) = __init_array_start; constructor < __init_array_end; constructor++) {
        (*constructor)();
    }
    static char program[] = "guest";
    char *argv[] = {program, NULL};
    int status = main(1, argv);
    if (status != 0) {
        put_text("vireo: main returned ");
        put_hex((uint64_t)(unsigned)status);
        put_text("; shutting down (crash)\n");
        vireo_guest_shutdown(VIREO_SHUTDOWN_crash);
    }
    vireo_guest_shutdown(VIREO_SHUTDOWN_poweroff);
}
