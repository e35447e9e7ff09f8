/*
 * evtchnping: an event-channel ping-pong guest for `vireo bench evtchn`. The host allocates an
 * unbound port in its own domain (dom0) for this guest and names it on the command line
 * ("port=N rounds=M", rounds 1000 by default); the host's end echoes every event back. The
 * guest places shared_info (XENMEM_add_to_physmap), binds the host's port
 * (EVTCHNOP_bind_interdomain), then M times: EVTCHNOP_send on its port, SCHEDOP_poll on it
 * until it is pending (the echo), and clears the pending bit. The port is masked, as Linux's
 * paravirtual spinlocks mask theirs: no upcall is ever raised for it, and SCHEDOP_poll still
 * wakes when it becomes pending (Xen's evtchn_check_pollers). It prints
 * "evtchnping: M round trips ok" and powers off; any failure prints "evtchnping: FAIL ..." and
 * crashes the domain. The host times the rounds (two runs of different lengths, so booting
 * cancels out).
 */
#include <vireo/vireo.h>
#include <vireo_guest.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static void say_number(const char *before, unsigned long n, const char *after) {
    char digits[24];
    int d = 0;
    do { digits[d++] = (char)('0' + n % 10); n /= 10; } while (n);
    char line[96];
    size_t len = 0;
    for (const char *p = before; *p && len < 40; p++) line[len++] = *p;
    while (d) line[len++] = digits[--d];
    for (const char *p = after; *p && len < 94; p++) line[len++] = *p;
    vireo_guest_console_write(line, len);
}

static _Noreturn void fail(const char *what, long code) {
    say("evtchnping: FAIL ");
    say(what);
    say_number(" (", (unsigned long)(code < 0 ? -code : code), code < 0 ? ", negative)\n" : ")\n");
    vireo_guest_shutdown(VIREO_SHUTDOWN_crash);
}

/* The value of "key=" on the command line (decimal), or `otherwise`. */
static unsigned long option(const char *cmdline, const char *key, unsigned long otherwise) {
    size_t k = strlen(key);
    for (const char *p = cmdline; *p; p++) {
        if ((p == cmdline || p[-1] == ' ') && memcmp(p, key, k) == 0 && p[k] == '=') {
            unsigned long n = 0;
            for (p += k + 1; *p >= '0' && *p <= '9'; p++) n = n * 10 + (unsigned long)(*p - '0');
            return n;
        }
    }
    return otherwise;
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    if (!vireo_guest_has_hypercalls()) fail("no hypervisor with hypercalls", 0);
    const char *cmdline = vireo_guest_cmdline();
    unsigned long remote = option(cmdline, "port", 0), rounds = option(cmdline, "rounds", 1000);
    if (remote == 0) fail("no port= on the command line", 0);

    /* shared_info in the hole above RAM, as Xen guests place it (inside the boot stub's 1 GiB
     * identity map for any RAM size a sample uses). */
    struct vireo_xen_memory_domain self = { .domid = VIREO_DOMID_SELF };
    long pages = vireo_guest_hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_current_reservation,
                                       (uint64_t)(uintptr_t)&self, 0, 0, 0);
    if (pages <= 0) fail("XENMEM_current_reservation", pages);
    struct vireo_xen_add_to_physmap place = {
        .domid = VIREO_DOMID_SELF, .space = VIREO_XENMAPSPACE_shared_info, .idx = 0, .gpfn = (uint64_t)pages + 16 };
    long r = vireo_guest_hypercall(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_add_to_physmap, (uint64_t)(uintptr_t)&place, 0, 0, 0);
    if (r != 0) fail("XENMEM_add_to_physmap(shared_info)", r);
    volatile struct vireo_shared_info *shared = (volatile struct vireo_shared_info *)(uintptr_t)(place.gpfn << 12);

    struct vireo_evtchn_bind_interdomain bind = { .remote_dom = 0, .remote_port = (vireo_evtchn_port_t)remote };
    r = vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_bind_interdomain,
                              (uint64_t)(uintptr_t)&bind, 0, 0, 0);
    if (r != 0) fail("EVTCHNOP_bind_interdomain", r);
    vireo_evtchn_port_t port = bind.local_port;
    volatile vireo_xen_ulong_t *word = &shared->evtchn_pending[port / 64];
    vireo_xen_ulong_t bit = (vireo_xen_ulong_t)1 << (port % 64);
    /* Masked before the first send: the echoes raise no selector and no upcall, only the bit. */
    __atomic_fetch_or(&shared->evtchn_mask[port / 64], bit, __ATOMIC_SEQ_CST);
    /* A new interdomain port starts pending: nothing has been sent yet, so let it go. */
    __atomic_fetch_and(word, ~bit, __ATOMIC_SEQ_CST);

    struct vireo_evtchn_send send = { .port = port };
    struct vireo_sched_poll poll = { .ports = (uint64_t)(uintptr_t)&port, .nr_ports = 1, .timeout = 0 };
    /* The round trips run in a loop of hand-written instructions, like the raw exit loop the
     * benchmark sets beside them: on an emulating host every guest instruction costs a good
     * part of a microsecond, and the benchmark is after the hypervisor's cost, not the loop's.
     * Each calls the page's stubs the way Linux's hypercall macros do (call into the page,
     * arguments in RDI and RSI; the stubs may change RAX, RDI, RSI, RDX, R10 and R8) and takes
     * the answer with one locked test-and-clear (Linux's sync_test_and_clear_bit). Only when
     * the answer is not there yet does it look at the send's result (a failed send is never
     * answered) and poll. The loop makes two round trips a turn (an odd one first). */
    const void *event_channel_op = vireo_guest_hypercall_stub(VIREO_HYPERVISOR_event_channel_op);
    const void *sched_op = vireo_guest_hypercall_stub(VIREO_HYPERVISOR_sched_op);
    uint64_t send_arg = (uint64_t)(uintptr_t)&send, poll_arg = (uint64_t)(uintptr_t)&poll;
    unsigned long single = rounds % 2, pairs = rounds / 2, bit_number = port % 64;
    unsigned long status = 0; /* 1: a send failed, 2: a poll failed; RAX then has its result */
    long last = 0;
