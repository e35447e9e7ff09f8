import Foundation
import Synchronization
import Testing
import VireoABI
@testable import VireoCore

/// SECURITY.md items 11 and 12: hostile port numbers, close/rebind races, event storms, and
/// domain IDs reused after a domain dies.
@Suite struct EventChannelSecurityTests {
    /// Item 11: every port, vCPU, VIRQ and domain a guest passes is checked; a refused call
    /// changes nothing.
    @Test func item11_portsAreValidated() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1, vcpus: 2, portLimit: 64)
        let b = try EventTestDomain(hub, id: 2, vcpus: 2, portLimit: 64)
        // Some state to disturb: an interdomain pair, an IPI, a VIRQ, a pending port in each.
        let ap = try hub.allocUnbound(caller: a.id, in: .calling, remote: b.id)
        let bq = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: ap)
        _ = try hub.bindIPI(caller: a.id, vcpu: 1)
        _ = try hub.bindVirq(caller: b.id, virq: .timer, vcpu: 1)
        let bOnly = try hub.bindIPI(caller: b.id, vcpu: 0)  // a port number A has never bound
        try hub.send(caller: a.id, port: ap)
        let before = (a.eventBits(), b.eventBits(), a.upcalls.all, b.upcalls.all)
        let statusBefore = try (0..<64).map { try hub.status(caller: a.id, domain: .calling, port: EventPort(UInt32($0))) }

        let outOfRange: [UInt32] = [64, 65, 1023, 1024, 4095, 4096, 4097, 0x7fff_ffff, 0x8000_0000, UInt32.max]
        for raw in outOfRange {
            let port = EventPort(raw)
            #expect(throws: XenError.EINVAL) { try hub.send(caller: a.id, port: port) }
            #expect(throws: XenError.EINVAL) { try hub.close(caller: a.id, port: port) }
            #expect(throws: XenError.EINVAL) { try hub.unmask(caller: a.id, port: port) }
            #expect(throws: XenError.EINVAL) { try hub.status(caller: a.id, domain: .calling, port: port) }
            #expect(throws: XenError.EINVAL) { try hub.bindVcpu(caller: a.id, port: port, vcpu: 0) }
            #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: port) }
        }
        // Port 0 exists but is never bound: no send, close or rebinding; status says closed.
        let zero = EventPort(0)
        #expect(throws: XenError.EINVAL) { try hub.send(caller: a.id, port: zero) }
        #expect(throws: XenError.EINVAL) { try hub.close(caller: a.id, port: zero) }
        #expect(throws: XenError.EINVAL) { try hub.bindVcpu(caller: a.id, port: zero, vcpu: 0) }
        #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: zero) }
        #expect(try hub.status(caller: a.id, domain: .calling, port: zero).binding == .closed)

        // Another domain's port number means nothing in the caller's table.
        #expect(throws: XenError.EINVAL) { try hub.send(caller: a.id, port: bOnly) }
        #expect(throws: XenError.EINVAL) { try hub.close(caller: a.id, port: bOnly) }
        // A port bound to someone else cannot be taken over; nor one waiting for another domain.
        #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: bq) }
        let forB = try hub.allocUnbound(caller: b.id, in: .calling, remote: b.id)
        #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: forB) }
        try hub.close(caller: b.id, port: forB)

        // vCPUs and VIRQs.
        for vcpu: UInt32 in [2, 3, 128, 0x8000_0000, UInt32.max] {
            #expect(throws: XenError.ENOENT) { try hub.bindIPI(caller: a.id, vcpu: vcpu) }
            #expect(throws: XenError.ENOENT) { try hub.bindVcpu(caller: a.id, port: ap, vcpu: vcpu) }
            #expect(throws: XenError.ENOENT) { try hub.bindVirq(caller: a.id, virq: .debug, vcpu: vcpu) }
        }
        for virq: UInt32 in [24, 25, 255, 0x8000_0000, UInt32.max] {
            #expect(throws: XenError.EINVAL) { try hub.bindVirq(caller: a.id, virq: VirtualIRQ(virq), vcpu: 0) }
            #expect(throws: XenError.EINVAL) { try hub.raiseVirq(in: a.id, virq: VirtualIRQ(virq), vcpu: 0) }
        }
        #expect(throws: XenError.EINVAL) { try hub.bindVirq(caller: a.id, virq: .console, vcpu: 1) }
        #expect(throws: XenError.EINVAL) { try hub.send(caller: b.id, port: EventPort(2)) }  // B's VIRQ port: not sendable

        // Domains that do not exist, reserved IDs, and other domains without privilege.
        for dom: UInt16 in [3, 0x7ff1, 0x7ff2, 0x7ff4, 0x7fff, 0xffff] {
            let other = DomainID(dom)
            #expect(throws: XenError.ESRCH) { try hub.bindInterdomain(caller: a.id, remoteDomain: other, remotePort: EventPort(1)) }
            #expect(throws: XenError.ESRCH) { try hub.allocUnbound(caller: a.id, in: other, remote: .calling) }
            #expect(throws: XenError.ESRCH) { try hub.status(caller: a.id, domain: other, port: EventPort(1)) }
            #expect(throws: XenError.ESRCH) { try hub.send(caller: other, port: EventPort(1)) }
            #expect(throws: XenError.ESRCH) { try hub.raiseVirq(in: other, virq: .timer, vcpu: 0) }
        }
        #expect(throws: XenError.EPERM) { try hub.allocUnbound(caller: a.id, in: b.id, remote: a.id) }
        #expect(throws: XenError.EPERM) { try hub.status(caller: a.id, domain: b.id, port: bq) }

        // None of that changed a bit, an upcall count or a binding.
        #expect(a.eventBits() == before.0 && b.eventBits() == before.1)
        #expect(a.upcalls.all == before.2 && b.upcalls.all == before.3)
        let statusAfter = try (0..<64).map { try hub.status(caller: a.id, domain: .calling, port: EventPort(UInt32($0))) }
        #expect(statusAfter == statusBefore)
        #expect(hub.invariantViolations() == [])
    }

    /// Item 11: A is bound to B's port p. B closes p and reuses the number for a binding to C.
    /// A's sends must never reach the new binding.
    @Test func item11_closedPortIsNeverConfusedWithAReusedOne() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1)
        let b = try EventTestDomain(hub, id: 2)
        let c = try EventTestDomain(hub, id: 3)
        let p = try hub.allocUnbound(caller: b.id, in: .calling, remote: a.id)
        let ap = try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: p)
        try hub.send(caller: a.id, port: ap)
        #expect(b.events.isPending(p))

        // B closes p with A's event still pending: the bit goes with the binding.
        try hub.close(caller: b.id, port: p)
        #expect(!b.events.isPending(p))
        // B reuses p for C.
        let cPort = try hub.allocUnbound(caller: c.id, in: .calling, remote: b.id)
        #expect(try hub.bindInterdomain(caller: b.id, remoteDomain: c.id, remotePort: cPort) == p)
        _ = b.events.scanPending(vcpu: 0)  // take the new binding's initial event
        let upcalls = b.upcalls.all

        for _ in 0..<100 { try hub.send(caller: a.id, port: ap) }  // A's end is unbound now: dropped
        #expect(!b.events.isPending(p) && b.upcalls.all == upcalls)
        #expect(try hub.status(caller: a.id, domain: .calling, port: ap).binding == .unbound(remote: b.id))
        #expect(try hub.status(caller: b.id, domain: .calling, port: p).binding == .interdomain(remote: c.id, port: cPort))
        // The same with an IPI reusing the number.
        try hub.close(caller: b.id, port: p)
        #expect(try hub.bindIPI(caller: b.id, vcpu: 1) == p)
        try hub.send(caller: a.id, port: ap)
        #expect(!b.events.isPending(p))
        // And A can only reconnect to a port B offers it anew.
        #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: p) }
        #expect(hub.invariantViolations() == [])

        // Under concurrency: A sends without pause on its current port while B, again and
        // again, connects a port to A, closes it, and gives the number to C. After each close,
        // nothing A sends may land on the number's new binding.
        try hub.close(caller: b.id, port: p)
        try hub.close(caller: a.id, port: ap)
        let rounds = 500
        let current = Atomic<UInt32>(0)
        let stop = Atomic<Bool>(false)
        let reusedSamePort = Atomic<Int>(0)
        let leaks = Atomic<Int>(0)
        let ok = runThreads(2) { thread in
            if thread == 0 {
                while !stop.load(ordering: .relaxed) {
                    try? hub.send(caller: a.id, port: EventPort(current.load(ordering: .relaxed)))
                }
                return
            }
            for _ in 0..<rounds {
                let offer = try! hub.allocUnbound(caller: b.id, in: .calling, remote: a.id)
                let mine = try! hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: offer)
                current.store(mine.rawValue, ordering: .relaxed)
                for _ in 0..<20 { _ = b.events.clearPending(offer) }  // let some events land
                try! hub.close(caller: b.id, port: offer)  // A's end becomes unbound
                let fromC = try! hub.allocUnbound(caller: c.id, in: .calling, remote: b.id)
                let reused = try! hub.bindInterdomain(caller: b.id, remoteDomain: c.id, remotePort: fromC)
                if reused == offer { reusedSamePort.add(1, ordering: .relaxed) }
                _ = b.events.clearPending(reused)  // the new binding's own initial event
                for _ in 0..<50 where b.events.isPending(reused) { leaks.add(1, ordering: .relaxed) }
                try! hub.close(caller: b.id, port: reused)
                try! hub.close(caller: c.id, port: fromC)
                try! hub.close(caller: a.id, port: mine)
            }
            stop.store(true, ordering: .relaxed)
        }
        #expect(ok)
        #expect(reusedSamePort.load(ordering: .relaxed) == rounds, "the scenario reuses the closed number")
        #expect(leaks.load(ordering: .relaxed) == 0, "an event from the old binding reached the reused port")
        #expect(hub.invariantViolations() == [])
    }

    /// Item 11: threads bind, close, send, unmask, move and query ports, scan as guests, and
    /// remove and re-register a domain, all at once. No crash, no deadlock, and afterwards every
    /// binding is consistent and every channel still works.
    @Test func item11_concurrentBindCloseSendIsRaceFree() throws {
        let hub = EventChannels()
        let limit = 48
        var guests: [EventTestDomain] = []
        guests.append(try EventTestDomain(hub, id: 0, portLimit: limit, privileged: true))
        for id: UInt16 in 1...3 { guests.append(try EventTestDomain(hub, id: id, portLimit: limit)) }
        let snapshot = guests
        let ids = guests.map(\.id)
        let reRegistrations = Atomic<Int>(0)
        let operations = Atomic<Int>(0)
        let connections = Atomic<Int>(0)
        let deadline = ContinuousClock.now + .milliseconds(1500)

        let finished = runThreads(6, limit: 60) { thread in
            var rng = SeededGenerator(seed: UInt64(thread) &* 0x1234_5678_9abc)
            func anyDomain() -> DomainID { ids.randomElement(using: &rng)! }
            func anyPort() -> EventPort { EventPort(UInt32.random(in: 0..<UInt32(limit + 2), using: &rng)) }
            while ContinuousClock.now < deadline {
                switch thread {
                case 0...3:
                    let me = anyDomain()
                    for _ in 0..<64 {
                        switch Int.random(in: 0..<11, using: &rng) {
                        case 0: _ = try? hub.allocUnbound(caller: me, in: .calling, remote: anyDomain())
                        case 1:
                            if (try? hub.bindInterdomain(caller: me, remoteDomain: anyDomain(), remotePort: anyPort())) != nil {
                                connections.add(1, ordering: .relaxed)
                            }
                        case 2: _ = try? hub.bindIPI(caller: me, vcpu: UInt32.random(in: 0...2, using: &rng))
                        case 3: _ = try? hub.bindVirq(caller: me, virq: VirtualIRQ(UInt32.random(in: 0...3, using: &rng)), vcpu: UInt32.random(in: 0...1, using: &rng))
                        case 4, 5: try? hub.close(caller: me, port: anyPort())
                        case 6, 7: try? hub.send(caller: me, port: anyPort())
                        case 8: try? hub.unmask(caller: me, port: anyPort())
                        case 9: try? hub.bindVcpu(caller: me, port: anyPort(), vcpu: UInt32.random(in: 0...2, using: &rng))
                        default:
                            _ = try? hub.status(caller: me, domain: anyDomain(), port: anyPort())
                            _ = try? hub.raiseVirq(in: me, virq: VirtualIRQ(UInt32.random(in: 0...3, using: &rng)), vcpu: Int.random(in: 0...1, using: &rng))
                        }
                        operations.add(1, ordering: .relaxed)
                    }
                case 4:
                    // The guests: take events, mask and unmask.
                    for guest in snapshot {
                        _ = guest.events.scanPending(vcpu: Int.random(in: 0...1, using: &rng))
                        let port = EventPort(UInt32.random(in: 0..<UInt32(limit), using: &rng))
                        if Bool.random(using: &rng) { guest.events.mask(port) } else if guest.events.unmask(port) {
                            try? hub.unmask(caller: guest.id, port: port)
                        }
                    }
                default:
                    // Domain 3 dies and comes back with the same ID and the same memory.
                    try? hub.removeDomain(ids[3])
                    try? hub.registerDomain(
                        ids[3], vcpus: 2, sharedInfo: snapshot[3].sharedInfo, portLimit: limit,
                        owner: snapshot[3].memory, upcall: { [log = snapshot[3].upcalls] in log.record($0) })
                    reRegistrations.add(1, ordering: .relaxed)
                    Thread.sleep(forTimeInterval: 0.002)
                }
            }
        }
        #expect(finished, "threads did not finish: deadlock")
        print("item11 concurrency: \(operations.load(ordering: .relaxed)) operations, \(connections.load(ordering: .relaxed)) interdomain binds, domain 3 re-registered \(reRegistrations.load(ordering: .relaxed)) times")
        #expect(operations.load(ordering: .relaxed) > 1000 && reRegistrations.load(ordering: .relaxed) > 10)
        #expect(hub.isRegistered(ids[3]))
        #expect(hub.invariantViolations() == [])

        // Every interdomain channel left still carries events both ways.
        for guest in guests {
            for port in 1..<limit {
                let status = try hub.status(caller: ids[0], domain: guest.id, port: EventPort(UInt32(port)))
                guard case .interdomain(let remote, let remotePort) = status.binding else { continue }
                let peer = guests.first { $0.id == remote }!
                peer.events.mask(remotePort)
                _ = peer.events.clearPending(remotePort)
                try hub.send(caller: guest.id, port: EventPort(UInt32(port)))
                #expect(peer.events.isPending(remotePort))
            }
        }
    }

    /// Item 12: a hostile peer sends a million times. The receiver, which has not acknowledged,
    /// gets one upcall; its other ports still deliver; and while it acknowledges, it never gets
    /// more upcalls than acknowledgements plus one.
    @Test func item12_eventStormCoalescesUpcalls() throws {
        let hub = EventChannels()
        let hostile = try EventTestDomain(hub, id: 1)
        let victim = try EventTestDomain(hub, id: 2)
        let other = try EventTestDomain(hub, id: 3)
        let stormPort = try hub.allocUnbound(caller: victim.id, in: .calling, remote: hostile.id)
        let hostilePort = try hub.bindInterdomain(caller: hostile.id, remoteDomain: victim.id, remotePort: stormPort)
        let quietPort = try hub.allocUnbound(caller: victim.id, in: .calling, remote: other.id)
        let otherPort = try hub.bindInterdomain(caller: other.id, remoteDomain: victim.id, remotePort: quietPort)
        let farPort = EventPort(300)  // in another word of the bitmap
        for _ in 3..<300 { _ = try hub.bindIPI(caller: victim.id, vcpu: 0) }
        #expect(try hub.bindIPI(caller: victim.id, vcpu: 0) == farPort)
        #expect(victim.upcalls.count() == 0)

        let start = ContinuousClock.now
        let storm = runThreads(2) { thread in
            if thread == 0 {
                for _ in 0..<1_000_000 { try! hub.send(caller: hostile.id, port: hostilePort) }
            } else {
                // Meanwhile the well-behaved peer and the victim's own IPI ring too.
                for _ in 0..<1000 {
                    try! hub.send(caller: other.id, port: otherPort)
                    try! hub.send(caller: victim.id, port: farPort)
                }
            }
        }
        let elapsed = ContinuousClock.now - start
        #expect(storm)
        #expect(victim.upcalls.count() == 1, "a storm without acknowledgement makes one upcall")
        #expect(victim.events.scanPending(vcpu: 0) == [stormPort, quietPort, farPort])
        print("item12: 1,000,000 sends + 2,000 others in \(elapsed), \(victim.upcalls.count()) upcall")

        // Now the victim acknowledges as fast as it can while the storm goes on.
        let acknowledgements = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let upcallsBefore = victim.upcalls.count()
        let acked = runThreads(2) { thread in
            if thread == 0 {
                for _ in 0..<200_000 { try! hub.send(caller: hostile.id, port: hostilePort) }
                stop.store(true, ordering: .sequentiallyConsistent)
            } else {
                while !stop.load(ordering: .sequentiallyConsistent) {
                    if victim.events.upcallPending(vcpu: 0) {
                        acknowledgements.add(1, ordering: .sequentiallyConsistent)
                        _ = victim.events.scanPending(vcpu: 0)
                    }
                }
            }
        }
        #expect(acked)
        let upcalls = victim.upcalls.count() - upcallsBefore
        #expect(upcalls <= acknowledgements.load(ordering: .sequentiallyConsistent) + 1)
        #expect(hub.invariantViolations() == [])
    }

    /// Item 11 and the reuse of domain IDs: a dead domain's ports, VIRQ bindings, pending bits
    /// and vcpu_info placement never reach a later domain with the same ID.
    @Test func reusedDomainIDStartsClean() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1)
        let memory = try GuestMemory(ramBytes: 64 * 1024, specialFrames: 1)
        let upcalls: [Int]
        do {
            let b = try EventTestDomain(hub, id: 2, memory: memory)
            // B: a channel to A with events both ways, a timer VIRQ, a pending IPI, a moved vcpu_info.
            let ap = try hub.allocUnbound(caller: a.id, in: .calling, remote: b.id)
            _ = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: ap)
            try hub.send(caller: a.id, port: ap)
            _ = try hub.bindVirq(caller: b.id, virq: .timer, vcpu: 0)
            try hub.raiseVirq(in: b.id, virq: .timer, vcpu: 0)
            let ipi = try hub.bindIPI(caller: b.id, vcpu: 1)
            b.events.mask(ipi)
            try hub.send(caller: b.id, port: ipi)
            try hub.registerVcpuInfo(domain: b.id, vcpu: 1, region: try memory.translate(GuestPhysicalAddress(0x1000), count: 64))
            upcalls = b.upcalls.all

            try hub.removeDomain(b.id)
            // A's end waits for domain 2 again, as Xen leaves it; sending on it goes nowhere.
            #expect(try hub.status(caller: a.id, domain: .calling, port: ap).binding == .unbound(remote: b.id))
            try hub.send(caller: a.id, port: ap)
            #expect(throws: XenError.ESRCH) { try hub.send(caller: b.id, port: ipi) }
            #expect(b.upcalls.all == upcalls)
            // The removed domain's closes cleared its pending bits.
            for port in 1..<8 { #expect(!b.events.isPending(EventPort(UInt32(port)))) }
        }
        do {
            // A different memory object for the new domain 2: the old one is released.
            let fresh = try EventTestDomain(hub, id: 2)
            #expect(fresh.eventBits().allSatisfy { $0 == 0 })
            #expect(try (0..<64).allSatisfy { try hub.status(caller: fresh.id, domain: .calling, port: EventPort(UInt32($0))).binding == .closed })
            _ = try hub.bindVirq(caller: fresh.id, virq: .timer, vcpu: 0)  // not EEXIST
            try hub.registerVcpuInfo(domain: fresh.id, vcpu: 1, region: try fresh.memory.translate(GuestPhysicalAddress(0x1000), count: 64))
            try hub.removeDomain(fresh.id)
        }
        // The same memory again, with the old domain's selector and upcall bits still in it.
        let again = try EventTestDomain(hub, id: 2, memory: memory)
        #expect(again.eventBits().allSatisfy { $0 == 0 }, "registration clears stale event state")
        #expect(again.upcalls.total == 0)
        let newPort = try hub.allocUnbound(caller: again.id, in: .calling, remote: a.id)
        #expect(newPort == EventPort(1))
        // A's old end (still waiting for "domain 2") does not reach the new domain's ports.
        try hub.send(caller: a.id, port: EventPort(1))
        #expect(!again.events.isPending(newPort) && again.upcalls.total == 0)
        #expect(hub.invariantViolations() == [])
        try hub.removeDomain(again.id)
    }

    /// The owner a domain registers with lives exactly as long as the registration.
    @Test func ownerIsKeptAliveWhileRegistered() throws {
        final class Owner: Sendable {
            let memory: GuestMemory
            init() throws { memory = try GuestMemory(ramBytes: 4096, specialFrames: 1) }
        }
        let hub = EventChannels()
        weak var weakOwner: Owner?
        do {
            let owner = try Owner()
            weakOwner = owner
            try hub.registerDomain(DomainID(9), vcpus: 1, sharedInfo: try owner.memory.specialRegion(0), owner: owner, upcall: { _ in })
        }
        #expect(weakOwner != nil)
        try hub.removeDomain(DomainID(9))
        #expect(weakOwner == nil)

        // Connected domains still registered when the hub goes away are released with it.
        weak var weakMemory: GuestMemory?
        do {
            let hub = EventChannels()
            let a = try EventTestDomain(hub, id: 1)
            let b = try EventTestDomain(hub, id: 2)
            let p = try hub.allocUnbound(caller: a.id, in: .calling, remote: b.id)
            _ = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: p)
            weakMemory = a.memory
        }
        #expect(weakMemory == nil)
    }
}
