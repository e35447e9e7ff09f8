import Glibc
import Synchronization
import VireoABI
import VireoBench
import VireoCore

/// `vireo bench ring`: requests answered per second through a shared ring (io/ring.h
/// semantics, event suppression, hostile-input checks) between a frontend thread and a
/// backend thread, against a plain SPSC queue moving the same 64-byte messages with the same
/// slot count between two threads, measured in the same run.
public struct RingBenchmark: Benchmark {
    public let name = "ring"
    public let summary = "shared ring requests answered per second vs a plain SPSC queue (two threads)"

    /// The ring the headline figure uses: one page, 32 slots of 64 bytes, the size every Xen
    /// split driver starts with. The multi-page ring is reported beside it.
    static let headlinePages = 1
    static let otherPages = 4

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let repeats = options.quick ? 3 : 5
        let seconds = options.phaseSeconds
        let loadBefore = Self.loadAverage()
        var ringRuns: [Int: [RingPhase]] = [:]
        var queueRuns: [Int: [Measure.Rate]] = [:]
        let geometries = try [Self.headlinePages, Self.otherPages].map { pages in
            try RingGeometry(request: BenchRequest.self, response: BenchResponse.self, byteCount: pages * RingLayout.pageSize)
        }
        options.log("ring: \(repeats) runs of \(seconds) s per phase; rings: \(geometries.map(\.description).joined(separator: ", "))")

        // Interleave the phases, so a disturbance on a shared machine hits all of them alike.
        for round in 1...repeats {
            for geometry in geometries {
                let ring = try Self.measureRing(pages: geometry.pages, seconds: seconds)
                ringRuns[geometry.pages, default: []].append(ring)
                let queue = Self.measureQueue(slots: geometry.slots, seconds: seconds)
                queueRuns[geometry.pages, default: []].append(queue)
                options.log("ring: round \(round), \(geometry.pages) page(s): ring \(formatFigure(ring.rate.perSecond / 1e6)) Mreq/s, "
                            + "spsc \(formatFigure(queue.perSecond / 1e6)) Mmsg/s, "
                            + "\(formatFigure(ring.notificationsPerRequest)) notifications/request")
            }
        }

        let loadAfter = Self.loadAverage()
        func median(_ pages: Int) -> (ring: RingPhase, queue: Measure.Rate) {
            let rings = ringRuns[pages]!.sorted { $0.rate.perSecond < $1.rate.perSecond }
            return (rings[rings.count / 2], Measure.median(queueRuns[pages]!))
        }
        let headline = median(Self.headlinePages), other = median(Self.otherPages)
        let headlineGeometry = geometries[0], otherGeometry = geometries[1]
        let otherRatio = other.queue.perSecond > 0 ? other.ring.rate.perSecond / other.queue.perSecond : 0

