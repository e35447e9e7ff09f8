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
        // GuestKit asked for the callback vector: the loop slept halted and woke by upcalls.
        #expect(r.out.contains(" upcalls at vector 243\n") && !r.out.contains("as 0 upcalls"), "\(r.out)")
        #expect(r.out.contains("hello-kit: done") && !r.out.contains("FAIL"), "\(r.out)")
    }

    /// A line written with GuestKit's ConsoleFrontend into the console ring (not console_io)
    /// reaches stdout through the console backend, and the per-domain log with --console-log.
    @Test func theConsoleRingReachesStdoutAndTheLog() throws {
        guard GuestSupport.kvmAvailable() else {
            print("console ring on KVM skipped: /dev/kvm is missing")
            return
        }
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-console-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(at: log) }
        let kernel = try GuestSupport.image("hello-kit").path.path
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm", "--console-log", log.path])
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("hello-kit: through the console ring\n"), "\(r.out)")
        let logged = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        #expect(logged == "hello-kit: through the console ring\n", "the log holds the ring's output only: \(logged)")
        let bad = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--console-log", "/nonexistent/dir/console.log"])
        #expect(bad.status == 1 && bad.err.contains("/nonexistent/dir/console.log"), "\(bad.err)")
    }

    /// The README's demo command, as written there (the sample image and the disk path mapped
    /// to this run's): blkcheck with a disk and a network.
    @Test func theReadmeDemoBootsAGuestWithADiskAndANetwork() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let readme = try String(contentsOf: GuestSupport.root.appendingPathComponent("README.md"), encoding: .utf8)
        let line = try #require(readme.split(separator: "\n").first { $0.hasPrefix("swift run vireo guest build --samples && ") })
        let command = try #require(line.components(separatedBy: " && ").last)
        #expect(command.hasPrefix("swift run vireo run "), "\(command)")
        let image = GuestSupport.temporaryDirectory("demo").appendingPathExtension("img")
        try Data(count: 1 << 20).write(to: image)
        defer { try? FileManager.default.removeItem(at: image) }
        let arguments = command.dropFirst("swift run vireo ".count).split(separator: " ").map { word -> String in
            switch word {
            case ".build/guests/blkcheck.elf": (try? GuestSupport.image("blkcheck").path.path) ?? String(word)
            case "/tmp/vireo-demo.img": image.path
            default: String(word)
            }
        }
        let r = try GuestSupport.run(GuestSupport.vireo, arguments)
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("blkcheck: 64 sectors ok\n"), "\(r.out)")
        #expect(r.out.contains("blkcheck: vif0 connected, mac 02:16:3e:00:01:00, announced 10.0.2.15\n"), "\(r.out)")
    }

    /// stdin reaches the guest: `vireo run` forwards it into the console ring's input side,
    /// where GuestKit's ConsoleFrontend reads a line.
    @Test func stdinReachesTheGuestsConsole() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let kernel = try GuestSupport.image("console-echo").path.path
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm"], timeout: 60, input: "hello, guest\n")
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("console-echo: ready\nconsole-echo: got 'hello, guest'\n"), "\(r.out)")
    }

    /// `--net` wires a vif before the guest starts (its backend waits in InitWait; hello-kit has
    /// no network frontend and ignores it) and takes it down when the guest ends: a guest runs
    /// and powers off the same with a switch port and, as root, with a TAP.
    @Test func aGuestRunsWithNetworkInterfacesAttached() throws {
        guard GuestSupport.kvmAvailable() else {
            print("--net on KVM skipped: /dev/kvm is missing")
            return
        }
        let kernel = try GuestSupport.image("hello-kit").path.path
        var args = ["run", kernel, "--engine", "kvm", "--net", "switch:lan,mac=00:16:3e:00:00:01"]
        if getuid() == 0 && access("/dev/net/tun", R_OK | W_OK) == 0 {
            args += ["--net", "tap:vireorun\(getpid() % 10000)"]
        } else {
            print("--net tap skipped: needs root and /dev/net/tun")
        }
        let r = try GuestSupport.run(GuestSupport.vireo, args)
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("hello-kit: done"), "\(r.out)")
    }

    /// The first end-to-end disk: blkcheck writes a pattern over the first sectors of xvda,
    /// flushes, reads back and verifies; the host then finds the pattern in the image file.
    @Test func blkcheckWritesAndReadsBackItsDisk() throws {
        guard GuestSupport.kvmAvailable() else {
            print("blkcheck on KVM skipped: /dev/kvm is missing")
            return
        }
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-blkcheck-\(UUID().uuidString).img")
        try Data(repeating: 0xEE, count: 256 * 512).write(to: image)
        defer { try? FileManager.default.removeItem(at: image) }
        let kernel = try GuestSupport.image("blkcheck").path.path
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm", "--disk", image.path, "--cmdline", "80"])
        #expect(!r.timedOut)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("blkcheck: xvda connected, 256 sectors"), "\(r.out)")
        #expect(r.out.contains("blkcheck: 80 sectors ok"), "\(r.out)")
        // The guest's pattern, from the host: sector s, offset i holds s*37 + i + s/8.
        let bytes = [UInt8](try Data(contentsOf: image))
        var wrong = 0
        for sector in 0..<80 {
            for i in 0..<512 where bytes[sector * 512 + i] != UInt8(truncatingIfNeeded: sector &* 37 &+ i &+ sector >> 3) { wrong += 1 }
        }
        #expect(wrong == 0, "the image holds the guest's pattern")
        #expect(bytes[(80 * 512)...].allSatisfy { $0 == 0xEE }, "nothing past the sectors written")
        // "all": the pattern across the whole disk (on the SoftCPU: the work is 256 sectors' worth).
        let all = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "soft", "--disk", image.path, "--cmdline", "all"])
        #expect(all.status == 0 && all.out.contains("blkcheck: 256 sectors ok"), "\(all.out)\(all.err)")
        let whole = [UInt8](try Data(contentsOf: image))
        var wrongAll = 0
        for sector in 0..<256 {
            for i in 0..<512 where whole[sector * 512 + i] != UInt8(truncatingIfNeeded: sector &* 37 &+ i &+ sector >> 3) { wrongAll += 1 }
        }
        #expect(wrongAll == 0, "the whole image holds the guest's pattern")
        // Read-only: the guest's writes are refused, so it fails, and the image is untouched.
        try Data(repeating: 0xEE, count: 256 * 512).write(to: image)
        let ro = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm", "--disk", image.path + ",ro", "--cmdline", "8"])
        #expect(ro.status == 2 && ro.out.contains("(read-only)") && ro.out.contains("blkcheck: FAIL"), "\(ro.out)\(ro.err)")
        #expect([UInt8](try Data(contentsOf: image)).allSatisfy { $0 == 0xEE })
        // A missing image is refused before the guest starts, naming the file.
        let missing = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--disk", "/nonexistent/vireo-disk.img"])
        #expect(missing.status == 1 && missing.err.contains("/nonexistent/vireo-disk.img"), "\(missing.err)")
        #expect(!missing.out.contains("blkcheck"))
    }

    /// blkcheck over a disk with 4096-byte sectors, in requests large enough to go indirect,
    /// and its throughput mode.
    @Test func blkcheckUsesIndirectRequestsOnA4096ByteSectorDiskAndBenchmarks() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-blkcheck-\(UUID().uuidString).img")
        try Data(repeating: 0xEE, count: 1024 * 512).write(to: image)
        defer { try? FileManager.default.removeItem(at: image) }
        let kernel = try GuestSupport.image("blkcheck").path.path
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm", "--disk", image.path + ",sector=4096",
                                                          "--cmdline", "512"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("1024 sectors, sector-size 4096, 256 segments per request, barrier, discard"), "\(r.out)")
        #expect(r.out.contains("blkcheck: 512 sectors ok"), "\(r.out)")
        let bytes = [UInt8](try Data(contentsOf: image))
        #expect(bytes[300 * 512 + 7] == UInt8(truncatingIfNeeded: 300 &* 37 &+ 7 &+ 300 >> 3))
        #expect(bytes[(512 * 512)...].allSatisfy { $0 == 0xEE })
        let bench = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--engine", "kvm", "--disk", image.path, "--cmdline", "bench 256"])
        #expect(bench.status == 0 && bench.out.contains("blkcheck: bench write ") && bench.out.contains("(256 sectors)"), "\(bench.out)")
        let bad = try GuestSupport.run(GuestSupport.vireo, ["run", kernel, "--disk", image.path + ",sector=1000"])
        #expect(bad.status == 1 && bad.err.contains("sector=1000"), "\(bad.err)")
    }

    /// cpubench's checksum is the host's for the same loop: the guest ran every iteration.
    @Test func cpubenchRunsItsIntegerLoop() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("cpubench").path.path, "--cmdline", "5000"])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        let sum = GuestSupport.cpubenchChecksum(iterations: 5000)
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
        #expect(memory.status == 1 && memory.err.contains("--memory"), "\(memory.err)")
        let vcpus = try GuestSupport.run(GuestSupport.vireo, ["run", script.path, "--vcpus", "0"])
        #expect(vcpus.status != 0 && vcpus.err.contains("--vcpus"))
    }
}
