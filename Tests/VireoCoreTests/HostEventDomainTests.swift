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
