/*
 * A C guest for time and events: it maps shared_info above its RAM (XENMEM_add_to_physmap), or,
 * with "inram" on its command line, over a page of its own RAM as Linux does,
 * reads the pvclock in vcpu_info[0] and the wallclock, binds VIRQ_TIMER, arms set_timer_op
 * 30 ms ahead, blocks (SCHEDOP_block) until the timer's event is pending, checks that at least
 * 30 ms of system time passed, and clears the event. Prints "timer ..." lines and "timer done".
 */
#include <vireo_guest.h>
#include <vireo/vireo.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static void number(uint64_t v) {
    char digits[24];
    int i = 0;
    do { digits[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) { char c[2] = {digits[--i], 0}; say(c); }
}

static volatile struct vireo_shared_info *shared;
static uint8_t own_page[4096] __attribute__((aligned(4096)));

static int has_word(const char *line, const char *word) {
    size_t n = strlen(word);
    for (const char *p = line; *p; p++) {
        if ((p == line || p[-1] == ' ') && memcmp(p, word, n) == 0 && (p[n] == 0 || p[n] == ' ')) return 1;
    }
    return 0;
}

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* System time (ns since boot) from the pvclock record, as vireo/xen.h describes. */
static uint64_t now_ns(void) {
    volatile struct vireo_vcpu_time_info *t = &shared->vcpu_info[0].time;
    uint32_t version;
    uint64_t stamp, system, delta;
    uint32_t mul;
    int8_t shift;
    do {
        version = t->version;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        stamp = t->tsc_timestamp;
        system = t->system_time;
        mul = t->tsc_to_system_mul;
        shift = t->tsc_shift;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((version & 1) || version != t->version);
    delta = rdtsc() - stamp;
    delta = shift >= 0 ? delta << shift : delta >> -shift;
    return system + (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    uint64_t domid = VIREO_DOMID_SELF;
    long pages = vireo_guest_hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_current_reservation, (uint64_t)(uintptr_t)&domid, 0, 0, 0);
    if (pages <= 0) { say("FAIL current_reservation\n"); return 1; }
    /* shared_info goes in the hole just above RAM (inside the runtime's 1 GiB identity map). */
    int in_ram = has_word(vireo_guest_cmdline(), "inram");
    struct vireo_xen_add_to_physmap add = {.domid = VIREO_DOMID_SELF, .space = VIREO_XENMAPSPACE_shared_info, .idx = 0,
                                           .gpfn = in_ram ? (uint64_t)(uintptr_t)own_page >> 12 : (uint64_t)pages + 16};
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_add_to_physmap, (uint64_t)(uintptr_t)&add, 0, 0, 0) != 0) {
        say("FAIL add_to_physmap(shared_info)\n");
        return 1;
    }
    shared = (volatile struct vireo_shared_info *)(uintptr_t)(add.gpfn << 12);
    say(in_ram ? "timer shared_info over a RAM page\n" : "timer shared_info above RAM\n");
    if (shared->vcpu_info[0].time.tsc_to_system_mul == 0) { say("FAIL no pvclock record\n"); return 1; }
    uint64_t seconds = shared->wc_sec | ((uint64_t)shared->wc_sec_hi << 32);
    say(seconds > 1700000000ull ? "timer wallclock ok\n" : "FAIL wallclock\n");
    struct vireo_evtchn_bind_virq bind = {.virq = VIREO_VIRQ_TIMER, .vcpu = 0};
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_bind_virq, (uint64_t)(uintptr_t)&bind, 0, 0, 0) != 0) {
        say("FAIL bind_virq\n");
        return 1;
    }
    uint64_t start = now_ns();
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_set_timer_op, start + 30000000ull, 0, 0, 0, 0) != 0) { say("FAIL set_timer_op\n"); return 1; }
    uint64_t word = bind.port / 64, bit = 1ull << (bind.port % 64);
    while (!(shared->evtchn_pending[word] & bit)) {
        vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_block, 0, 0, 0, 0);
    }
    uint64_t elapsed = now_ns() - start;
    __atomic_fetch_and(&shared->evtchn_pending[word], ~bit, __ATOMIC_SEQ_CST);
    shared->vcpu_info[0].evtchn_upcall_pending = 0;
    say("timer fired after "); number(elapsed / 1000000); say(" ms\n");
    if (elapsed < 30000000ull) { say("FAIL the timer fired early\n"); return 1; }
    if (elapsed > 5000000000ull) { say("FAIL the timer fired far too late\n"); return 1; }
    say("timer done\n");
    return 0;
}
