// The first Vireo guest, in Embedded Swift: it greets, shows what it was given and where it
// runs, and returns, which powers the domain off.
import VireoGuestRuntime

print("Hello from Vireo")

let commandLine = String(cString: vireo_guest_cmdline())
if !commandLine.isEmpty {
    print("command line: \(commandLine)")
}

let hypervisor = String(cString: vireo_guest_hypervisor())
let hypercalls = vireo_guest_has_hypercalls() != 0 ? "hypercall page installed" : "no hypercalls, debug console"
print("hypervisor: \(hypervisor) (\(hypercalls))")
