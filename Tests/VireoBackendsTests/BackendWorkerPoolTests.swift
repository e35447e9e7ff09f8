import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore

/// A list the workers' turns append to, in the order they ran.
private final class TurnLog: Sendable {
    let entries = Mutex<[Int]>([])
    func add(_ worker: Int) { entries.withLock { $0.append(worker) } }
    var all: [Int] { entries.withLock { $0 } }
}

/// A number and a flag shared with the workers' turns.
private final class Cell: Sendable {
    let value: Atomic<Int>
    init(_ value: Int = 0) { self.value = Atomic(value) }
    var now: Int { value.load(ordering: .acquiring) }
    func set(_ n: Int) { value.store(n, ordering: .releasing) }
    func add(_ n: Int) { value.add(n, ordering: .acquiringAndReleasing) }
}

/// Waits up to 10 s for `condition`.
private func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now.advanced(by: .seconds(10))
    while !condition() {
        if ContinuousClock.now > deadline { return false }
        usleep(500)
    }
    return true
}

/// The pool the block backend's rings take turns on: round-robin with a budget, a storm of
/// wake-ups coalesced, a stop that waits for the turn in progress.
@Suite struct BackendWorkerPoolTests {
    /// Three workers with 40 units of work each on one thread with a budget of 4: they take
    /// turns in a fixed rotation, none runs twice while another is waiting, and each is cut
    /// after exactly its budget.
    @Test func readyWorkersTakeTurnsRoundRobinWithinTheBudget() throws {
        let pool = BackendWorkerPool(threads: 1, budget: 4, name: "test-rr")
        defer { pool.stop() }
        let log = TurnLog()
        let left = (0..<3).map { _ in Cell(40) }
        let gate = Cell()
        var workers: [ServiceWorker] = []
        for index in 0..<3 {
            let worker = try ServiceWorker(name: "w\(index)", pool: pool)
            workers.append(worker)
        }
        // Held until all three are queued, so the rotation starts with every worker ready.
        for (index, worker) in workers.enumerated() {
            worker.start(onFailure: { _ in }, budgeted: { [left] budget in
                while gate.now == 0 { usleep(100) }
                #expect(budget == 4)
                let had = left[index].now
                let take = min(budget, had)
                left[index].set(had - take)
                if take > 0 { log.add(index) }
                return had - take > 0 ? .more : .idle
            })
        }
        gate.set(1)
        #expect(eventually { left.allSatisfy { $0.now == 0 } })
        let turns = log.all
        #expect(turns.count == 30, "10 turns of 4 for each of 3 workers: \(turns)")
        for i in 0..<(turns.count - 2) {
            #expect(Set(turns[i...i + 2]).count == 3, "turns \(i)...\(i + 2) of \(turns) are not a rotation")
        }
        for worker in workers { worker.stop() }
    }

    /// SECURITY 12: 100 000 wake-ups from a storming peer while a worker is slow cost a lock
    /// each; the worker runs a few turns, not one per event; the queue never holds it twice;
    /// and a wake-up after the storm is not lost.
    @Test func aStormOfWakeUpsIsCoalescedAndBounded() throws {
        let pool = BackendWorkerPool(threads: 2, budget: 8, name: "test-storm")
        defer { pool.stop() }
        let turns = Cell()
        let worker = try ServiceWorker(name: "stormed", pool: pool)
        let quiet = try ServiceWorker(name: "quiet", pool: pool)
        worker.start(onFailure: { _ in }, budgeted: { _ in
            turns.add(1)
            usleep(200)
            return .idle
        })
        quiet.start(onFailure: { _ in }, budgeted: { _ in .idle })
        var most = 0
        for n in 0..<100_000 {
            worker.wake()
            if n % 1000 == 0 { most = max(most, pool.queued) }
        }
        #expect(most <= 2, "the queue held at most each worker once")
        let afterStorm = turns.now
        #expect(afterStorm < 10_000, "\(afterStorm) turns for 100 000 events")
        usleep(50_000)
        let settled = turns.now
        worker.wake()
        #expect(eventually { turns.now > settled }, "the last wake-up got its turn")
        worker.stop()
        quiet.stop()
    }

