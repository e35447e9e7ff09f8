import Foundation
import Synchronization
import Testing
import VireoABI
@testable import VireoCore

/// The host's own domain: backends bind like guests and take events through a dispatcher.
@Suite struct HostEventDomainTests {
    @Test func backendHandlersRunOnDispatch() throws {
        let hub = EventChannels()
        let host = try HostEventDomain(hub: hub)
        let guest = try EventTestDomain(hub, id: 1)
        let seen = Mutex<[EventPort]>([])

        // The frontend allocates a port for the backend; the backend binds it with a handler.
        let frontPort = try hub.allocUnbound(caller: guest.id, in: .calling, remote: host.id)
        let backPort = try host.bindInterdomain(remoteDomain: guest.id, remotePort: frontPort) { port in
            seen.withLock { $0.append(port) }
        }
        // The binding starts pending: the first dispatch runs the handler at once.
        #expect(host.dispatch(timeout: .seconds(5)) == [backPort])
        #expect(seen.withLock { $0 } == [backPort])

        try hub.send(caller: guest.id, port: frontPort)
        #expect(host.dispatch(timeout: .seconds(5)) == [backPort])
        #expect(seen.withLock { $0.count } == 2)

        // The backend notifies the frontend the same way.
        try host.send(backPort)
        #expect(guest.events.scanPending(vcpu: 0) == [frontPort])

        // Nothing pending: the wait times out empty.
        let start = ContinuousClock.now
        #expect(host.dispatch(timeout: .milliseconds(50)) == [])
        #expect(ContinuousClock.now - start >= .milliseconds(50))

        // A masked port is not reported until unmasked.
        try host.mask(backPort)
        try hub.send(caller: guest.id, port: frontPort)
        #expect(host.dispatch(timeout: .milliseconds(10)) == [])
        try host.unmask(backPort)
        #expect(host.dispatch(timeout: .seconds(5)) == [backPort])

        try host.close(backPort)
        #expect(try hub.status(caller: guest.id, domain: .calling, port: frontPort).binding == .unbound(remote: host.id))
        #expect(throws: XenError.EINVAL) { try host.mask(EventPort(5000)) }
    }

    @Test func dispatchSleepsUntilAnEventArrives() throws {
        let hub = EventChannels()
        let host = try HostEventDomain(hub: hub, id: DomainID(0))
        let guest = try EventTestDomain(hub, id: 7)
        let virq = try host.bindVirq(.console)
        let front = try hub.allocUnbound(caller: guest.id, in: .calling, remote: host.id)
        let back = try host.bindInterdomain(remoteDomain: guest.id, remotePort: front)
        #expect(host.dispatch(timeout: .seconds(1)) == [back])

        // A blocked dispatcher wakes for each of many events, from another thread.
        let rounds = 200
        let received = Mutex<Int>(0)
        let finished = runThreads(2) { thread in
            if thread == 0 {
                var got = 0
                while got < rounds {
                    let ports = host.dispatch(timeout: .seconds(10))
                    precondition(!ports.isEmpty, "dispatch timed out with events outstanding")
                    got += ports.count
                    received.withLock { $0 = got }
                }
            } else {
                for round in 0..<rounds {
                    // Wait for the dispatcher to take the last event, so none coalesce.
                    while received.withLock({ $0 }) < round { Thread.sleep(forTimeInterval: 0.0001) }
                    if round % 2 == 0 { try! hub.send(caller: guest.id, port: front) } else {
                        try! hub.raiseVirq(in: host.id, virq: .console, vcpu: nil)
                    }
                }
            }
        }
        #expect(finished)
        #expect(received.withLock { $0 } == rounds)
        _ = virq

        // interrupt() ends a wait with nothing.
        let interrupter = runThreads(2) { thread in
            if thread == 0 { precondition(host.dispatch(timeout: .seconds(30)).isEmpty) } else {
                Thread.sleep(forTimeInterval: 0.05)
                host.interrupt()
            }
        }
        #expect(interrupter)
    }

