import Foundation
import Synchronization
import VireoABI
import VireoBench
import VireoHypervisor
import VireoMachine

/// `vireo bench sched`: the credit scheduler's weight experiment. Two CPU-bound SoftCPU domains
/// (the `cpubench` sample with a loop no run finishes) weighted 512 and 256 share a pool of ONE
/// host thread (on two threads each would get a core: the scheduler is work-conserving); the
/// value is the CPU time the heavier got over the lighter's, measured over a few seconds. The
/// baseline is the ratio the weights ask for (2.0), so `ratio` is 1.0 when the shares are
/// exact (goal 0.9–1.1). CPU time is what the scheduler charged each domain (host thread CPU
/// time of its slices), so a loaded host changes the figure little.
public struct SchedBenchmark: Benchmark {
    public let name = "sched"
    public let summary = "CPU share of two cpubench SoftCPU domains weighted 512:256 on one pool thread, beside the 2:1 the weights ask for"

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let kernel = try BenchmarkGuests.image("cpubench", benchmark: name, log: options.log)
        let seconds = options.quick ? 1.0 : 3.0
        let weights = (heavy: 512, light: 256)
        let scheduler = CreditScheduler(threads: 1)
        let host = try EmbeddedHost()
        let handles = [DomainHandle(), DomainHandle()]
        let failures = Mutex<[String]>([])
        var threads: [Thread] = []
        for (index, weight) in [weights.heavy, weights.light].enumerated() {
            let handle = handles[index]
            let thread = Thread {
                do {
                    _ = try host.run(config: DomainConfig(id: DomainID(UInt16(index + 1)), name: "sched-\(weight)", memoryBytes: 16 << 20),
                                     kernel: kernel, commandLine: "1000000000000", engine: .soft, handle: handle,
                                     scheduler: scheduler, credit: CreditParameters(weight: weight)) { _ in }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
            thread.start()
            threads.append(thread)
        }
        defer {
            for handle in handles { handle.destroy() }
            while threads.contains(where: { !$0.isFinished }) { usleep(5000) }
            host.shutdown()
            scheduler.shutdown()
        }
        let ready = Date().addingTimeInterval(60)
        while Date() < ready && handles.contains(where: { !$0.isRunning || $0.cpuTimeNanoseconds == 0 }) && failures.withLock({ $0.isEmpty }) {
            usleep(10_000)
        }
        if let failure = failures.withLock({ $0.first }) { throw BenchmarkError.unavailable(name: name, reason: failure) }
        usleep(300_000)  // past the first accounting periods
        options.log("sched: two cpubench domains, weights \(weights.heavy) and \(weights.light), one pool thread, \(seconds) s")
        let before = handles.map(\.cpuTimeNanoseconds)
        let start = Measure.now()
        usleep(useconds_t(seconds * 1e6))
        let after = handles.map(\.cpuTimeNanoseconds)
        let wall = Double(Measure.now() - start) / 1e9
        let heavy = Double(after[0] - before[0]) / 1e9, light = Double(after[1] - before[1]) / 1e9
        guard light > 0 else { throw BenchmarkError.unavailable(name: name, reason: "the lighter domain got no CPU") }
        return BenchmarkResult(
            bench: name, value: heavy / light, unit: "CPU share ratio", baseline: Double(weights.heavy) / Double(weights.light),
            baselineName: "the ratio of the weights (512:256)",
            goal: "ratio 0.9-1.1",
            extra: [
                ("heavy_cpu_seconds", .number(heavy)),
                ("light_cpu_seconds", .number(light)),
                ("pool_cpu_share", .number((heavy + light) / wall)),
                ("seconds", .number(wall)),
                ("pool_threads", .integer(1)),
            ])
    }
}
