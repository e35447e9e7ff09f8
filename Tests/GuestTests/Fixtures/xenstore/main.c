/*
 * A C guest that talks to the XenStore over its ring, as a Xen frontend does: it finds the
 * store page and event channel through HVM_PARAM_STORE_PFN/EVTCHN, writes xs_wire requests
 * into the req ring, notifies, and reads replies from the rsp ring. It reads its own name
 * (relative path "name", which the store resolves under /local/domain/<id>), writes
 * "data/greeting" and reads it back, and reads a missing node (an ENOENT error reply).
 * Prints "xenstore ..." lines and "xenstore done" (or "FAIL ...").
 */
#include <vireo_guest.h>
#include <vireo/vireo.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static volatile struct vireo_xenstore_domain_interface *ring;
static uint32_t port;
static uint32_t next_id = 1;

static uint64_t param(uint32_t index) {
    struct vireo_xen_hvm_param p = {.domid = VIREO_DOMID_SELF, .index = index};
    if (vireo_guest_hypercall(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_get_param, (uint64_t)(uintptr_t)&p, 0, 0, 0) != 0) return 0;
    return p.value;
}

static void notify(void) {
    struct vireo_evtchn_send send = {.port = port};
    vireo_guest_hypercall(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_send, (uint64_t)(uintptr_t)&send, 0, 0, 0);
}

static void put(const void *bytes, uint32_t count) {
    const uint8_t *p = bytes;
    for (uint32_t i = 0; i < count; i++) {
        while (ring->req_prod - ring->req_cons >= VIREO_XENSTORE_RING_SIZE) vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_yield, 0, 0, 0, 0);
        ring->req[ring->req_prod & (VIREO_XENSTORE_RING_SIZE - 1)] = (char)p[i];
        __atomic_thread_fence(__ATOMIC_RELEASE);
        ring->req_prod++;
    }
}

static void get(void *bytes, uint32_t count) {
    uint8_t *p = bytes;
    for (uint32_t i = 0; i < count; i++) {
        unsigned spins = 0;
        while (ring->rsp_prod == ring->rsp_cons) {
            if (++spins > 2000000) { say("FAIL no reply from the store\n"); vireo_guest_shutdown(VIREO_SHUTDOWN_crash); }
            vireo_guest_hypercall(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_yield, 0, 0, 0, 0);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        p[i] = (uint8_t)ring->rsp[ring->rsp_cons & (VIREO_XENSTORE_RING_SIZE - 1)];
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ring->rsp_cons++;
    }
    notify();
}

/* One request; the reply's type and payload (NUL-terminated) come back. */
static uint32_t transact(uint32_t type, const char *a, const char *b, char *reply, uint32_t size) {
    uint32_t alen = (uint32_t)strlen(a) + 1, blen = b ? (uint32_t)strlen(b) : 0;
    struct vireo_xsd_sockmsg header = {.type = type, .req_id = next_id++, .tx_id = 0, .len = alen + blen};
    put(&header, sizeof header);
    put(a, alen);
    if (b) put(b, blen);
    notify();
    struct vireo_xsd_sockmsg answer;
    get(&answer, sizeof answer);
    uint32_t kept = answer.len < size - 1 ? answer.len : size - 1;
    get(reply, kept);
    char drop;
    for (uint32_t i = kept; i < answer.len; i++) get(&drop, 1);
    reply[kept] = 0;
    return answer.type;
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    uint64_t pfn = param(VIREO_HVM_PARAM_STORE_PFN);
    port = (uint32_t)param(VIREO_HVM_PARAM_STORE_EVTCHN);
    if (!pfn || !port) { say("FAIL no store page or event channel in the HVM params\n"); return 1; }
    ring = (volatile struct vireo_xenstore_domain_interface *)(uintptr_t)(pfn << 12);
    char reply[128];
    if (transact(VIREO_XS_READ, "name", 0, reply, sizeof reply) != VIREO_XS_READ) { say("FAIL read name: "); say(reply); say("\n"); return 1; }
    say("xenstore name: "); say(reply); say("\n");
    if (transact(VIREO_XS_WRITE, "data/greeting", "hello store", reply, sizeof reply) != VIREO_XS_WRITE) { say("FAIL write\n"); return 1; }
    if (transact(VIREO_XS_READ, "data/greeting", 0, reply, sizeof reply) != VIREO_XS_READ) { say("FAIL read back\n"); return 1; }
    say("xenstore data/greeting: "); say(reply); say("\n");
    if (transact(VIREO_XS_READ, "no/such/node", 0, reply, sizeof reply) != VIREO_XS_ERROR) { say("FAIL missing node\n"); return 1; }
    say("xenstore missing node: "); say(reply); say("\n");
    say("xenstore done\n");
    return 0;
}
