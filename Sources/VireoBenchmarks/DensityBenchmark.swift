import Foundation
import Glibc
import Logging
import VireoBench
import VireoCore
import VireoDaemon
import VireoKVM

/// `vireo bench density`: N idle domains (the `idle` sample) created through vireod's control
/// API on its Unix socket, all live at once: creates per second (and per CPU second), and the
/// host memory each domain costs beyond its guest RAM (the process's resident set, less the
/// resident guest-memory mappings). The baseline, in the same run: creating (and closing) a bare
/// KVM VM with one vCPU and the same RAM, the floor under any domain create.
public struct DensityBenchmark: Benchmark {
    public let name = "density"
    public let summary = "idle domains created through vireod per second, and host memory per domain beyond guest RAM, beside bare KVM VM creates"

    public init() {}

    static let guestMiB = 4

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        if let reason = KVMSystem.unavailableReason() {
            throw BenchmarkError.unavailable(name: name, reason: reason)
        }
        _ = try BenchmarkGuests.image("idle", benchmark: name, log: options.log)
        let kernel = FileManager.default.currentDirectoryPath + "/.build/guests/idle.elf"
        let count = options.count ?? (options.quick ? 10 : 200)
        _ = Daemon.raiseDescriptorLimit()  // a thousand domains hold more descriptors than the usual 1024
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-density-\(getpid())")
        defer { try? FileManager.default.removeItem(at: directory) }
        var logger = Logger(label: "vireod")
        logger.logLevel = .warning
        let daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state"), shutdownTimeout: 5,
                                               maxDomains: count + 8), logger: logger)
        let socket = directory.appendingPathComponent("vireod.sock").path
        let server = try ControlServer(api: ControlAPI(daemon: daemon), socketPath: socket)
        defer {
            server.close()
            daemon.stop()
        }
        let client = DaemonClient(socketPath: socket)

        // The baseline: bare VMs of the same size, created and closed.
        let bareRuns = options.quick ? 10 : 100
        let bareStart = Measure.now()
        for _ in 0..<bareRuns {
            let memory = try GuestMemory(ramBytes: UInt64(Self.guestMiB) << 20)
            let kvm = try KVMSystem()
            let vm = try kvm.makeVirtualMachine(memory: memory)
            _ = try vm.makeVirtualCPU(id: 0)
        }
        let bareRate = Double(bareRuns) / (Double(Measure.now() - bareStart) / 1e9)

        let before = Self.residentKiB()
        let (threadsBefore, descriptorsBefore) = (Self.threadCount(), Self.descriptorCount())
        Self.dump("before")
        let cpuBefore = Self.processCPUSeconds()
        options.log("density: creating \(count) idle domains through vireod")
        let start = Measure.now()
        for i in 0..<count {
            let config = "name = \"density-\(i)\"\nmemory = \(Self.guestMiB)\nkernel = \"\(kernel)\"\n"
            let body = try JSONEncoder().encode(CreateRequest(config: config, file: "density.cfg"))
            let response = try client.request("POST", "/v1/domains", body: Array(body))
            guard response.status == 201 else {
                throw BenchmarkError.unavailable(name: name, reason: "create \(i): \(response.status) \(response.errorMessage)")
            }
        }
        let createSeconds = Double(Measure.now() - start) / 1e9
        let cpuSeconds = Self.processCPUSeconds() - cpuBefore
        // Idle: every guest has booted and waits on its XenStore watch.
        let deadline = Date().addingTimeInterval(Double(count) * 2 + 30)
        var ready = 0
        while Date() < deadline {
            ready = (0..<count).filter { (try? daemon.console("density-\($0)", offset: nil).data.contains("ready")) == true }.count
            if ready == count { break }
            usleep(count > 200 ? 1_000_000 : 100_000)
        }
        let allReadySeconds = Double(Measure.now() - start) / 1e9
        guard ready == count else {
            throw BenchmarkError.unavailable(name: name, reason: "only \(ready) of \(count) guests became idle")
        }
        // What the idle domains cost the host's CPUs (console and event polls, timers), over 1 s.
        let idleCPUBefore = Self.processCPUSeconds()
        let idleStart = Measure.now()
        usleep(1_000_000)
        let idleCPUPercent = (Self.processCPUSeconds() - idleCPUBefore) / (Double(Measure.now() - idleStart) / 1e9) * 100
        let after = Self.residentKiB()
        let (threadsAfter, descriptorsAfter) = (Self.threadCount(), Self.descriptorCount())
        Self.dump("after")
        let live = daemon.list().filter { $0.state == .running }.count
        let overheadKiB = Double((after.total - before.total) - (after.guest - before.guest)) / Double(count)
        let guestKiB = Double(after.guest - before.guest) / Double(count)
        func perDomain(_ a: Int, _ b: Int) -> Double { Double(a - b) / Double(count) }
        options.log("density: \(live) live; per domain beyond guest RAM: \(Int(overheadKiB)) KiB resident "
                    + "(thread stacks \(Int(perDomain(after.stacks, before.stacks))) KiB, malloc heap \(Int(perDomain(after.heap, before.heap))) KiB, "
                    + "other anonymous \(Int(perDomain(after.otherAnonymous, before.otherAnonymous))) KiB), "
                    + "\(perDomain(threadsAfter, threadsBefore)) threads, \(perDomain(descriptorsAfter, descriptorsBefore)) descriptors; destroying them")
        let destroyStart = Measure.now()
        for i in 0..<count { _ = try client.request("POST", "/v1/domains/density-\(i)/destroy") }
        let destroySeconds = Double(Measure.now() - destroyStart) / 1e9
        let rate = Double(count) / createSeconds
        return BenchmarkResult(
            bench: name, value: rate, unit: "creates/s", baseline: bareRate,
            baselineName: "bare KVM VM + 1 vCPU + \(Self.guestMiB) MiB created and closed per second, same process",
            goal: ">= 200 creates/s per core; <= 512 KiB host memory per domain beyond guest RAM; 1000 live domains",
            extra: [
                ("domains", .integer(Int64(count))),
                ("live_domains", .integer(Int64(live))),
                ("overhead_kib_per_domain", .number(overheadKiB)),
                ("guest_resident_kib_per_domain", .number(guestKiB)),
                ("creates_per_cpu_second", .number(cpuSeconds > 0 ? Double(count) / cpuSeconds : 0)),
                ("all_idle_seconds", .number(allReadySeconds)),
                ("destroys_per_second", .number(Double(count) / destroySeconds)),
                ("guest_mib", .integer(Int64(Self.guestMiB))),
                ("stack_kib_per_domain", .number(perDomain(after.stacks, before.stacks))),
                ("heap_kib_per_domain", .number(perDomain(after.heap, before.heap))),
                ("other_anonymous_kib_per_domain", .number(perDomain(after.otherAnonymous, before.otherAnonymous))),
                ("threads_per_domain", .number(perDomain(threadsAfter, threadsBefore))),
                ("descriptors_per_domain", .number(perDomain(descriptorsAfter, descriptorsBefore))),
                ("idle_cpu_percent", .number(idleCPUPercent)),
            ])
    }

    /// This process's resident KiB from /proc/self/smaps, split by where it lives: guest memory
    /// (the memfd mappings of the benchmark's domains), thread stacks (anonymous mappings of
    /// exactly the default 8 MiB stack), the malloc heap (`[heap]` and glibc's per-thread arenas,
    /// anonymous mappings inside a 64 MiB-aligned arena reservation), and other anonymous memory
    /// (decode caches, ring and frame buffers, mmap'd allocations).
    static func residentKiB() -> (total: Int, guest: Int, stacks: Int, heap: Int, otherAnonymous: Int) {
        let text = String(decoding: procFile("/proc/self/smaps"), as: UTF8.self)
        guard !text.isEmpty else { return (0, 0, 0, 0, 0) }
        enum Kind { case guest, stack, heap, anonymous, file }
        var total = 0, guest = 0, stacks = 0, heap = 0, other = 0
        var kind = Kind.file, start: UInt64 = 0
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let first = fields.first else { continue }
            if first == "Size:" {
                // An arena's mapping starts on a 64 MiB boundary; a thread stack is 8 MiB.
                let kib = fields.count > 1 ? Int(fields[1]) ?? 0 : 0
                if kind == .anonymous && kib == 8192 { kind = .stack } else if kind == .anonymous && start % (64 << 20) == 0 { kind = .heap }
            } else if first == "Rss:" {
                let kib = fields.count > 1 ? Int(fields[1]) ?? 0 : 0
                total += kib
                switch kind {
                case .guest: guest += kib
                case .stack: stacks += kib
                case .heap: heap += kib
                case .anonymous: other += kib
                case .file: break
                }
            } else if !first.hasSuffix(":"), first.contains("-") {
                // A mapping's header: range, perms, offset, device, inode, [path].
                start = UInt64(first.split(separator: "-").first ?? "", radix: 16) ?? 0
                let path = fields.count > 5 ? fields[5...].joined(separator: " ") : ""
                if path.contains("memfd:vireo-density-") { kind = .guest }  // Domain names the memfd
                else if path == "[heap]" { kind = .heap }
                else if path.isEmpty || path == "[stack]" { kind = .anonymous }
                else { kind = .file }
            }
        }
        return (total, guest, stacks, heap, other)
    }

    static func threadCount() -> Int {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Threads:") }) else { return 0 }
        return Int(line.split(separator: "\t").last?.trimmingCharacters(in: .whitespaces) ?? "") ?? 0
    }

    static func descriptorCount() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
    }

    /// A procfs file's bytes (procfs files report size 0: read to the end in chunks).
    static func procFile(_ path: String) -> [UInt8] {
        guard let file = fopen(path, "r") else { return [] }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
            if n == 0 { break }
            bytes += chunk[..<n]
        }
        return bytes
    }

    /// With `VIREO_DENSITY_SMAPS_DIR` set, copies /proc/self/smaps there as `smaps-TAG`: the
    /// per-mapping figures behind Docs/toolstack.md's breakdown.
    static func dump(_ tag: String) {
        guard let dir = ProcessInfo.processInfo.environment["VIREO_DENSITY_SMAPS_DIR"] else { return }
        _ = FileManager.default.createFile(atPath: "\(dir)/smaps-\(tag)", contents: Data(procFile("/proc/self/smaps")))
    }

    static func processCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }
}