        return BenchmarkResult(
            bench: name,
            value: headline.ring.rate.perSecond / 1e6,
            unit: "Mreq/s",
            baseline: headline.queue.perSecond / 1e6,
            baselineName: "plain SPSC queue, same 64-byte messages and slot count (Mmsg/s)",
            goal: ">= 20 Mreq/s and ratio >= 0.5",
            extra: [
                ("ring", .string("\(headlineGeometry.pages) page")),
                ("ring_pages", .integer(Int64(headlineGeometry.pages))),
                ("ring_slots", .integer(Int64(headlineGeometry.slots))),
                ("entry_bytes", .integer(Int64(headlineGeometry.entrySize))),
                ("request_bytes", .integer(Int64(MemoryLayout<BenchRequest>.size))),
                ("response_bytes", .integer(Int64(MemoryLayout<BenchResponse>.size))),
                ("notifications_per_request", .number(headline.ring.notificationsPerRequest)),
                ("futex_wakes_per_request", .number(headline.ring.wakesPerRequest)),
                ("front_batch", .integer(Int64(Self.frontBatch(slots: headlineGeometry.slots)))),
                ("requests_per_push", .number(headline.ring.requestsPerPush)),
                ("responses_per_push", .number(headline.ring.responsesPerPush)),
                ("multi_page_ring_pages", .integer(Int64(otherGeometry.pages))),
                ("multi_page_ring_slots", .integer(Int64(otherGeometry.slots))),
                ("multi_page_value", .number(other.ring.rate.perSecond / 1e6)),
                ("multi_page_baseline", .number(other.queue.perSecond / 1e6)),
                ("multi_page_ratio", .number(otherRatio)),
                ("multi_page_notifications_per_request", .number(other.ring.notificationsPerRequest)),
                ("multi_page_requests_per_push", .number(other.ring.requestsPerPush)),
                ("runs_per_phase", .integer(Int64(repeats))),
                ("pinned_cpus", Self.cpus.frontend.map { f in .array([.integer(Int64(f)), .integer(Int64(Self.cpus.backend!))]) } ?? .null),
                ("load_average_before", loadBefore.map(JSONValue.number) ?? .null),
                ("load_average_after", loadAfter.map(JSONValue.number) ?? .null),
                ("phase_seconds", .number(seconds)),
            ])
    }

    // MARK: The ring

    /// One timed run of the ring.
    struct RingPhase {
        var rate: Measure.Rate
        var requests: UInt64 = 0          // answered, over the whole run
        var requestPushes: UInt64 = 0
        var responsePushes: UInt64 = 0
        var notifications: UInt64 = 0     // both directions
        var wakes: UInt64 = 0             // notifications that needed a futex wake

        var notificationsPerRequest: Double { requests == 0 ? 0 : Double(notifications) / Double(requests) }
        var wakesPerRequest: Double { requests == 0 ? 0 : Double(wakes) / Double(requests) }
        var requestsPerPush: Double { requestPushes == 0 ? 0 : Double(requests) / Double(requestPushes) }
        var responsesPerPush: Double { responsePushes == 0 ? 0 : Double(requests) / Double(responsePushes) }
    }

    /// What the two threads of one ring run share.
    final class RingPhaseState: Sendable {
        let stop = Atomic<Bool>(false)
        let front = Mutex(SideStats())
        let back = Mutex(SideStats())
        let rate = Mutex(Measure.Rate(operations: 0, nanoseconds: 0))
    }

    /// What the two threads of one queue run share.
    final class QueuePhaseState: Sendable {
        let stop = Atomic<Bool>(false)
        let rate = Mutex(Measure.Rate(operations: 0, nanoseconds: 0))
        let failure = Mutex<String?>(nil)
    }

    /// What one side counted.
    struct SideStats: Sendable {
        var entries: UInt64 = 0
        var pushes: UInt64 = 0
        var notifications: UInt64 = 0
        var wakes: UInt64 = 0
        var failure: String?
    }

    /// The two CPUs the two sides are pinned to (the first two the process may use; none
    /// when it may use only one). The same pair for the ring and the baseline.
    static let cpus: (frontend: Int?, backend: Int?) = {
        let allowed = BenchThread.allowedCPUs()
        return allowed.count >= 2 ? (allowed[0], allowed[1]) : (nil, nil)
    }()

    /// Requests the frontend writes before it pushes: half the ring, so it fills one half
    /// while the backend answers the other (a whole-ring batch makes the two sides take turns,
    /// which measured about 20% slower on one page).
    static func frontBatch(slots: Int) -> Int { max(slots / 2, 1) }

    /// How long an idle side polls the ring before its final check, and spins on the doorbell
    /// before it sleeps; spinning keeps the round trip off the futex system calls.
    static let pollSpins = 64
    static let doorbellSpins = 50_000
    /// A sleeping side wakes at least this often to look at the stop flag.
    static let sleepTimeout: Int64 = 50_000_000

    static func measureRing(pages: Int, seconds: Double) throws -> RingPhase {
        let memory = try GuestMemory(ramBytes: UInt64(pages * RingLayout.pageSize), name: "vireo-bench-ring")
        let region = try memory.translate(GuestPhysicalAddress(0), count: pages * RingLayout.pageSize)
        let front = try FrontRing<BenchRequest, BenchResponse>(initializing: region)
        let back = try BackRing<BenchRequest, BenchResponse>(attaching: region)
        let toBack = Doorbell(), toFront = Doorbell()
        let shared = RingPhaseState()

        let backThread = BenchThread {
            if let cpu = Self.cpus.backend { BenchThread.pinCurrentThread(to: cpu) }
            var back = back
            let stats = Self.serve(&back, toFront: toFront, toBack: toBack, stop: shared.stop)
            shared.back.withLock { $0 = stats }
            if stats.failure != nil { shared.stop.store(true, ordering: .releasing); _ = toFront.ring() }
        }
        let frontThread = BenchThread {
            if let cpu = Self.cpus.frontend { BenchThread.pinCurrentThread(to: cpu) }
            var front = front
            var rate = Measure.Rate(operations: 0, nanoseconds: 0)
            let stats = Self.drive(&front, toBack: toBack, toFront: toFront, stop: shared.stop, seconds: seconds, rate: &rate)
            shared.front.withLock { $0 = stats }
            shared.rate.withLock { $0 = rate }
            shared.stop.store(true, ordering: .releasing)
            _ = toBack.ring()
        }
        frontThread.join()
        backThread.join()
        withExtendedLifetime(memory) {}

        let f = shared.front.withLock { $0 }, b = shared.back.withLock { $0 }
        if let failure = f.failure ?? b.failure { throw RingBenchmarkError(message: failure) }
        var phase = RingPhase(rate: shared.rate.withLock { $0 })
        phase.requests = f.entries
        phase.requestPushes = f.pushes
        phase.responsePushes = b.pushes
        phase.notifications = f.notifications + b.notifications
        phase.wakes = f.wakes + b.wakes
        return phase
    }

    /// The frontend: keeps the ring full of requests, consumes responses, and times how many
    /// are answered in `seconds` after a short warm-up.
    static func drive(
        _ front: inout FrontRing<BenchRequest, BenchResponse>, toBack: Doorbell, toFront: Doorbell,
        stop: borrowing Atomic<Bool>, seconds: Double, rate: inout Measure.Rate
    ) -> SideStats {
        var stats = SideStats()
        var next: UInt64 = 0, expected: UInt64 = 0
        let batch = UInt64(Self.frontBatch(slots: front.size))
        let warmUp = UInt64(min(seconds * 0.1, 0.05) * 1e9), budget = UInt64(seconds * 1e9)
        let begin = Measure.now()
        var measuring = false, start: UInt64 = 0, startCount: UInt64 = 0
        do {
            while !stop.load(ordering: .relaxed) {
                var produced: UInt64 = 0
                while front.freeRequests > 0 && produced < batch {
                    try front.produceRequest(BenchRequest(sequence: next))
                    next &+= 1
                    produced &+= 1
                }
                if produced > 0 {
                    stats.pushes &+= 1
                    if front.pushRequestsAndCheckNotify() {
                        stats.notifications &+= 1
                        if toBack.ring() { stats.wakes &+= 1 }
                    }
                }
                var consumed: UInt64 = 0
                while let response = try front.consumeResponse() {
                    guard response.sequence == expected, response.check == BenchRequest.check(expected) else {
                        stats.failure = "response \(response.sequence) where \(expected) was due"
                        return stats
                    }
                    expected &+= 1
                    consumed &+= 1
                }
                if produced == 0 && consumed == 0 { try idle(&front, bell: toFront) }
                let now = Measure.now()
                if !measuring {
                    if now &- begin >= warmUp { measuring = true; start = now; startCount = expected }
                } else if now &- start >= budget {
                    rate = Measure.Rate(operations: expected &- startCount, nanoseconds: now &- start)
                    break
                }
            }
        } catch {
            stats.failure = "front: \(error)"
        }
        stats.entries = expected
        return stats
    }

    /// The backend: answers every request it finds with a 16-byte response, until told to stop.
    static func serve(
        _ back: inout BackRing<BenchRequest, BenchResponse>, toFront: Doorbell, toBack: Doorbell,
        stop: borrowing Atomic<Bool>
    ) -> SideStats {
        var stats = SideStats()
        var expected: UInt64 = 0
        do {
            while true {
                var answered: UInt64 = 0
                while let request = try back.consumeRequest() {
                    // Validate the copy, as a backend would.
                    guard request.sequence == expected else {
                        stats.failure = "request \(request.sequence) where \(expected) was due"
                        return stats
                    }
                    expected &+= 1
                    try back.produceResponse(
                        BenchResponse(sequence: request.sequence, status: 0, check: UInt32(truncatingIfNeeded: request.payload.6)))
                    answered &+= 1
                }
                if answered > 0 {
                    stats.pushes &+= 1
                    if back.pushResponsesAndCheckNotify() {
                        stats.notifications &+= 1
                        if toFront.ring() { stats.wakes &+= 1 }
                    }
                    continue
                }
                if stop.load(ordering: .acquiring) { break }
                try idle(&back, bell: toBack)
            }
        } catch {
            stats.failure = "back: \(error)"
        }
        stats.entries = expected
        return stats
    }

    /// An idle frontend: poll briefly, final check, then wait for the backend's event.
    @inline(__always)
    static func idle(_ front: inout FrontRing<BenchRequest, BenchResponse>, bell: Doorbell) throws(RingError) {
        for _ in 0..<pollSpins {
            if try front.unconsumedResponses() > 0 { return }
            Barrier.relax()
        }
        let ticket = bell.ticket()
        if try front.finalCheckForResponses() { return }
        _ = bell.wait(for: ticket, spins: doorbellSpins, timeoutNanoseconds: sleepTimeout)
    }

    /// An idle backend: poll briefly, final check, then wait for the frontend's event.
    @inline(__always)
    static func idle(_ back: inout BackRing<BenchRequest, BenchResponse>, bell: Doorbell) throws(RingError) {
        for _ in 0..<pollSpins {
            if try back.unconsumedRequests() > 0 { return }
            Barrier.relax()
        }
        let ticket = bell.ticket()
        if try back.finalCheckForRequests() { return }
        _ = bell.wait(for: ticket, spins: doorbellSpins, timeoutNanoseconds: sleepTimeout)
    }

    // MARK: The baseline

    /// One timed run of the SPSC queue: messages received per second.
    static func measureQueue(slots: Int, seconds: Double) -> Measure.Rate {
        let queue = SPSCQueue<BenchRequest>(capacity: slots)
        let shared = QueuePhaseState()

        let producerThread = BenchThread {
            if let cpu = Self.cpus.frontend { BenchThread.pinCurrentThread(to: cpu) }
            var producer = SPSCQueue<BenchRequest>.Producer(queue: queue)
            var next: UInt64 = 0
            var spins = 0
            while true {
                if producer.push(BenchRequest(sequence: next)) {
                    next &+= 1
                    spins = 0
                    continue
                }
                spins &+= 1
                if spins & 1023 == 0 {
                    if shared.stop.load(ordering: .relaxed) { break }
                    sched_yield()  // the consumer may be waiting for this core
                }
                Barrier.relax()
            }
        }
        let consumerThread = BenchThread {
            if let cpu = Self.cpus.backend { BenchThread.pinCurrentThread(to: cpu) }
            var consumer = SPSCQueue<BenchRequest>.Consumer(queue: queue)
            var expected: UInt64 = 0
            let warmUp = UInt64(min(seconds * 0.1, 0.05) * 1e9), budget = UInt64(seconds * 1e9)
            let begin = Measure.now()
            var measuring = false, start: UInt64 = 0, startCount: UInt64 = 0
            var emptyPolls = 0
            outer: while true {
                for _ in 0..<64 {
                    guard let message = consumer.pop() else {
                        emptyPolls &+= 1
                        if emptyPolls & 1023 == 0 { sched_yield() }  // the producer may need this core
                        Barrier.relax()
                        break
                    }
                    emptyPolls = 0
                    guard message.sequence == expected, message.payload.6 == BenchRequest(sequence: expected).payload.6 else {
                        shared.failure.withLock { $0 = "message \(message.sequence) where \(expected) was due" }
                        break outer
                    }
                    expected &+= 1
                }
                let now = Measure.now()
                if !measuring {
                    if now &- begin >= warmUp { measuring = true; start = now; startCount = expected }
                } else if now &- start >= budget {
                    shared.rate.withLock { $0 = Measure.Rate(operations: expected &- startCount, nanoseconds: now &- start) }
                    break
                }
            }
            shared.stop.store(true, ordering: .releasing)
        }
        consumerThread.join()
        producerThread.join()
        if let message = shared.failure.withLock({ $0 }) { preconditionFailure("SPSC baseline: \(message)") }
        return shared.rate.withLock { $0 }
    }
}

