import Foundation
import Testing
import VireoGuestBuilder

/// The images boot end to end on a PVH loader that is not Vireo (QEMU's microvm, no Xen):
/// the runtime falls back to the debug console and QEMU's exit port.
@Suite struct GuestBootTests {
    @Test func helloGreetsShowsItsCommandLineAndPowersOff() throws {
        guard let qemu = GuestSupport.qemu() else { return }
        let r = try GuestSupport.boot(qemu, try GuestSupport.image("hello"), commandLine: "greeting=hi verbose")
        print("hello under QEMU microvm (exit status \(r.status)):\n\(r.out)", terminator: "")
        #expect(!r.timedOut, "the guest shut down by itself")
        #expect(r.status == GuestSupport.poweroffStatus, "poweroff, not crash: \(r.err)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.first == "Hello from Vireo")
        #expect(lines.contains("command line: greeting=hi verbose"))
        #expect(lines.contains { $0.hasPrefix("hypervisor: ") && $0.hasSuffix("(no hypercalls, debug console)") })
        #expect(!r.out.contains("fault"))
    }

    @Test func helloWithoutACommandLineSaysNothingAboutIt() throws {
        guard let qemu = GuestSupport.qemu() else { return }
        let r = try GuestSupport.boot(qemu, try GuestSupport.image("hello"))
        #expect(r.status == GuestSupport.poweroffStatus)
        #expect(r.out.hasPrefix("Hello from Vireo\nhypervisor: "))
        #expect(!r.out.contains("command line"))
    }

    @Test func cGuestNeedsOnlyTheHeadersAndTheRuntime() throws {
        guard let qemu = GuestSupport.qemu() else { return }
        let r = try GuestSupport.boot(qemu, try GuestSupport.image("hello-c"), commandLine: "x=1")
        #expect(r.status == GuestSupport.poweroffStatus, "\(r.err)")
        #expect(r.out.hasPrefix("Hello from Vireo (C)\ncommand line: x=1\nhypervisor: "))
    }

    /// A Swift trap is `ud2`: the IDT reports #UD with the faulting RIP and the guest shuts
    /// down as a crash (a triple fault would reset, and -no-reboot would exit 0 silently).
    @Test func aSwiftTrapIsReportedAndCrashesTheDomain() throws {
        guard let qemu = GuestSupport.qemu() else { return }
        let image = try GuestSupport.image("trap")
        let r = try GuestSupport.boot(qemu, image)
        print("trap under QEMU microvm (exit status \(r.status)):\n\(r.out)", terminator: "")
        #expect(!r.timedOut)
        #expect(r.status == GuestSupport.crashStatus, "shutdown(crash): \(r.err)")
        #expect(r.out.hasPrefix("about to index out of range\n"))
        #expect(!r.out.contains("unreachable"))
        let report = try #require(r.out.split(separator: "\n").first { $0.hasPrefix("vireo: fault: ") })
        #expect(report.hasPrefix("vireo: fault: vector 6 (#UD invalid opcode"))
        // The faulting RIP lies in the image's code.
        let rip = try #require(report.split(separator: " ").drop { $0 != "rip" }.dropFirst().first)
        let address = try #require(UInt64(rip.dropFirst(2), radix: 16))
        let elf = try ELFImage(Data(contentsOf: image.path))
        #expect(elf.loads.contains { $0.executable && $0.contains(physical: address) }, "rip \(rip) in the code")
        #expect(r.out.contains("vireo: shutting down (crash)\n"))
    }

    /// The runtime's allocator and memory functions, checked from inside a guest.
    @Test func theHeapAndMemoryFunctionsWork() throws {
        guard let qemu = GuestSupport.qemu() else { return }
        let r = try GuestSupport.boot(qemu, try GuestSupport.image("heap"))
        #expect(!r.out.contains("FAIL"), "\(r.out)")
        #expect(r.out.hasSuffix("heap done\n"), "\(r.out)")
        #expect(r.out.split(separator: "\n").filter { $0.hasPrefix("ok ") }.count == 11)
        #expect(r.status == GuestSupport.poweroffStatus, "main returned 0")
    }
}
