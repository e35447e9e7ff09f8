import Foundation
import Synchronization
import Testing
import VireoABI
import VireoGuestBuilder
import VireoHypervisor
import VireoMachine

/// The proofs with real guests on the SoftCPU, each domain on its own embedded-host
/// thread and all vCPUs on one shared ``CreditScheduler``: two CPU-bound `cpubench` domains
/// weighted 512:256 on a one-thread pool get CPU 2:1; a cap of 50 holds a domain near half a
/// CPU; an `idle` domain that has booted and blocks uses ~no CPU. Figures are the CPU time the
/// scheduler gave each domain (``DomainHandle/cpuTimeNanoseconds``), not wall time.
@Suite(.serialized) struct SoftCPUSchedulingTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let images: Result<[String: [UInt8]], any Error> = Result {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-sched-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        let builder = GuestBuilder(repository: GuestRepository(root: root), toolchain: .standard(),
                                   workDirectory: work.appendingPathComponent("objects"))
        var images: [String: [UInt8]] = [:]
        for name in ["cpubench", "idle"] {
            let image = try builder.build(directory: root.appendingPathComponent("Hypercalls/samples/\(name)"),
                                          output: work.appendingPathComponent("\(name).elf"))
            images[name] = try [UInt8](Data(contentsOf: image.path))
        }
        return images
    }

    /// Domains running on one host and one scheduler, each on its own thread until destroyed.
    final class Running: @unchecked Sendable {  // the arrays are filled before any thread starts
        let host: EmbeddedHost
        var handles: [DomainHandle] = []
        var threads: [Thread] = []
        let output = Mutex<String>("")
        let failures = Mutex<[String]>([])

        init(scheduler: CreditScheduler, firstID: UInt16 = 1, _ domains: [(name: String, kernel: [UInt8], cmdline: String, credit: CreditParameters)]) throws {
            host = try EmbeddedHost()
            for (index, spec) in domains.enumerated() {
                let handle = DomainHandle()
                handles.append(handle)
                let host = self.host
                let thread = Thread { [self] in
                    do {
                        _ = try host.run(config: DomainConfig(id: DomainID(firstID + UInt16(index)), name: spec.name, memoryBytes: 16 << 20),
                                         kernel: spec.kernel, commandLine: spec.cmdline, engine: .soft, handle: handle,
                                         scheduler: scheduler, credit: spec.credit) { bytes in
                            self.output.withLock { $0 += String(decoding: bytes, as: UTF8.self) }
                        }
                    } catch {
                        self.failures.withLock { $0.append("\(spec.name): \(error)") }
                    }
                }
                threads.append(thread)
            }
            for thread in threads { thread.start() }
        }

        /// Waits until every domain's vCPUs run and have used some CPU.
        func waitUntilRunning() {
            let deadline = Date().addingTimeInterval(60)
            while Date() < deadline && handles.contains(where: { !$0.isRunning || $0.cpuTimeNanoseconds == 0 }) { usleep(10_000) }
        }

        func cpu() -> [UInt64] { handles.map(\.cpuTimeNanoseconds) }

        func destroy() {
            for handle in handles { handle.destroy() }
            let deadline = Date().addingTimeInterval(60)
            while threads.contains(where: { !$0.isFinished }) && Date() < deadline { usleep(10_000) }
            host.shutdown()
        }
    }

    /// Iterations no run reaches: cpubench spins until destroyed.
    static let forever = "1000000000000"

    @Test func weights512And256ShareOneThread2To1() throws {
        let images = try Self.images.get()
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let running = try Running(scheduler: scheduler, [
            ("heavy", images["cpubench"]!, Self.forever, CreditParameters(weight: 512)),
            ("light", images["cpubench"]!, Self.forever, CreditParameters(weight: 256)),
        ])
        defer { running.destroy() }
        running.waitUntilRunning()
        usleep(300_000)
        let before = running.cpu()
        usleep(2_500_000)
        let after = running.cpu()
        let ratio = Double(after[0] - before[0]) / Double(max(1, after[1] - before[1]))
        print("cpubench 512:256 on one thread: \(ratio):1")
        #expect(running.failures.withLock { $0 }.isEmpty, "\(running.failures.withLock { $0 })")
        #expect(abs(ratio / 2 - 1) < 0.1, "CPU given 512:256 came to \(ratio):1")
    }

    /// cpubench capped at 50 on a one-thread pool: alone, at most half a CPU; beside a weight-1
    /// cpubench that takes the rest (the two together show what the host gave the pool), near
    /// min(0.5, the pool's CPU), though its weight would give it nearly everything uncapped.
    @Test func aCapOf50HoldsADomainNearHalfACPU() throws {
        let images = try Self.images.get()
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let capped = try Running(scheduler: scheduler, [("capped", images["cpubench"]!, Self.forever, CreditParameters(weight: 65535, cap: 50))])
        defer { capped.destroy() }
        capped.waitUntilRunning()
        usleep(200_000)
        var (c0, t0) = (capped.cpu()[0], CreditScheduler.now())
        usleep(1_500_000)
        var (c1, t1) = (capped.cpu()[0], CreditScheduler.now())
        let alone = Double(c1 - c0) / Double(t1 - t0)
        print("cpubench capped at 50, alone: \(alone) of a CPU")
        #expect(alone <= 0.55 && alone > 0.05, "a cap of 50 gave \(alone) of a CPU")

        let filler = try Running(scheduler: scheduler, firstID: 2, [("filler", images["cpubench"]!, Self.forever, CreditParameters(weight: 1))])
        defer { filler.destroy() }
        filler.waitUntilRunning()
        usleep(200_000)
        let f0 = filler.cpu()[0]
        (c0, t0) = (capped.cpu()[0], CreditScheduler.now())
        usleep(2_000_000)
        let f1 = filler.cpu()[0]
        (c1, t1) = (capped.cpu()[0], CreditScheduler.now())
        let share = Double(c1 - c0) / Double(t1 - t0)
        let pool = Double(c1 - c0 + f1 - f0) / Double(t1 - t0)
        print("cpubench capped at 50 beside a filler: \(share) of a CPU; the pool thread got \(pool)")
        #expect(share <= 0.55, "a cap of 50 gave \(share) of a CPU")
        #expect(share >= 0.7 * min(0.5, pool), "a cap of 50 gave \(share) of a CPU while the pool got \(pool)")
        // The cap changes at run time, and 0 lifts it.
        try capped.handles[0].setCredit(weight: nil, cap: 0)
        #expect(capped.handles[0].creditParameters == CreditParameters(weight: 65535, cap: 0))
    }

    @Test func aBlockedDomainUsesNoCPU() throws {
        let images = try Self.images.get()
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let running = try Running(scheduler: scheduler, [("idler", images["idle"]!, "", CreditParameters())])
        defer { running.destroy() }
        let deadline = Date().addingTimeInterval(60)
        while !running.output.withLock({ $0.contains("idle: idler ready") }) && Date() < deadline { usleep(10_000) }
        #expect(running.output.withLock { $0 }.contains("idle: idler ready"))
        usleep(200_000)
        let before = running.cpu()[0]
        usleep(1_500_000)
        let used = running.cpu()[0] - before
        print("idle domain, blocked for 1.5 s: \(used) ns of CPU")
        #expect(used < 15_000_000, "a blocked domain used \(used) ns of CPU in 1.5 s")
    }
}
