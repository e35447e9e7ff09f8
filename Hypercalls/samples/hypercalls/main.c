/*
 * hypercalls: a measurement guest for `vireo bench hypercall`. It issues N no-op hypercalls
 * (xen_version(XENVER_version): no pointer, nothing to copy) through the hypercall page, N from
 * its command line ("n=100000", default 1000), prints "hypercalls done N" and powers off.
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
    long version = 0;
    for (unsigned long i = 0; i < n; i++) {
        version = vireo_guest_hypercall(VIREO_HYPERVISOR_xen_version, VIREO_XENVER_version, 0, 0, 0, 0);
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
