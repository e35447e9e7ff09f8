/*
 * hello-c: a C guest needs only the ABI headers (Hypercalls/include) and the guest runtime
 * (Hypercalls/runtime): here it calls the console hypercall itself when it can.
 */
#include <vireo/vireo.h>
#include <vireo_guest.h>

static void say(const char *text) {
    vireo_guest_console_write(text, strlen(text));
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    static const char greeting[] = "Hello from Vireo (C)\n";
    if (vireo_guest_has_hypercalls()) {
        /* console_io(CONSOLEIO_write, count, buffer): what vireo_guest_console_write does too. */
        vireo_guest_hypercall(VIREO_HYPERVISOR_console_io, VIREO_CONSOLEIO_write, sizeof greeting - 1,
                              (uint64_t)(uintptr_t)greeting, 0, 0);
    } else {
        say(greeting);
    }
    const char *cmdline = vireo_guest_cmdline();
    if (cmdline[0]) {
        say("command line: ");
        say(cmdline);
        say("\n");
    }
    say("hypervisor: ");
    say(vireo_guest_hypervisor());
    say("\n");
    return 0;
}
