import Foundation
import Synchronization
import VireoABI
import VireoBench
import VireoCore
import VireoGuestBuilder
import VireoHypervisor
import VireoMachine

/// Sample guests the benchmarks boot: taken from `.build/guests/` under the current directory
/// (what `vireo guest build --samples` writes), built there first if missing.
enum BenchmarkGuests {
    static func image(_ name: String, benchmark: String, log: (String) -> Void) throws -> [UInt8] {
        let root = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
        let path = root.appendingPathComponent(".build/guests/\(name).elf")
        if let bytes = FileManager.default.contents(atPath: path.path) { return Array(bytes) }
        guard FileManager.default.fileExists(atPath: root.appendingPathComponent("Hypercalls/samples/\(name)").path) else {
            throw BenchmarkError.unavailable(
                name: benchmark, reason: "no \(path.path) and no Hypercalls/samples/\(name) here: run from the repository")
        }
        log("\(benchmark): building the sample guests (vireo guest build --samples)")
        let builder = GuestBuilder(repository: GuestRepository(root: root), toolchain: .standard(),
                                   workDirectory: root.appendingPathComponent(".build/guests/obj"))
        do { _ = try builder.buildSamples(into: root.appendingPathComponent(".build/guests")) } catch {
            throw BenchmarkError.unavailable(name: benchmark, reason: "building the sample guests failed: \(error)")
        }
        guard let bytes = FileManager.default.contents(atPath: path.path) else {
            throw BenchmarkError.unavailable(name: benchmark, reason: "\(path.path) was not built")
        }
        return Array(bytes)
    }
}

/// One boot of a sample guest as domain 1 (16 MiB) on an engine, run to its end: what the
/// benchmarks that time a guest share.
struct GuestBoot {
    /// Why the run ended, and what else the engine said (``DomainRunner/failureDescription``).
    var reason: ShutdownReason
    var failure: String?
    /// Wall time from the first entry to the end, and the vCPUs' CPU time.
    var nanoseconds: UInt64
    var cpuNanoseconds: UInt64
    /// Instructions the SoftCPU retired (0 on KVM).
    var instructions: UInt64
    /// Everything the guest wrote to its console.
    var output: String

    /// Builds `kernel` named `name` with `commandLine` on `hub` and `grants` (where the caller
    /// may have bound host ports for domain 1 already), runs it on `engine` and returns the run.
    static func run(
        _ kernel: [UInt8], name: String, commandLine: String, on engine: ExecutionEngine,
        hub: EventChannels, grants: GrantTables
    ) throws -> GuestBoot {
        let router = UpcallRouter()
        let output = Mutex<String>("")
        let built = try DomainBuilder.build(
            config: DomainConfig(id: DomainID(1), name: name, memoryBytes: 16 << 20), kernel: kernel,
            commandLine: commandLine, hub: hub, grantTables: grants,
            console: { bytes in output.withLock { $0 += String(decoding: bytes, as: UTF8.self) } },
            upcall: { router.upcall($0) })
        defer { built.domain.destroy() }
        let runner: any DomainRunner = switch engine {
        case .kvm: try KVMDomainRunner(built: built, router: router)
        case .soft: try SoftDomainRunner(built: built, router: router)
        }
        let start = Measure.now()
        let reason = runner.run()
        let end = Measure.now()
        return GuestBoot(
            reason: reason, failure: runner.failureDescription, nanoseconds: end - start,
            cpuNanoseconds: runner.cpuTimeNanoseconds, instructions: (runner as? SoftDomainRunner)?.instructions ?? 0,
            output: output.withLock { $0 })
    }
}
