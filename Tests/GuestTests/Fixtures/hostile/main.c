/*
 * A C guest that makes hostile hypercalls (wild pointers, huge counts, bad ports, unknown
 * numbers, forbidden parameters) and prints "ok NAME" or "FAIL NAME (got N)" per check, then
 * "hostile done". Under Vireo every one must come back as an error and the guest carries on.
 */
#include <vireo_guest.h>
#include <vireo/vireo.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static int failures;

static void number(long n) {
    char digits[24];
    int i = 0;
    unsigned long v = n < 0 ? (unsigned long)-n : (unsigned long)n;
    do { digits[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    if (n < 0) say("-");
    while (i) { char c[2] = {digits[--i], 0}; say(c); }
}

static void expect(long got, long want, const char *name) {
    say(got == want ? "ok " : "FAIL ");
    say(name);
    if (got != want) { say(" (got "); number(got); say(")"); failures++; }
    say("\n");
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    if (!vireo_guest_has_hypercalls()) { say("FAIL no hypercalls\n"); return 1; }
    const long efault = -VIREO_XEN_EFAULT, einval = -VIREO_XEN_EINVAL, enosys = -VIREO_XEN_ENOSYS;
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_console_io, VIREO_CONSOLEIO_write, 8, 0xdead00000000ull, 0, 0),
           efault, "console_io with a wild pointer");
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_console_io, VIREO_CONSOLEIO_write, ~0ull, 0x100000, 0, 0),
           einval, "console_io with a huge count");
    struct vireo_evtchn_send send = {.port = 4000};
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_send, (uint64_t)(uintptr_t)&send, 0, 0, 0),
           einval, "send on a port beyond the limit");
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_send, 0xfffffffffffff000ull, 0, 0, 0),
           efault, "event_channel_op with a wild pointer");
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_mmu_update, 0, 0, 0, 0, 0), enosys, "a PV-MMU hypercall");
    expect(vireo_guest_hypercall(100, 0, 0, 0, 0, 0), enosys, "an unknown hypercall number");
    struct vireo_xen_hvm_param param = {.domid = VIREO_DOMID_SELF, .index = VIREO_HVM_PARAM_STORE_PFN, .value = 1};
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_set_param, (uint64_t)(uintptr_t)&param, 0, 0, 0),
           -VIREO_XEN_EPERM, "setting the store page");
    param.index = 5000;
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_get_param, (uint64_t)(uintptr_t)&param, 0, 0, 0),
           einval, "a parameter index beyond the table");
    param.index = VIREO_HVM_PARAM_STORE_EVTCHN;
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_get_param, (uint64_t)(uintptr_t)&param, 0, 0, 0),
           0, "reading the store event channel");
    expect(param.value != 0, 1, "the store event channel is set up");
    struct vireo_sched_poll poll = {.ports = 0x1000, .nr_ports = 100000, .timeout = 0};
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_poll, (uint64_t)(uintptr_t)&poll, 0, 0, 0),
           einval, "poll on too many ports");
    struct vireo_gnttab_copy copy;
    memset(&copy, 0, sizeof copy);
    copy.source.u.gmfn = 0x7fffffff;
    copy.source.domid = VIREO_DOMID_SELF;
    copy.dest.u.ref = 9;
    copy.dest.domid = 7;
    copy.len = 8;
    copy.flags = VIREO_GNTCOPY_dest_gref;
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_grant_table_op, VIREO_GNTTABOP_copy, (uint64_t)(uintptr_t)&copy, 1, 0, 0),
           0, "grant copy returns per-segment status");
    expect(copy.status, VIREO_GNTST_bad_page, "a copy from a frame the guest does not have");
    struct vireo_evtchn_alloc_unbound alloc = {.dom = VIREO_DOMID_SELF, .remote_dom = 0};
    expect(vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_alloc_unbound, (uint64_t)(uintptr_t)&alloc, 0, 0, 0),
           0, "a good call still works afterwards");
    say(failures ? "hostile FAILED\n" : "hostile done\n");
    return failures ? 1 : 0;
}
