/*
 * vireo_guest.h — what the guest runtime (Hypercalls/runtime) gives a guest's code, in C
 * and in Embedded Swift (`import VireoGuestRuntime`).
 *
 * Before main runs, the runtime has: entered long mode with the first 1 GiB identity-mapped,
 * installed an exception table that reports a fault and shuts the domain down as a crash,
 * found the hypervisor and, under Xen (or Vireo), installed the hypercall page, copied the
 * command line, and set up the heap (malloc/posix_memalign/free).
 *
 * main is called as `int main(int argc, char **argv)` with argc = 1 and argv[0] = "guest";
 * when it returns 0 the domain powers off, otherwise it shuts down as a crash.
 */
#ifndef VIREO_GUEST_H
#define VIREO_GUEST_H

/* The vector of the runtime's event-channel upcall entry (Xen's callback vector, set with
 * HVM_PARAM_CALLBACK_IRQ type 2). Linux's HYPERVISOR_CALLBACK_VECTOR is the same number. */
#define VIREO_GUEST_UPCALL_VECTOR 0xF3

#ifndef __ASSEMBLER__

#include <stddef.h>
#include <stdint.h>
#include <vireo/xen.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The kernel command line from hvm_start_info (copied at boot); "" when none was given. */
const char *vireo_guest_cmdline(void);

/* 1 when the hypervisor is Xen-compatible (CPUID "XenVMMXenVMM") and the hypercall page
 * is installed; 0 otherwise (e.g. QEMU without Xen: console and shutdown use ports). */
int vireo_guest_has_hypercalls(void);

/* A short description of the hypervisor found: "Xen 4.14 (XenVMMXenVMM)", "KVMKVMKVM",
 * "none", ... */
const char *vireo_guest_hypervisor(void);

/*
 * A hypercall through the hypercall page: RDI, RSI, RDX, R10, R8 = a1..a5; returns RAX
 * (>= 0 success, -VIREO_XEN_E* failure). Returns -VIREO_XEN_ENOSYS (-38) when there is
 * no hypercall page. Pointer arguments are guest-virtual addresses (identity-mapped).
 */
/* The installed hypercall page (32-byte stubs, one per hypercall number), or NULL. */
const void *vireo_guest_hypercall_page(void);

long vireo_guest_hypercall(unsigned nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);

/*
 * For hot paths, the way Linux's _hypercall2 calls into the page: the stub of hypercall `nr`
 * (NULL without a hypercall page; look it up once), then calls straight into it with two
 * arguments in RDI and RSI, with none of vireo_guest_hypercall's checks per call.
 */
static inline const void *vireo_guest_hypercall_stub(unsigned nr) {
    const uint8_t *page = (const uint8_t *)vireo_guest_hypercall_page();
    return page && nr < VIREO_ABI_HYPERCALL_SLOTS ? page + nr * VIREO_ABI_HYPERCALL_STUB_SIZE : 0;
}

static inline long vireo_guest_hypercall2_at(const void *stub, uint64_t a1, uint64_t a2) {
    register uint64_t rdi __asm__("rdi") = a1;
    register uint64_t rsi __asm__("rsi") = a2;
    long rax;
    __asm__ volatile("call *%[stub]"
                     : "=a"(rax), "+r"(rdi), "+r"(rsi)
                     : [stub] "r"(stub)
                     : "memory", "cc", "rdx", "r10", "r8");
    return rax;
}

/* Writes bytes to the console: console_io(CONSOLEIO_write) under Xen, else port 0xe9.
 * Output buffered by putchar is written first, so the two never interleave. */
void vireo_guest_console_write(const char *bytes, size_t count);

/* Writes what putchar has buffered (putchar flushes at each newline by itself). */
void vireo_guest_console_flush(void);

/*
 * Stops the domain with a VIREO_SHUTDOWN_* reason (vireo/sched.h): sched_op(SCHEDOP_shutdown)
 * under Xen. Without Xen it writes the reason to port 0xf4, which QEMU's
 * `-device isa-debug-exit,iobase=0xf4,iosize=4` turns into exit status (reason << 1) | 1
 * (poweroff: 1, crash: 7); if nothing stops the guest it halts with interrupts off.
 */
_Noreturn void vireo_guest_shutdown(unsigned reason);

/* The time-stamp counter (RDTSC): what the pvclock record in vcpu_info scales to system time.
 * On kvm_pvm hosts each read exits to the hypervisor (~13k cycles): read it sparingly. */
static inline uint64_t vireo_guest_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/*
 * Event upcalls. The runtime's IDT sends VIREO_GUEST_UPCALL_VECTOR to an entry that clears
 * the byte given to vireo_guest_upcall_acknowledge (vcpu_info's evtchn_upcall_pending, so
 * the hypervisor may deliver the next one) and counts the upcall. The guest runs with
 * interrupts off; vireo_guest_wait_for_event turns them on only to halt, so an upcall never
 * lands in the middle of the guest's own code (Swift code may keep data below the stack
 * pointer) and the interrupted code is always this function.
 */
void vireo_guest_upcall_acknowledge(volatile uint8_t *upcall_pending);
/* Upcalls taken so far. */
uint64_t vireo_guest_upcalls(void);
/* With interrupts off: returns at once when *upcall_pending is set, else halts with
 * interrupts on until an interrupt (the upcall) arrives; returns with interrupts off. */
void vireo_guest_wait_for_event(volatile const uint8_t *upcall_pending);

/* C library pieces the runtime provides (Embedded Swift needs them). */
int putchar(int c);
int posix_memalign(void **result, size_t alignment, size_t size);
void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void free(void *pointer);
void *memset(void *dest, int value, size_t count);
void *memcpy(void *dest, const void *src, size_t count);
void *memmove(void *dest, const void *src, size_t count);
int memcmp(const void *a, const void *b, size_t count);
size_t strlen(const char *s);

#ifdef __cplusplus
}
#endif

#endif /* __ASSEMBLER__ */
#endif /* VIREO_GUEST_H */
