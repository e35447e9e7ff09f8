import Foundation
import Synchronization
import VireoABI
import VireoBench
import VireoCore
import VireoHypervisor
import VireoKVM
import VireoMachine

/// `vireo bench boot`: create → first console byte for the minimal `hello-c` guest on Vireo's
/// KVM engine, in ms, with create → exit beside it; the baseline is QEMU booting the same ELF
/// (`qemu-system-x86_64 -M microvm -accel kvm -kernel`, spawn → exit) in the same run, or, where
/// QEMU is not installed, creating a bare KVM VM with one vCPU (the floor of any KVM boot).
public struct BootBenchmark: Benchmark {
    public let name = "boot"
    public let summary = "ms from create to the first console byte of a minimal guest, beside QEMU microvm booting the same ELF"

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        if let reason = KVMSystem.unavailableReason() {
            throw BenchmarkError.unavailable(name: name, reason: reason)
        }
        let kernel = try BenchmarkGuests.image("hello-c", benchmark: name, log: options.log)
        let runs = options.quick ? 3 : 15
        var firstByte: [Double] = [], exit: [Double] = [], create: [Double] = []
        options.log("boot: \(runs) boots of hello-c on Vireo")
        for _ in 0..<runs {
            let (made, first, done) = try Self.vireoBoot(kernel)
            create.append(made)
            firstByte.append(first)
            exit.append(done)
        }
        let qemu = Self.findQEMU()
        var baselines: [Double] = []
        var baselineName: String
        if let qemu {
            baselineName = "QEMU microvm (KVM) booting the same ELF, spawn to exit (ms)"
            let path = FileManager.default.currentDirectoryPath + "/.build/guests/hello-c.elf"
            options.log("boot: \(runs) boots of the same ELF on QEMU microvm")
            for _ in 0..<runs { baselines.append(try Self.qemuBoot(qemu, path)) }
        } else {
            baselineName = "creating a bare KVM VM and vCPU (ms); QEMU is not installed"
            for _ in 0..<runs { baselines.append(try Self.bareVM()) }
        }
        func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }
        return BenchmarkResult(
            bench: name, value: median(firstByte), unit: "ms", baseline: median(baselines), baselineName: baselineName,
            goal: "<= 3 ms and ratio <= 0.1",
            extra: [
                ("create_to_exit_ms", .number(median(exit))),
                ("create_domain_and_vm_ms", .number(median(create))),
                ("build_domain_ms", .number(median(Self.buildShare.withLock { $0 }))),
                ("create_to_first_byte_min_ms", .number(firstByte.min()!)),
                ("runs", .integer(Int64(runs))),
                ("qemu", .bool(qemu != nil)),
            ])
    }

    static let buildShare = Mutex<[Double]>([])

    final class FirstByte: Sendable {
        let at = Atomic<UInt64>(0)
    }

    /// (create → ready to run, create → first console byte, create → exit), in ms.
    static func vireoBoot(_ kernel: [UInt8]) throws -> (Double, Double, Double) {
        let start = Measure.now()
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let router = UpcallRouter()
        let first = FirstByte()
        let built = try DomainBuilder.build(
            config: DomainConfig(id: DomainID(1), name: "hello-c", memoryBytes: 16 << 20), kernel: kernel,
            hub: hub, grantTables: grants,
            console: { _ in _ = first.at.compareExchange(expected: 0, desired: Measure.now(), ordering: .relaxed) },
            upcall: { router.upcall($0) })
        defer { built.domain.destroy() }
        let domainBuilt = Measure.now()
        let runner = try KVMDomainRunner(built: built, router: router)
        let ready = Measure.now()
        buildShare.withLock { $0.append(Double(domainBuilt - start) / 1e6) }
        let reason = runner.run()
        let end = Measure.now()
        withExtendedLifetime(host) {}
        let firstAt = first.at.load(ordering: .relaxed)
        guard reason == .poweroff, firstAt != 0 else {
            throw BenchmarkError.unavailable(name: "boot", reason: "hello-c ended with \(reason) \(runner.failureDescription ?? "")")
        }
        return (Double(ready - start) / 1e6, Double(firstAt - start) / 1e6, Double(end - start) / 1e6)
    }

    static func findQEMU() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        return path.split(separator: ":").map { "\($0)/qemu-system-x86_64" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Spawn → exit of QEMU booting the ELF (its runtime powers off through isa-debug-exit).
    static func qemuBoot(_ qemu: String, _ path: String) throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: qemu)
        process.arguments = ["-M", "microvm", "-accel", "kvm", "-m", "64", "-kernel", path, "-nodefaults", "-nographic",
                             "-no-reboot", "-debugcon", "null", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        let start = Measure.now()
        try process.run()
        process.waitUntilExit()
        return Double(Measure.now() - start) / 1e6
    }

    static func bareVM() throws -> Double {
        let start = Measure.now()
        let memory = try GuestMemory(ramBytes: 16 << 20)
        let kvm = try KVMSystem()
        let vm = try kvm.makeVirtualMachine(memory: memory)
        _ = try vm.makeVirtualCPU(id: 0)
        return Double(Measure.now() - start) / 1e6
    }
}
