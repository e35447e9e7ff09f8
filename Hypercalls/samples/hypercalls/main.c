/*
 * hypercalls: a measurement guest for `vireo bench hypercall`. It issues N no-op hypercalls
 * (xen_version(XENVER_version): no pointer, nothing to copy) through the hypercall page, N from
 * its command line ("n=100000", default 1000), prints "hypercalls done N" and powers off.
 * The loop is `xor %edi,%edi; call *stub; dec; jnz`, the shape the benchmark's raw-exit
 * baseline runs on a bare vCPU, so the two differ only by what Vireo does per exit.
 */
#include <vireo/vireo.h>
#include <vireo_guest.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static unsigned long parse_n(const char *cmdline) {
    unsigned long n = 1000;
    for (const char *p = cmdline; *p; p++) {
        if (p[0] == 'n' && p[1] == '=' && (p == cmdline || p[-1] == ' ')) {
            n = 0;
            for (p += 2; *p >= '0' && *p <= '9'; p++) n = n * 10 + (unsigned long)(*p - '0');
            break;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    if (!vireo_guest_has_hypercalls()) {
        say("hypercalls: no hypervisor with hypercalls\n");
        return 1;
    }
    unsigned long n = parse_n(vireo_guest_cmdline());
    long version = vireo_guest_hypercall(VIREO_HYPERVISOR_xen_version, VIREO_XENVER_version, 0, 0, 0, 0);
    const char *stub = (const char *)vireo_guest_hypercall_page() + VIREO_HYPERVISOR_xen_version * VIREO_ABI_HYPERCALL_STUB_SIZE;
    unsigned long count = n;
    if (count) {
        __asm__ volatile("1: xor %%edi, %%edi\n\t"
                         "call *%[stub]\n\t"
                         "dec %[count]\n\t"
                         "jnz 1b"
                         : [count] "+c"(count)
                         : [stub] "b"(stub)
                         : "rax", "rdi", "rsi", "rdx", "r8", "r10", "memory", "cc");
    }
    char line[64] = "hypercalls done ";
    int len = 16;
    char digits[24];
    int d = 0;
    unsigned long shown = n;
    do { digits[d++] = (char)('0' + shown % 10); shown /= 10; } while (shown);
    while (d) line[len++] = digits[--d];
    line[len++] = '\n';
    line[len] = 0;
    say(line);
    return n == 0 || version > 0 ? 0 : 1;
}