/* One round trip; on a miss, out of line to label N1 and back at N2. */
#define ROUND(N)                                                                                 \
    "    movl %[send_cmd], %%edi\n"                                                             \
    "    movq %[send_arg], %%rsi\n"                                                             \
    "    call *%[evtchn]\n"                                                                     \
    "    lock btrq %[bit], (%[word])\n"                                                         \
    "    jnc " #N "1f\n"                                                                        \
    #N "2:\n"
/* The miss of round N: the send's result, then poll until the answer is there. */
#define MISS(N)                                                                                  \
    #N "1: testq %%rax, %%rax\n"                                                                \
    "    jnz 80f\n"                                                                             \
    #N "3: movl %[poll_cmd], %%edi\n"                                                           \
    "    movq %[poll_arg], %%rsi\n"                                                             \
    "    call *%[sched]\n"                                                                      \
    "    testq %%rax, %%rax\n"                                                                  \
    "    jnz 81f\n"                                                                             \
    "    lock btrq %[bit], (%[word])\n"                                                         \
    "    jnc " #N "3b\n"                                                                        \
    "    jmp " #N "2b\n"
    __asm__ volatile(
        "    testq %[single], %[single]\n"
        "    jz 20f\n"
        ROUND(1)
        "20: testq %[pairs], %[pairs]\n"
        "    jz 90f\n"
        "30:\n"
        ROUND(3)
        ROUND(4)
        "    decq %[pairs]\n"
        "    jnz 30b\n"
        "    jmp 90f\n"
        MISS(1)
        MISS(3)
        MISS(4)
        "80: movl $1, %k[status]\n"
        "    jmp 90f\n"
        "81: movl $2, %k[status]\n"
        "90:\n"
        : [pairs] "+r"(pairs), [status] "+r"(status), "=&a"(last)
        : [single] "r"(single), [send_cmd] "i"(VIREO_EVTCHNOP_send), [poll_cmd] "i"(VIREO_SCHEDOP_poll),
          [send_arg] "r"(send_arg), [poll_arg] "m"(poll_arg), [evtchn] "r"(event_channel_op),
          [sched] "m"(sched_op), [bit] "r"(bit_number), [word] "r"(word)
        : "rdi", "rsi", "rdx", "r10", "r8", "memory", "cc");
#undef ROUND
#undef MISS
    if (status == 1) fail("EVTCHNOP_send", last);
    if (status == 2) fail("SCHEDOP_poll", last);
    say_number("evtchnping: ", rounds, " round trips ok\n");
    return 0;
}