    /// Immediate delivery: the handler runs on the sender's thread inside its send, with no
    /// dispatch; a masked port's event waits for the unmask, whose thread runs it; a
    /// dispatcher port in the same word is left to the dispatch; a port closed and bound again
    /// for the dispatcher is no longer immediate.
    @Test func immediatePortsRunTheirHandlerInsideTheSend() throws {
        let hub = EventChannels()
        let host = try HostEventDomain(hub: hub)
        let guest = try EventTestDomain(hub, id: 1)
        let ran = Mutex<[(EventPort, pthread_t)]>([])
        @Sendable func record(_ port: EventPort) { ran.withLock { $0.append((port, pthread_self())) } }

        let front = try hub.allocUnbound(caller: guest.id, in: .calling, remote: host.id)
        let back = try host.bindInterdomain(remoteDomain: guest.id, remotePort: front, delivery: .immediate) { record($0) }
        // The binding starts pending and notifies the dispatcher's vCPU: its first run is a dispatch's.
        #expect(host.poll() == [back])
        #expect(ran.withLock { $0.count } == 1)
        // A dispatcher port beside it (the next number, the same pending word).
        let otherFront = try hub.allocUnbound(caller: guest.id, in: .calling, remote: host.id)
        let other = try host.bindInterdomain(remoteDomain: guest.id, remotePort: otherFront) { record($0) }
        #expect(other.rawValue / 64 == back.rawValue / 64)
        #expect(host.poll() == [other])
        ran.withLock { $0.removeAll() }

        // Sent from another thread: the handler has run, on that thread, when send returns.
        let seenBySender = Mutex<[EventPort]>([]), senderThread = Mutex<pthread_t?>(nil)
        #expect(runThreads(1) { _ in
            senderThread.withLock { $0 = pthread_self() }
            try? hub.send(caller: guest.id, port: front)
            try? hub.send(caller: guest.id, port: otherFront)
            seenBySender.withLock { $0 = ran.withLock { $0.map { $0.0 } } }
        })
        #expect(seenBySender.withLock { $0 } == [back], "the immediate port ran inside its send, the other did not")
        #expect(ran.withLock { $0.map(\.1) } == [senderThread.withLock { $0 }!])
        #expect(host.events.isPending(other) && !host.events.isPending(back))
        #expect(host.poll() == [other], "the dispatcher port waited for the dispatch")
        #expect(ran.withLock { $0.map(\.0) } == [back, other])
        ran.withLock { $0.removeAll() }

        // Masked: the event stays pending; the unmask runs the handler on the unmasking thread.
        try host.mask(back)
        try hub.send(caller: guest.id, port: front)
        #expect(ran.withLock { $0.isEmpty } && host.events.isPending(back))
        #expect(host.poll() == [], "a masked port is nobody's yet")
        try host.unmask(back)
        #expect(ran.withLock { $0.map(\.0) } == [back])
        #expect(!host.events.isPending(back))
        ran.withLock { $0.removeAll() }

        // Closed and bound again under the same number for the dispatcher: no longer immediate.
        try host.close(back)
        let again = try host.bindInterdomain(remoteDomain: guest.id, remotePort: front) { record($0) }
        #expect(again == back)
        #expect(host.poll() == [again])
        ran.withLock { $0.removeAll() }
        try hub.send(caller: guest.id, port: front)
        #expect(ran.withLock { $0.isEmpty })
        #expect(host.poll() == [again])
    }

    /// Immediate passes on many threads at once lose nothing: every send is followed by a run
    /// of the handler that began after it (the port is never left pending), and no event runs
    /// the handler twice.
    @Test func immediatePortsUnderConcurrentSendersLoseNothing() throws {
        let hub = EventChannels()
        let host = try HostEventDomain(hub: hub)
        let guest = try EventTestDomain(hub, id: 1)
        let runs = Atomic<Int>(0)
        let front = try hub.allocUnbound(caller: guest.id, in: .calling, remote: host.id)
        let back = try host.allocUnbound(remote: guest.id, delivery: .immediate) { _ in runs.add(1, ordering: .relaxed) }
        try hub.close(caller: guest.id, port: front)
        let bound = try hub.bindInterdomain(caller: guest.id, remoteDomain: host.id, remotePort: back)
        let sends = 20_000
        #expect(runThreads(4) { _ in
            for _ in 0..<sends { try? hub.send(caller: guest.id, port: bound) }
        })
        #expect(!host.events.isPending(back), "no event was left behind")
        let count = runs.load(ordering: .relaxed)
        #expect(count >= 1 && count <= 4 * sends, "\(count) runs for \(4 * sends) sends")
        #expect(host.poll() == [])
    }

    @Test func hostDomainGoesAwayWithItsObject() throws {
        let hub = EventChannels()
        weak var weakHost: HostEventDomain?
        do {
            let host = try HostEventDomain(hub: hub, id: DomainID(0))
            weakHost = host
            #expect(hub.isRegistered(DomainID(0)))
        }
        #expect(weakHost == nil)
        #expect(!hub.isRegistered(DomainID(0)))
        #expect(throws: XenError.EEXIST) {
            let host = try HostEventDomain(hub: hub, id: DomainID(3))
            defer { withExtendedLifetime(host) {} }
            _ = try HostEventDomain(hub: hub, id: DomainID(3))
        }
    }
}
