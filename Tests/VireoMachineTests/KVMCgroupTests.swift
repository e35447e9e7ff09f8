import Foundation
import Glibc
import Synchronization
import Testing
import VireoABI
import VireoGuestBuilder
import VireoHypervisor
@testable import VireoMachine
import VireoLinux

/// Weights and caps of KVM domains through the host's cpu cgroup (Docs/scheduling.md, "KVM
/// domains"): the mapping from Xen's parameters to the controller's files, finding the controller
/// in /proc's text, and, on a host with /dev/kvm and a writable cpu cgroup, a real `cpubench`
/// domain capped at 50 using about half a CPU of thread CPU time, the files holding the values, a
/// run-time weight change, and the directory gone when the domain ends.
@Suite(.serialized) struct KVMCgroupTests {
    // MARK: The mapping

    @Test func xenWeightsAndCapsMapToBothVersionsFiles() {
        #expect(HostCPUController.v1Shares(weight: 256) == 1024)
        #expect(HostCPUController.v1Shares(weight: 512) == 2048)
        #expect(HostCPUController.v1Shares(weight: 1) == 4)
        #expect(HostCPUController.v1Shares(weight: 65535) == 262140)
        #expect(HostCPUController.v2Weight(weight: 256) == 100)
        #expect(HostCPUController.v2Weight(weight: 512) == 200)
        #expect(HostCPUController.v2Weight(weight: 1) == 1)
        #expect(HostCPUController.v2Weight(weight: 65535) == 10000)
        #expect(HostCPUController.quotaMicroseconds(cap: 0) == nil)
        #expect(HostCPUController.quotaMicroseconds(cap: 50) == 50_000)
        #expect(HostCPUController.quotaMicroseconds(cap: 250) == 250_000)

        let v1 = HostCPUController(version: .v1, home: "/sys/fs/cgroup/cpu")
        #expect(v1.settings(weight: 512, cap: 50).map { "\($0.file)=\($0.value)" }
                == ["cpu.cfs_period_us=100000", "cpu.cfs_quota_us=50000", "cpu.shares=2048"])
        #expect(v1.settings(weight: 256, cap: 0).map { "\($0.file)=\($0.value)" }
                == ["cpu.cfs_period_us=100000", "cpu.cfs_quota_us=-1", "cpu.shares=1024"])
        #expect(v1.directory(for: DomainID(7)) == "/sys/fs/cgroup/cpu/vireo-\(getpid())/dom7")
        let v2 = HostCPUController(version: .v2, home: "/sys/fs/cgroup/vireo.service")
        #expect(v2.settings(weight: 512, cap: 50).map { "\($0.file)=\($0.value)" } == ["cpu.max=50000 100000", "cpu.weight=200"])
        #expect(v2.settings(weight: 256, cap: 0).map { "\($0.file)=\($0.value)" } == ["cpu.max=max 100000", "cpu.weight=100"])
        #expect(v2.directory(for: DomainID(7)) == "/sys/fs/cgroup/vireo.service/vireo-\(getpid())-dom7")
    }

    // MARK: Finding the controller

    /// This host's own mountinfo lines (cgroup v1 per controller, cgroup2 without cpu at
    /// /sys/fs/cgroup/unified) and a cgroup-v2-only host's.
    static let v1Mounts = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
        33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """
    static let v2Mounts = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"

    @Test func mountsAndMembershipsAreReadAsTheKernelWritesThem() {
        let v1 = HostCPUController.cgroupMounts(Self.v1Mounts)
        #expect(v1.map(\.point) == ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/unified"])
        #expect(v1.first { $0.type == "cgroup" && $0.options.contains("cpu") }?.point == "/sys/fs/cgroup/cpu")
        #expect(HostCPUController.cgroupMounts(Self.v2Mounts).map(\.type) == ["cgroup2"])
        let memberships = "9:name=systemd:/\n2:cpuacct:/\n1:cpu,cpuacct:/user.slice\n0::/user.slice/session-1.scope\n"
        #expect(HostCPUController.membership(memberships) { $0.controllers.contains("cpu") } == "/user.slice")
        #expect(HostCPUController.membership(memberships) { $0.hierarchy == "0" } == "/user.slice/session-1.scope")
    }

    /// A host with no cgroup mounted at all: refused, naming both versions.
    @Test func withNoCPUControllerAWeightOrCapIsRefusedNamingWhy() {
        do {
            _ = try HostCPUController.find(mountinfo: "", cgroups: "")
            Issue.record("found a cpu controller in no mounts")
        } catch {
            #expect(error.description.contains("no cgroup v2 hierarchy is mounted"), "\(error)")
            #expect(error.description.contains("no cgroup v1 cpu hierarchy is mounted"), "\(error)")
        }
        // cgroup2 mounted but offering no cpu controller to the process's cgroup (a path that
        // does not exist has no cgroup.controllers), and no v1 cpu hierarchy.
        do {
            _ = try HostCPUController.find(mountinfo: Self.v2Mounts, cgroups: "0::/vireo-no-such-cgroup-\(getpid())\n")
            Issue.record("found a cpu controller where none is offered")
        } catch {
            #expect(error.description.contains("offers no cpu controller"), "\(error)")
        }
    }

    // MARK: A real KVM domain

    /// A runner checks the ranges first; then a weight or cap is applied where the host has a
    /// cpu controller (the cgroup is made at once, and goes with the runner) and refused naming
    /// why where it has none.
    @Test func aKVMRunnerAppliesOrRefusesNamingWhy() throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0, KVMDomainRunner.kvmUsable else {
            print("skipped: /dev/kvm is missing or unusable")
            return
        }
        let host = try EmbeddedHost()
        defer { host.shutdown() }
        let router = UpcallRouter()
        let built = try DomainBuilder.build(config: DomainConfig(id: DomainID(43), name: "k", memoryBytes: 16 << 20), kernel: try Self.cpubench.get(),
                                            commandLine: "1", hub: host.hub, grantTables: host.grants, console: { _ in }, upcall: { router.upcall($0) })
        defer { built.domain.destroy() }
        var directory: String?
        do {
            let runner = try KVMDomainRunner(built: built, router: router)
            try runner.setCredit(weight: 256, cap: 0)
            #expect(runner.cpuCgroupDirectory == nil, "the defaults made a cgroup")
            #expect(throws: CreditError.weight(0)) { try runner.setCredit(weight: 0, cap: nil) }
            #expect(throws: CreditError.cap(12801)) { try runner.setCredit(weight: nil, cap: 12801) }
            do {
                let controller = try HostCPUController.find()
                try runner.setCredit(weight: nil, cap: 50)
                #expect(runner.creditParameters == CreditParameters(weight: 256, cap: 50))
                directory = runner.cpuCgroupDirectory
                #expect(directory == controller.directory(for: DomainID(43)))
                #expect(directory.map { access($0, F_OK) == 0 } == true)
            } catch {
                print("no cpu controller here: \(error)")
                do { try runner.setCredit(weight: nil, cap: 50) } catch {
                    #expect(error.description.contains("cap 50 on a KVM domain") && error.description.contains("cgroup"), "\(error)")
                }
                #expect(runner.creditParameters == CreditParameters())
            }
        }
        // The runner is gone without running: so is its cgroup.
        if let directory { #expect(access(directory, F_OK) != 0, "\(directory) outlived its runner") }
    }

    static let cpubench: Result<[UInt8], any Error> = Result {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-kvmcap-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        let builder = GuestBuilder(repository: GuestRepository(root: SoftCPUSchedulingTests.root), toolchain: .standard(),
                                   workDirectory: work.appendingPathComponent("objects"))
        let image = try builder.build(directory: SoftCPUSchedulingTests.root.appendingPathComponent("Hypercalls/samples/cpubench"),
                                      output: work.appendingPathComponent("cpubench.elf"))
        return try [UInt8](Data(contentsOf: image.path))
    }

    /// The controller, or nil with the reason printed (no /dev/kvm, no writable cpu cgroup).
    static func usableController() -> HostCPUController? {
        guard access("/dev/kvm", R_OK | W_OK) == 0, KVMDomainRunner.kvmUsable else {
            print("skipped: /dev/kvm is missing or unusable")
            return nil
        }
        do {
            return try HostCPUController.find()
        } catch {
            print("skipped: \(error)")
            return nil
        }
    }

    static func read(_ path: String) -> String? {
        (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Whether the cgroup holds threads, all of this process: the vCPU thread (cpubench has one
    /// vCPU) and, when the cgroup existed at the first KVM_RUN, KVM's worker for the VM
    /// (kvm-nx-lpage-recovery), which the kernel starts in the cgroup of the thread that ran it.
    static func holdsOnlyThisProcessesThreads(_ directory: String, _ controller: HostCPUController) -> Bool {
        let tids = (read("\(directory)/\(controller.threadsFile)") ?? "").split(separator: "\n")
        let ours = tids.filter { access("/proc/self/task/\($0)", F_OK) == 0 }
        let names = tids.map { read("/proc/self/task/\($0)/comm") ?? "?" }
        print("threads in \(directory): \(zip(tids, names).map { "\($0) (\($1))" })")
        return !tids.isEmpty && tids.count <= 2 && ours.count == tids.count
    }

    /// One KVM domain running `cpubench` until destroyed, on its own thread.
    final class Running: @unchecked Sendable {  // set before the thread starts
        let host: EmbeddedHost
        let handle = DomainHandle()
        let thread: Thread
        final class Failure: Sendable { let why = Mutex<String?>(nil) }
        private let failed = Failure()
        var failure: String? { failed.why.withLock { $0 } }

        init(id: DomainID, credit: CreditParameters, pinnedTo cpu: Int32? = nil) throws {
            let kernel = try KVMCgroupTests.cpubench.get()
            let host = try EmbeddedHost()
            self.host = host
            let handle = self.handle
            let failure = self.failed
            thread = Thread {
                // vCPU 0 runs on this thread.
                if let cpu, vireo_pin_thread(cpu) != 0 { failure.why.withLock { $0 = "pinning to CPU \(cpu): errno \(errno)" } }
                do {
                    let outcome = try host.run(config: DomainConfig(id: id, name: "kvmcap", memoryBytes: 16 << 20), kernel: kernel,
                                               commandLine: SoftCPUSchedulingTests.forever, engine: .kvm, handle: handle, credit: credit) { _ in }
                    if let why = outcome.failure { failure.why.withLock { $0 = why } }
                } catch {
                    failure.why.withLock { $0 = "\(error)" }
                }
            }
            thread.start()
            let deadline = Date().addingTimeInterval(60)
            while Date() < deadline && !thread.isFinished && (!handle.isRunning || handle.cpuTimeNanoseconds == 0) { usleep(10_000) }
        }

        /// The share of one CPU the vCPU thread used over `seconds`.
        func share(over seconds: Double) -> Double {
            let (c0, t0) = (handle.cpuTimeNanoseconds, CreditScheduler.now())
            usleep(UInt32(seconds * 1_000_000))
            let (c1, t1) = (handle.cpuTimeNanoseconds, CreditScheduler.now())
            return Double(c1 - c0) / Double(t1 - t0)
        }

        private let destroyed = Mutex(false)

        func destroy() {
            guard !destroyed.withLock({ let was = $0; $0 = true; return was }) else { return }
            handle.destroy()
            let deadline = Date().addingTimeInterval(60)
            while !thread.isFinished && Date() < deadline { usleep(10_000) }
            host.shutdown()
        }
    }

    /// Uncapped (in a cgroup with the defaults), then capped at 50 at run time, then at 10, then
    /// a weight change; the directory goes with the domain.
    @Test func aCapOf50SetAtRunTimeHoldsAKVMDomainNearHalfACPU() throws {
        guard let controller = Self.usableController() else { return }
        let id = DomainID(41)
        let directory = controller.directory(for: id)
        let running = try Running(id: id, credit: CreditParameters())
        defer { running.destroy() }
        #expect(running.failure == nil, "\(running.failure ?? "")")
        #expect(running.handle.isRunning)
        // With the defaults, the domain has a cgroup only once a KVM domain of this process has
        // asked for a weight or cap (then with the defaults, so its weight counts against theirs).
        if !DomainCPUShares.engaged {
            #expect(access(directory, F_OK) != 0, "\(directory) exists before any domain asked for a weight or cap")
        } else {
        #expect(Self.read("\(directory)/\(controller.version == .v1 ? "cpu.shares" : "cpu.weight")")
                == (controller.version == .v1 ? "1024" : "100"))
        #expect(Self.read("\(directory)/\(controller.version == .v1 ? "cpu.cfs_quota_us" : "cpu.max")")
                == (controller.version == .v1 ? "-1" : "max 100000"))
        #expect(Self.holdsOnlyThisProcessesThreads(directory, controller))
        }
        let uncapped = running.share(over: 1.0)
        print("KVM cpubench uncapped: \(uncapped) of a CPU")

        try running.handle.setCredit(weight: 512, cap: 50)
        #expect(running.handle.creditParameters == CreditParameters(weight: 512, cap: 50))
        switch controller.version {
        case .v1:
            #expect(Self.read("\(directory)/cpu.cfs_period_us") == "100000")
            #expect(Self.read("\(directory)/cpu.cfs_quota_us") == "50000")
            #expect(Self.read("\(directory)/cpu.shares") == "2048")
        case .v2:
            #expect(Self.read("\(directory)/cpu.max") == "50000 100000")
            #expect(Self.read("\(directory)/cpu.weight") == "200")
        }
        #expect(Self.holdsOnlyThisProcessesThreads(directory, controller))
        usleep(200_000)
        let capped = running.share(over: 2.0)
        print("KVM cpubench capped at 50: \(capped) of a CPU (uncapped it got \(uncapped))")
        #expect(capped <= 0.6, "a cap of 50 gave a KVM domain \(capped) of a CPU")
        #expect(capped > 0.05, "a cap of 50 gave a KVM domain \(capped) of a CPU: is it running?")

        // A cap well under what the host gives the thread on a busy machine shows it binding.
        try running.handle.setCredit(weight: nil, cap: 10)
        #expect(Self.read("\(directory)/\(controller.version == .v1 ? "cpu.cfs_quota_us" : "cpu.max")")
                == (controller.version == .v1 ? "10000" : "10000 100000"))
        usleep(200_000)
        let tenth = running.share(over: 1.0)
        print("KVM cpubench capped at 10: \(tenth) of a CPU")
        #expect(tenth <= 0.15 && tenth > 0.01, "a cap of 10 gave a KVM domain \(tenth) of a CPU")

        // A weight change, and cap 0 lifts the cap.
        try running.handle.setCredit(weight: 768, cap: 0)
        #expect(running.handle.creditParameters == CreditParameters(weight: 768, cap: 0))
        switch controller.version {
        case .v1:
            #expect(Self.read("\(directory)/cpu.shares") == "3072")
            #expect(Self.read("\(directory)/cpu.cfs_quota_us") == "-1")
        case .v2:
            #expect(Self.read("\(directory)/cpu.weight") == "300")
            #expect(Self.read("\(directory)/cpu.max") == "max 100000")
        }

        running.destroy()
        #expect(running.thread.isFinished)
        #expect(access(directory, F_OK) != 0, "\(directory) is left after the domain ended")
        #expect(running.failure == nil, "\(running.failure ?? "")")
    }

    /// Two KVM domains weighted 512 and 256, their vCPU threads pinned to one CPU so that they
    /// contend: the kernel gives them CPU about 2:1 (cpu.shares 2048:1024 here). Whatever else
    /// runs on that CPU competes with the process's cgroup as a whole, not with either domain.
    @Test func weights512And256ShareOneCPU2To1() throws {
        guard let controller = Self.usableController() else { return }
        var cpus = [Int32](repeating: 0, count: 256)
        let count = vireo_allowed_cpus(&cpus, 256)
        guard count > 0 else {
            print("skipped: no CPU to pin to (errno \(errno))")
            return
        }
        let cpu = cpus[Int(count) - 1]
        // The default-weight domain first: if it started without a cgroup, the 512 one's
        // weight engages the process and moves it into one of its own.
        let light = try Running(id: DomainID(45), credit: CreditParameters(), pinnedTo: cpu)
        defer { light.destroy() }
        let heavy = try Running(id: DomainID(44), credit: CreditParameters(weight: 512), pinnedTo: cpu)
        defer { heavy.destroy() }
        #expect(heavy.failure == nil && light.failure == nil, "\(heavy.failure ?? "") \(light.failure ?? "")")
        #expect(DomainCPUShares.engaged)
        for (id, weight) in [(DomainID(44), 512), (DomainID(45), 256)] {
            let directory = controller.directory(for: id)
            #expect(Self.read("\(directory)/\(controller.version == .v1 ? "cpu.shares" : "cpu.weight")")
                    == (controller.version == .v1 ? "\(weight * 4)" : "\(weight * 100 / 256)"))
            #expect(Self.holdsOnlyThisProcessesThreads(directory, controller))
        }
        usleep(300_000)
        let (h0, l0) = (heavy.handle.cpuTimeNanoseconds, light.handle.cpuTimeNanoseconds)
        usleep(2_500_000)
        let (h1, l1) = (heavy.handle.cpuTimeNanoseconds, light.handle.cpuTimeNanoseconds)
        let ratio = Double(h1 - h0) / Double(max(1, l1 - l0))
        print("KVM cpubench 512:256 pinned to CPU \(cpu): \(ratio):1 (\(Double(h1 - h0) / 1e9) s and \(Double(l1 - l0) / 1e9) s of CPU)")
        #expect(abs(ratio / 2 - 1) < 0.25, "CPU given 512:256 came to \(ratio):1")
    }

    /// A cap given at creation: the cgroup exists before the vCPU thread starts, which joins it.
    @Test func aCapGivenAtCreationHoldsTheVCPUThreadFromItsStart() throws {
        guard let controller = Self.usableController() else { return }
        let id = DomainID(42)
        let directory = controller.directory(for: id)
        let running = try Running(id: id, credit: CreditParameters(weight: 128, cap: 25))
        defer { running.destroy() }
        #expect(running.failure == nil, "\(running.failure ?? "")")
        #expect(running.handle.creditParameters == CreditParameters(weight: 128, cap: 25))
        #expect(Self.holdsOnlyThisProcessesThreads(directory, controller))
        #expect(Self.read("\(directory)/\(controller.version == .v1 ? "cpu.cfs_quota_us" : "cpu.max")")
                == (controller.version == .v1 ? "25000" : "25000 100000"))
        let capped = running.share(over: 1.5)
        print("KVM cpubench capped at 25 from creation: \(capped) of a CPU")
        #expect(capped <= 0.35, "a cap of 25 gave a KVM domain \(capped) of a CPU")
        running.destroy()
        #expect(access(directory, F_OK) != 0, "\(directory) is left after the domain ended")
    }
}