    /// stop() waits for the turn in progress; no turn runs after it, whatever wakes it.
    @Test func stopWaitsForTheTurnAndEndsTheWorker() throws {
        let pool = BackendWorkerPool(threads: 1, budget: 8, name: "test-stop")
        defer { pool.stop() }
        let inTurn = Cell(), turns = Cell()
        let worker = try ServiceWorker(name: "stopped", pool: pool)
        worker.start(onFailure: { _ in }, budgeted: { _ in
            inTurn.set(1)
            turns.add(1)
            usleep(20_000)
            inTurn.set(0)
            return .more
        })
        #expect(eventually { inTurn.now == 1 })
        worker.stop()
        #expect(inTurn.now == 0, "stop returned after the turn ended")
        let count = turns.now
        worker.wake()
        usleep(50_000)
        #expect(turns.now == count)
    }

    /// SECURITY 12, late EOI: a guest's events that keep finding nothing get its port masked in
    /// dom0 (the worker deferred); an event with work behind it that comes while masked is
    /// served once the deferral ends, not lost; stop() leaves the port unmasked.
    /// With either delivery: an immediate port's unmask runs its handler (a wake-up, which
    /// takes the pool's lock) on the unmasking thread, so the pool unmasks without its lock.
    @Test(arguments: [HostEventDomain.Delivery.dispatcher, .immediate])
    func spuriousEventsMaskThePortForAWhileAndLoseNothing(delivery: HostEventDomain.Delivery) throws {
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let guest = try SimulatedGuest(id: DomainID(1), ramPages: 16, hub: hub, grantTables: grants)
        let dispatcher = HostEventDispatcher(host, name: "test-late-eoi")
        defer { dispatcher.stop() }
        let pool = BackendWorkerPool(threads: 1, name: "test-late-eoi")
        defer { pool.stop() }
        let work = Cell(), served = Cell(), empty = Cell()
        let worker = try ServiceWorker(name: "late-eoi", pool: pool)
        let guestPort = try guest.allocUnbound(remote: host.id)
        let port = try host.bindInterdomain(remoteDomain: guest.id, remotePort: guestPort, delivery: delivery) { _ in
            worker.wake()
        }
        worker.wakes(on: port, of: host)
        worker.start(onFailure: { _ in }, budgeted: { _ in
            let pending = work.now
            guard pending > 0 else {
                empty.add(1)
                return .empty
            }
            work.set(0)
            served.add(pending)
            return .idle
        })
        // The storm: events with nothing behind them, until the port is masked.
        #expect(eventually {
            try? guest.notify(guestPort)
            usleep(100)
            return pool.deferrals > 0
        })
        let stormTurns = empty.now
        // A request (the work) and its event while the port may be masked: served later, once.
        work.set(1)
        try guest.notify(guestPort)
        #expect(eventually { served.now == 1 }, "the event that came during the deferral was served")
        #expect(stormTurns < 100, "\(stormTurns) empty turns before the mask")
        // Spurious again: masked again, then stopped while deferred: the port is left unmasked.
        #expect(eventually {
            try? guest.notify(guestPort)
            usleep(100)
            return host.events.isMasked(port)
        })
        worker.stop()
        #expect(!host.events.isMasked(port), "stop() unmasked the port")
        try host.close(port)
    }

    /// A turn that throws ends the worker and hands the error over once.
    @Test func aFailingTurnIsReportedAndNotRunAgain() throws {
        let pool = BackendWorkerPool(threads: 1, name: "test-fail")
        defer { pool.stop() }
        let failures = Cell(), turns = Cell()
        let worker = try ServiceWorker(name: "failing", pool: pool)
        worker.start(onFailure: { _ in failures.add(1) }, budgeted: { (_: Int) throws(BackendError) -> ServiceTurn in
            turns.add(1)
            throw BackendError("broken ring")
        })
        #expect(eventually { failures.now == 1 })
        worker.wake()
        usleep(150_000)  // past a safety-net tick
        #expect(turns.now == 1 && failures.now == 1)
        worker.stop()
    }
}
