/*
 * A C guest for event upcalls with Xen's callback-vector semantics: it adds an IDT gate for
 * vector 0xF3, sets HVM_PARAM_CALLBACK_IRQ to that vector, binds VIRQ_TIMER and arms the timer
 * twice: once while halted (`sti; hlt`: the event must wake the vCPU and arrive as the
 * vector), once while spinning in guest code (the host must kick the running vCPU out to
 * deliver it). The handler returns with IRETQ and never EOIs anything.
 * Prints "upcall ..." lines and "upcall done".
 */
#include <vireo_guest.h>
#include <vireo/vireo.h>

#define VECTOR 0xF3

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static volatile struct vireo_shared_info *shared;
static volatile unsigned upcalls;
static uint32_t timer_port;

struct gate { uint16_t offset0, selector; uint8_t ist, type; uint16_t offset1; uint32_t offset2, reserved; };
static struct gate idt[256] __attribute__((aligned(16)));
struct __attribute__((packed)) idtr { uint16_t limit; uint64_t base; };

void upcall_entry(void);
void upcall_handler(void);
__asm__(".text\n.globl upcall_entry\nupcall_entry:\n"
        "  push %rax\n push %rcx\n push %rdx\n push %rsi\n push %rdi\n push %r8\n push %r9\n push %r10\n push %r11\n"
        "  cld\n call upcall_handler\n"
        "  pop %r11\n pop %r10\n pop %r9\n pop %r8\n pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n pop %rax\n"
        "  iretq\n");

/* The guest's side of the 2-level ABI: acknowledge, then take the pending ports. */
void upcall_handler(void) {
    shared->vcpu_info[0].evtchn_upcall_pending = 0;
    uint64_t sel = __atomic_exchange_n(&shared->vcpu_info[0].evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
    while (sel) {
        int word = __builtin_ctzll(sel);
        sel &= sel - 1;
        uint64_t pending = __atomic_exchange_n(&shared->evtchn_pending[word], 0, __ATOMIC_SEQ_CST);
        if (word == (int)(timer_port / 64) && (pending & (1ull << (timer_port % 64)))) upcalls++;
    }
}

static uint64_t system_time(void) {
    volatile struct vireo_vcpu_time_info *t = &shared->vcpu_info[0].time;
    uint32_t lo, hi, version;
    uint64_t stamp, system;
    do {
        version = t->version;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        stamp = t->tsc_timestamp;
        system = t->system_time;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((version & 1) || version != t->version);
    uint64_t delta = (((uint64_t)hi << 32) | lo) - stamp;
    int8_t shift = t->tsc_shift;
    delta = shift >= 0 ? delta << shift : delta >> -shift;
    return system + (uint64_t)(((unsigned __int128)delta * t->tsc_to_system_mul) >> 32);
}

static long hypercall(unsigned nr, uint64_t a1, uint64_t a2) { return vireo_guest_hypercall(nr, a1, a2, 0, 0, 0); }

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    uint64_t domid = VIREO_DOMID_SELF;
    long pages = hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_current_reservation, (uint64_t)(uintptr_t)&domid);
    struct vireo_xen_add_to_physmap add = {.domid = VIREO_DOMID_SELF, .space = VIREO_XENMAPSPACE_shared_info, .gpfn = (uint64_t)pages + 16};
    if (pages <= 0 || hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_add_to_physmap, (uint64_t)(uintptr_t)&add) != 0) {
        say("FAIL mapping shared_info\n");
        return 1;
    }
    shared = (volatile struct vireo_shared_info *)(uintptr_t)(add.gpfn << 12);

    /* Our own IDT: the runtime's 32 exception gates, plus the callback vector. */
    struct idtr old, new;
    __asm__ volatile("sidt %0" : "=m"(old));
    memcpy(idt, (const void *)(uintptr_t)old.base, (size_t)old.limit + 1);
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t entry = (uint64_t)(uintptr_t)upcall_entry;
    idt[VECTOR] = (struct gate){.offset0 = (uint16_t)entry, .selector = cs, .type = 0x8E,
                                .offset1 = (uint16_t)(entry >> 16), .offset2 = (uint32_t)(entry >> 32)};
    new.limit = sizeof idt - 1;
    new.base = (uint64_t)(uintptr_t)idt;
    __asm__ volatile("lidt %0" : : "m"(new));

    struct vireo_xen_hvm_param callback = {.domid = VIREO_DOMID_SELF, .index = VIREO_HVM_PARAM_CALLBACK_IRQ,
                                           .value = ((uint64_t)VIREO_HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | VECTOR};
    struct vireo_evtchn_bind_virq bind = {.virq = VIREO_VIRQ_TIMER, .vcpu = 0};
    if (hypercall(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_set_param, (uint64_t)(uintptr_t)&callback) != 0 ||
        hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_bind_virq, (uint64_t)(uintptr_t)&bind) != 0) {
        say("FAIL setting up the callback vector or the timer's port\n");
        return 1;
    }
    timer_port = bind.port;

    /* 1. Halted: the event wakes the vCPU and arrives as the vector. */
    hypercall(VIREO_HYPERVISOR_set_timer_op, system_time() + 20000000ull, 0);
    while (upcalls == 0) __asm__ volatile("sti; hlt; cli");
    say("upcall delivered to a halted vCPU\n");

    /* 2. Running: the host must kick the vCPU out of guest code to deliver it. */
    hypercall(VIREO_HYPERVISOR_set_timer_op, system_time() + 20000000ull, 0);
    __asm__ volatile("sti");
    while (upcalls < 2) __asm__ volatile("pause");
    __asm__ volatile("cli");
    say("upcall delivered to a running vCPU\n");
    say("upcall done\n");
    return 0;
}
