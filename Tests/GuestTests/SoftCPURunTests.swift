import Foundation
import Testing
import VireoGuestBuilder

/// The sample guests and fixtures booted by `vireo run --engine soft`: the same images and the
/// same expected lines as on KVM (VireoRunTests), on Vireo's own interpreter. These need no
/// /dev/kvm, so they run everywhere.
@Suite(.serialized) struct SoftCPURunTests {
    func soft(_ name: String, _ extra: [String] = [], input: String? = nil) throws -> (status: Int32, out: String, err: String, timedOut: Bool) {
        try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image(name).path.path, "--engine", "soft"] + extra,
                             timeout: 120, input: input)
    }

    @Test func helloBootsThroughThePVHEntryAndPowersOff() throws {
        let r = try soft("hello", ["--cmdline", "greeting=hi"])
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("Hello from Vireo"))
        #expect(r.out.contains("command line: greeting=hi"))
        #expect(r.out.contains("XenVMMXenVMM"), "the guest found Vireo's Xen CPUID leaves")
        #expect(r.out.contains("hypercall page installed"))
        let c = try soft("hello-c")
        #expect(c.status == 0 && c.out.contains("Hello from Vireo (C)"), "\(c.out)\(c.err)")
        let h = try soft("hypercalls")
        #expect(h.status == 0 && h.out.contains("hypercalls done"), "\(h.out)\(h.err)")
    }

    @Test func cpubenchsChecksumIsTheHosts() throws {
        let r = try soft("cpubench", ["--cmdline", "20000"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        let sum = GuestSupport.cpubenchChecksum(iterations: 20000)
        #expect(r.out.contains("cpubench: 20000 iterations, checksum \(sum)"), "\(r.out)")
    }

    @Test func aTrappingGuestIsReportedAndExitsAsACrash() throws {
        let r = try soft("trap")
        #expect(r.status == 2, "crash exit status; \(r.err)")
        #expect(r.out.contains("vector 6 (#UD invalid opcode: a Swift trap)"), "\(r.out)")
    }

    @Test func theGuestKitSampleSleepsOnATimerAndTakesUpcalls() throws {
        let r = try soft("hello-kit")
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("hello-kit: hypervisor interface 4.14"))
        #expect(r.out.contains("hello-kit: my name is hello-kit.elf"))
        #expect(r.out.contains("hello-kit: timer fired after"))
        #expect(r.out.contains(" upcalls at vector 243\n") && !r.out.contains("as 0 upcalls"), "\(r.out)")
        #expect(r.out.contains("hello-kit: through the console ring\n"))
        #expect(r.out.contains("hello-kit: done") && !r.out.contains("FAIL"), "\(r.out)")
    }

    @Test func fixturesPassOnTheSoftCPU() throws {
        let heap = try soft("heap", ["--memory", "32"])
        #expect(heap.status == 0 && heap.out.contains("heap done") && !heap.out.contains("FAIL"), "\(heap.out)\(heap.err)")
        let hostile = try soft("hostile")
        #expect(hostile.status == 0 && hostile.out.contains("hostile done") && !hostile.out.contains("FAIL"), "\(hostile.out)")
        let store = try soft("xenstore")
        #expect(store.status == 0 && store.out.contains("xenstore data/greeting: hello store") && store.out.contains("xenstore done"))
        for placement in ["", "inram"] {
            let timer = try soft("timer", ["--cmdline", placement])
            #expect(timer.status == 0, "\(timer.out)\(timer.err)")
            #expect(timer.out.contains(placement.isEmpty ? "shared_info above RAM" : "shared_info over a RAM page"))
            #expect(timer.out.contains("timer wallclock ok") && timer.out.contains("timer done") && !timer.out.contains("FAIL"))
        }
        let upcall = try soft("upcall")
        #expect(upcall.status == 0, "\(upcall.out)\(upcall.err)")
        #expect(upcall.out.contains("upcall delivered to a halted vCPU") && upcall.out.contains("upcall delivered to a running vCPU"))
        let echo = try soft("console-echo", input: "hello, guest\n")
        #expect(echo.status == 0 && echo.out.contains("console-echo: got 'hello, guest'\n"), "\(echo.out)\(echo.err)")
    }

    /// Two vCPUs on two host threads: locked adds from both must all land.
    @Test func twoVCPUsCountTogether() throws {
        for _ in 0..<3 {
            let r = try soft("smp", ["--vcpus", "2"])
            #expect(r.status == 0, "\(r.out)\(r.err)")
            #expect(r.out.contains("smp: hello from vCPU 1") && r.out.contains("smp done") && !r.out.contains("FAIL"), "\(r.out)")
        }
    }

    @Test func blkcheckWritesAndReadsBackItsDisk() throws {
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-soft-blk-\(UUID().uuidString).img")
        try Data(repeating: 0xEE, count: 256 * 512).write(to: image)
        defer { try? FileManager.default.removeItem(at: image) }
        let r = try soft("blkcheck", ["--disk", image.path, "--cmdline", "40"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("blkcheck: 40 sectors ok"), "\(r.out)")
    }

    /// Where KVM runs too, the deterministic samples print exactly the same bytes and exit the
    /// same way on both engines.
    @Test func bothEnginesPrintTheSame() throws {
        guard GuestSupport.kvmAvailable() else { return }
        for (name, extra) in [("hello", ["--cmdline", "x=1"]), ("hello-c", []), ("cpubench", ["--cmdline", "3000"]), ("trap", []),
                              ("heap", ["--memory", "32"]), ("xenstore", []), ("hostile", []), ("hypercalls", []),
                              ("upcall", []), ("smp", ["--vcpus", "2"])] {
            let path = try GuestSupport.image(name).path.path
            let kvm = try GuestSupport.run(GuestSupport.vireo, ["run", path, "--engine", "kvm"] + extra)
            let soft = try GuestSupport.run(GuestSupport.vireo, ["run", path, "--engine", "soft"] + extra)
            #expect(kvm.status == soft.status, "\(name): exit \(kvm.status) on KVM, \(soft.status) on the SoftCPU")
            // The trap report names addresses that are the same on both, so whole outputs compare.
            #expect(kvm.out == soft.out, "\(name): KVM printed\n\(kvm.out)\nthe SoftCPU printed\n\(soft.out)")
        }
    }
}
