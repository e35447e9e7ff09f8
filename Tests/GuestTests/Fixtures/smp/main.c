/*
 * A C guest with two vCPUs: vCPU 0 gives vCPU 1 a 64-bit initial state (its own stack, the same
 * page tables) with VCPUOP_initialise, starts it with VCPUOP_up, and waits for it. vCPU 1
 * reports through console_io on its own buffer (the runtime's console buffer is vCPU 0's),
 * increments a shared counter many times, and parks in SCHEDOP_block. vCPU 0 does the same
 * count concurrently with a locked add, then checks the total. Prints "smp ..." lines.
 */
#include <vireo_guest.h>
#include <vireo/vireo.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static volatile unsigned long counter;
static volatile int ap_done;
static uint8_t ap_stack[16384] __attribute__((aligned(16)));

#define ROUNDS 2000

void ap_main(void);
void ap_entry(void);
__asm__(".text\n.globl ap_entry\nap_entry:\n  cld\n  call ap_main\n1: hlt\n  jmp 1b\n");

void ap_main(void) {
    static const char line[] = "smp: hello from vCPU 1\n";
    vireo_guest_hypercall(VIREO_HYPERVISOR_console_io, VIREO_CONSOLEIO_write, sizeof line - 1, (uint64_t)(uintptr_t)line, 0, 0);
    for (int i = 0; i < ROUNDS; i++) __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&ap_done, 1, __ATOMIC_SEQ_CST);
    for (;;) vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_block, 0, 0, 0, 0);
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    uint64_t cr0, cr3, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    struct vireo_vcpu_hvm_context ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.mode = VIREO_VCPU_HVM_MODE_64B;
    ctx.cpu_regs.x86_64.rip = (uint64_t)(uintptr_t)ap_entry;
    ctx.cpu_regs.x86_64.rsp = (uint64_t)(uintptr_t)(ap_stack + sizeof ap_stack);
    ctx.cpu_regs.x86_64.rflags = 0x2;
    ctx.cpu_regs.x86_64.cr0 = cr0;
    ctx.cpu_regs.x86_64.cr3 = cr3;
    ctx.cpu_regs.x86_64.cr4 = cr4;
    ctx.cpu_regs.x86_64.efer = 0x500; /* LME | LMA */
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_vcpu_op, VIREO_VCPUOP_is_up, 1, 0, 0, 0) != 0) { say("FAIL vCPU 1 is up already\n"); return 1; }
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_vcpu_op, VIREO_VCPUOP_up, 1, 0, 0, 0) != -VIREO_XEN_EINVAL) { say("FAIL up before initialise\n"); return 1; }
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_vcpu_op, VIREO_VCPUOP_initialise, 1, (uint64_t)(uintptr_t)&ctx, 0, 0) != 0) { say("FAIL initialise\n"); return 1; }
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_vcpu_op, VIREO_VCPUOP_up, 1, 0, 0, 0) != 0) { say("FAIL up\n"); return 1; }
    for (int i = 0; i < ROUNDS; i++) __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&ap_done, __ATOMIC_SEQ_CST)) vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_yield, 0, 0, 0, 0);
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_vcpu_op, VIREO_VCPUOP_is_up, 1, 0, 0, 0) != 1) { say("FAIL vCPU 1 not up\n"); return 1; }
    if (counter != 2 * ROUNDS) { say("FAIL the count is wrong\n"); return 1; }
    say("smp: both vCPUs counted\n");
    say("smp done\n");
    return 0;
}