extension RingBenchmark {
    /// The one-minute load average (/proc/loadavg): on a shared machine, other work on the two
    /// cores the threads need shows in the figures, so the result says how busy the host was.
    static func loadAverage() -> Double? {
        guard let file = fopen("/proc/loadavg", "r") else { return nil }
        defer { fclose(file) }
        var first = 0.0
        return readNumber(file, &first) ? first : nil
    }

    private static func readNumber(_ file: UnsafeMutablePointer<FILE>, _ value: inout Double) -> Bool {
        var bytes: [UInt8] = []
        while bytes.count < 32 {
            let c = getc(file)
            if c == EOF || c == 0x20 { break }
            bytes.append(UInt8(truncatingIfNeeded: c))
        }
        guard let parsed = Double(String(decoding: bytes, as: UTF8.self)) else { return false }
        value = parsed
        return true
    }
}

struct RingBenchmarkError: Error, CustomStringConvertible {
    var message: String
    var description: String { "ring benchmark: \(message)" }
}

/// A 64-byte request: a sequence number and seven words of payload the backend reads.
struct BenchRequest: BitwiseCopyable {
    var sequence: UInt64
    var payload: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)

    @inline(__always)
    init(sequence: UInt64) {
        self.sequence = sequence
        let w = sequence &* 0x9e37_79b9_7f4a_7c15
        payload = (w, w &+ 1, w &+ 2, w &+ 3, w &+ 4, w &+ 5, w &+ 6)
    }

    /// What the backend echoes from the last payload word.
    @inline(__always)
    static func check(_ sequence: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: (sequence &* 0x9e37_79b9_7f4a_7c15) &+ 6) }
}

/// A 16-byte response without padding.
struct BenchResponse: BitwiseCopyable {
    var sequence: UInt64
    var status: UInt32
    var check: UInt32
}
