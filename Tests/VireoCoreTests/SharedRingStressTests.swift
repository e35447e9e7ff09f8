import Glibc
import Synchronization
import Testing
import VireoCore
import VireoHypercalls

/// Front and back on two threads, with event suppression and real sleeps: a lost wakeup
/// shows up as a failure (work pending while a side slept past its timeout), not a hang.
@Suite struct SharedRingStressTests {
    struct Outcome: Sendable {
        var failures: [String] = []
        var requests: UInt64 = 0
        var responses: UInt64 = 0
        var pushes = 0
    }

    static let count: UInt64 = 1_000_000
    /// A side that sleeps this long while work is pending lost a wakeup.
    static let sleepTimeout: Int64 = 2_000_000_000
    /// The whole exchange must finish within this (a broken ring fails, never hangs).
    static let overallSeconds: UInt64 = 120

    /// (pages, largest batch): whole-ring batches, and small random ones (many more pushes,
    /// sleeps and races between a push and the peer's final check).
    @Test(arguments: [(1, 32), (4, 128), (1, 3), (4, 7)])
    func millionRequestsCrossTwoThreadsInOrder(pages count: Int, batch: Int) throws {
        let pages = try RingPages(pages: count)
        let front = try FrontRing<vireo_blkif_request, vireo_blkif_response>(initializing: pages.region)
        let back = try BackRing<vireo_blkif_request, vireo_blkif_response>(attaching: pages.region)
        let toBack = TestDoorbell(), toFront = TestDoorbell()
        let stop = Atomic<Bool>(false)
        let deadline = Self.now() + Self.overallSeconds * 1_000_000_000
        let frontOutcome = Mutex(Outcome()), backOutcome = Mutex(Outcome())

        let backThread = startThread {
            var back = back
            var outcome = Outcome()
            var random = SeededGenerator(seed: 2)
            defer { backOutcome.withLock { $0 = outcome } }
            do {
                while outcome.requests < Self.count && !stop.load(ordering: .relaxed) {
                    var answered = 0
                    let limit = batch == 1 ? 1 : Int(random.next() % UInt64(batch)) + 1
                    while answered < limit, let request = try back.consumeRequest() {
                        // Validate the copy: in order, intact.
                        if request.id != outcome.requests || request.sector_number != request.id &* 8 {
                            outcome.failures.append("back: request \(request.id) where \(outcome.requests) was due")
                            stop.store(true, ordering: .relaxed)
                            return
                        }
                        outcome.requests += 1
                        try back.produceResponse { slot in
                            slot.set(\.id, to: request.id)
                            slot.set(\.operation, to: request.operation)
                            slot.set(\.status, to: Int16(VIREO_BLKIF_RSP_OKAY))
                        }
                        answered += 1
                    }
                    if answered > 0 {
                        outcome.pushes += 1
                        if back.pushResponsesAndCheckNotify() { toFront.ring() }
                        continue
                    }
                    let ticket = toBack.ticket()
                    if try back.finalCheckForRequests() { continue }
                    if !toBack.wait(for: ticket, timeoutNanoseconds: Self.sleepTimeout) {
                        if try back.unconsumedRequests() > 0 {
                            outcome.failures.append("back: lost wakeup (requests pending, no event)")
                            stop.store(true, ordering: .relaxed)
                            return
                        }
                        if Self.now() > deadline { outcome.failures.append("back: timed out"); return }
                    }
                }
            } catch {
                outcome.failures.append("back: \(error)")
                stop.store(true, ordering: .relaxed)
            }
        }

        let frontThread = startThread {
            var front = front
            var outcome = Outcome()
            var random = SeededGenerator(seed: 1)
            defer { frontOutcome.withLock { $0 = outcome } }
            do {
                while outcome.responses < Self.count && !stop.load(ordering: .relaxed) {
                    var produced = 0
                    let limit = batch == 1 ? 1 : Int(random.next() % UInt64(batch)) + 1
                    while outcome.requests < Self.count && front.freeRequests > 0 && produced < limit {
                        var request = vireo_blkif_request()
                        request.operation = UInt8(VIREO_BLKIF_OP_READ)
                        request.id = outcome.requests
                        request.sector_number = outcome.requests &* 8
                        try front.produceRequest(request)
                        outcome.requests += 1
                        produced += 1
                    }
                    if produced > 0 {
                        outcome.pushes += 1
                        if front.pushRequestsAndCheckNotify() { toBack.ring() }
                    }
                    var consumed = 0
                    while let response = try front.consumeResponse() {
                        if response.id != outcome.responses || response.status != Int16(VIREO_BLKIF_RSP_OKAY) {
                            outcome.failures.append("front: response \(response.id) where \(outcome.responses) was due")
                            stop.store(true, ordering: .relaxed)
                            return
                        }
                        outcome.responses += 1
                        consumed += 1
                    }
                    if produced > 0 || consumed > 0 { continue }
                    let ticket = toFront.ticket()
                    if try front.finalCheckForResponses() { continue }
                    if !toFront.wait(for: ticket, timeoutNanoseconds: Self.sleepTimeout) {
                        if try front.unconsumedResponses() > 0 {
                            outcome.failures.append("front: lost wakeup (responses pending, no event)")
                            stop.store(true, ordering: .relaxed)
                            return
                        }
                        if Self.now() > deadline { outcome.failures.append("front: timed out"); return }
                    }
                }
            } catch {
                outcome.failures.append("front: \(error)")
                stop.store(true, ordering: .relaxed)
            }
        }

        pthread_join(frontThread, nil)
        stop.store(true, ordering: .relaxed)
        toBack.ring()  // let a sleeping back see `stop`
        pthread_join(backThread, nil)

        let f = frontOutcome.withLock { $0 }, b = backOutcome.withLock { $0 }
        #expect(f.failures.isEmpty, "\(f.failures)")
        #expect(b.failures.isEmpty, "\(b.failures)")
        #expect(f.requests == Self.count && f.responses == Self.count)
        #expect(b.requests == Self.count)
        // Event suppression at work: far fewer notifications than requests.
        let events = toBack.rings.load(ordering: .relaxed) + toFront.rings.load(ordering: .relaxed)
        #expect(events < Int(Self.count))
        print("ring stress, \(count) page(s), batches up to \(batch): \(f.pushes) request pushes, \(b.pushes) response pushes, \(events) events for \(Self.count) requests")
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
