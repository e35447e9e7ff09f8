import Foundation
import Testing
import VireoGuestBuilder

/// Real guest images booted by `vireo run` on Vireo's KVM engine: hypercall page, console_io,
/// sched_op shutdown, the fault path, hostile hypercalls, broken files. Small guests only: this
/// host's KVM emulates instructions at about 2 M/s.
@Suite(.serialized) struct VireoRunTests {
    @Test func helloPrintsThroughHypercallsAndPowersOff() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let hello = try GuestSupport.image("hello")
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", hello.path.path, "--engine", "kvm", "--cmdline", "greeting=hi"])
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("Hello from Vireo"))
        #expect(r.out.contains("command line: greeting=hi"))
        #expect(r.out.contains("XenVMMXenVMM"), "the guest found Vireo's Xen CPUID leaves")
        #expect(r.out.contains("hypercall page installed"))
        let c = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("hello-c").path.path])
        #expect(c.status == 0 && c.out.contains("Hello from Vireo (C)"), "\(c.out)\(c.err)")
    }

    /// The GuestKit sample: XenStore over its ring, console_io, a timer through the guest loop.
    @Test func theGuestKitSampleReadsTheStoreSleepsOnATimerAndPowersOff() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("hello-kit").path.path, "--engine", "kvm"])
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("hello-kit: hypervisor interface 4.14"))
        #expect(r.out.contains("hello-kit: my name is hello-kit.elf"), "the name, read from the XenStore")
        #expect(r.out.contains("hello-kit: timer fired after"))
        #expect(r.out.contains("hello-kit: done") && !r.out.contains("FAIL"), "\(r.out)")
    }

    /// cpubench's checksum is the host's for the same loop: the guest ran every iteration.
    @Test func cpubenchRunsItsIntegerLoop() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("cpubench").path.path, "--cmdline", "5000"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15, sum: UInt64 = 0
        for _ in 0..<5000 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            sum = sum &* 31 &+ (state >> 11)
        }
        #expect(r.out.contains("cpubench: 5000 iterations, checksum \(sum)"), "\(r.out)")
    }

    @Test func aTrappingGuestIsReportedAndExitsAsACrash() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("trap").path.path])
        #expect(r.status == 2, "crash exit status; \(r.err)")
        #expect(r.out.contains("vector 6 (#UD invalid opcode: a Swift trap)"))
    }

    @Test func hostileHypercallsGetErrorsAndTheGuestCarriesOn() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("hostile").path.path])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(!r.out.contains("FAIL"), "\(r.out)")
        #expect(r.out.contains("hostile done"))
    }

    /// The guest finds its XenStore ring through the HVM params and talks to the store over it:
    /// the page, the grant, the event channel and the toolstack's nodes are set up before it runs.
    @Test func aGuestTalksToTheXenStoreOverItsRing() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let image = try GuestSupport.image("xenstore")
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", image.path.path])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("xenstore name: xenstore.elf"))
        #expect(r.out.contains("xenstore data/greeting: hello store"))
        #expect(r.out.contains("xenstore missing node: ENOENT"))
        #expect(r.out.contains("xenstore done"))
    }

    /// shared_info mapped above RAM (a KVM slot), the pvclock and wallclock published, VIRQ_TIMER
    /// bound, set_timer_op armed 30 ms ahead, SCHEDOP_block sleeping until the timer's event.
    @Test func timersFireVIRQTimerAndWakeABlockedVCPU() throws {
        guard GuestSupport.kvmAvailable() else { return }
        for placement in ["", "inram"] {  // above RAM, and over a RAM page (the RAM slots split)
            let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("timer").path.path, "--cmdline", placement])
            #expect(r.status == 0, "\(r.out)\(r.err)")
            #expect(r.out.contains(placement.isEmpty ? "shared_info above RAM" : "shared_info over a RAM page"))
            #expect(r.out.contains("timer wallclock ok"))
            #expect(r.out.contains("timer done") && !r.out.contains("FAIL"), "\(r.out)")
        }
    }

    /// Event upcalls as Xen's callback vector, without a LAPIC EOI: to a halted vCPU (the event
    /// wakes it) and to a vCPU running guest code (the host kicks it out of KVM_RUN).
    @Test func upcallsReachHaltedAndRunningVCPUs() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("upcall").path.path])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("upcall delivered to a halted vCPU"))
        #expect(r.out.contains("upcall delivered to a running vCPU"))
        #expect(r.out.contains("upcall done"))
    }

    /// Two vCPUs: the second brought up with VCPUOP_initialise and VCPUOP_up runs on its own
    /// host thread alongside the first; both count into shared memory.
    @Test func aSecondVCPUComesUpAndRunsAlongside() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("smp").path.path, "--vcpus", "2"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("smp: hello from vCPU 1"))
        #expect(r.out.contains("smp done") && !r.out.contains("FAIL"), "\(r.out)")
    }

    @Test func theHeapGuestReadsItsMemoryMap() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("heap").path.path, "--memory", "32"])
        #expect(r.status == 0 && r.out.contains("heap done") && !r.out.contains("FAIL"), "\(r.out)\(r.err)")
    }

    @Test func brokenFilesAndOptionsAreRefusedWithAReason() throws {
        let dir = GuestSupport.temporaryDirectory("broken")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let script = dir.appendingPathComponent("not-elf")
        try "#!/bin/sh\n".write(to: script, atomically: true, encoding: .utf8)
        let notELF = try GuestSupport.run(GuestSupport.vireo, ["run", script.path, "--engine", "kvm"])
        #expect(notELF.status == 1 && notELF.err.contains("not an ELF file"), "\(notELF.err)")
        let missing = try GuestSupport.run(GuestSupport.vireo, ["run", dir.appendingPathComponent("nope").path, "--engine", "kvm"])
        #expect(missing.status == 1 && missing.err.contains("cannot read the kernel"))
        let memory = try GuestSupport.run(GuestSupport.vireo, ["run", script.path, "--memory", "1"])
        #expect(memory.status != 0 && memory.err.contains("--memory"))
        let vcpus = try GuestSupport.run(GuestSupport.vireo, ["run", script.path, "--vcpus", "0"])
        #expect(vcpus.status != 0 && vcpus.err.contains("--vcpus"))
    }
}
