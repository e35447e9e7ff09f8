import Foundation
import Synchronization
import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

/// Each event channel operation on real shared_info pages: results, status, the 2-level bits
/// and the upcalls they cause.
@Suite struct EventChannelTests {
    @Test func layoutMatchesTheHeaders() {
        #expect(TwoLevelLayout.portCount == Int(VIREO_EVTCHN_2L_NR_CHANNELS))
        #expect(TwoLevelLayout.sharedInfoSize == MemoryLayout<vireo_shared_info>.size)
        #expect(TwoLevelLayout.pendingOffset == MemoryLayout<vireo_shared_info>.offset(of: \.evtchn_pending))
        #expect(TwoLevelLayout.maskOffset == MemoryLayout<vireo_shared_info>.offset(of: \.evtchn_mask))
        #expect(TwoLevelLayout.maskOffset == TwoLevelLayout.pendingOffset + TwoLevelLayout.bitmapBytes)
        #expect(TwoLevelLayout.bitmapBytes == TwoLevelLayout.portCount / 8)
        #expect(TwoLevelLayout.vcpuInfoSize == MemoryLayout<vireo_vcpu_info>.size)
        #expect(TwoLevelLayout.upcallPendingOffset == MemoryLayout<vireo_vcpu_info>.offset(of: \.evtchn_upcall_pending))
        #expect(TwoLevelLayout.upcallMaskOffset == MemoryLayout<vireo_vcpu_info>.offset(of: \.evtchn_upcall_mask))
        #expect(TwoLevelLayout.pendingSelOffset == MemoryLayout<vireo_vcpu_info>.offset(of: \.evtchn_pending_sel))
        #expect(TwoLevelLayout.legacyVcpuSlots * TwoLevelLayout.vcpuInfoSize
            == MemoryLayout<vireo_shared_info>.offset(of: \.evtchn_pending))
        #expect(VirtualIRQ.count == 24)
        #expect([VirtualIRQ.timer, .debug, .xenoprof, .xenpmu].allSatisfy { $0.isPerVcpu })
        #expect(!VirtualIRQ.console.isPerVcpu && !VirtualIRQ(16).isPerVcpu)
    }

    @Test func interdomainChannelConnectsSendsAndCloses() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1)
        let b = try EventTestDomain(hub, id: 2)

        let p = try hub.allocUnbound(caller: a.id, in: .calling, remote: b.id)
        #expect(p == EventPort(1))  // the lowest port; 0 is never handed out
        #expect(try hub.status(caller: a.id, domain: .calling, port: p) == .init(binding: .unbound(remote: b.id), vcpu: 0))

        let q = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: p)
        #expect(q == EventPort(1))
        #expect(try hub.status(caller: a.id, domain: a.id, port: p) == .init(binding: .interdomain(remote: b.id, port: q), vcpu: 0))
        #expect(try hub.status(caller: b.id, domain: .calling, port: q) == .init(binding: .interdomain(remote: a.id, port: p), vcpu: 0))
        // The new end starts pending (an event sent before the connection is not lost).
        #expect(b.events.isPending(q))
        #expect(b.upcalls.count(0) == 1)
        #expect(b.events.scanPending(vcpu: 0) == [q])

        // A rings B: pending bit, selector bit, upcall flag, one upcall.
        try hub.send(caller: a.id, port: p)
        #expect(b.events.isPending(q) && b.events.upcallPending(vcpu: 0))
        #expect(b.sharedInfo.loadAcquire64(at: TwoLevelLayout.pendingSelOffset) == 1)
        #expect(b.upcalls.count(0) == 2)
        try hub.send(caller: a.id, port: p)  // not yet consumed: no second upcall
        #expect(b.upcalls.count(0) == 2)
        #expect(b.events.scanPending(vcpu: 0) == [q])
        #expect(!b.events.upcallPending(vcpu: 0) && !b.events.isPending(q))

        // B rings A.
        try hub.send(caller: b.id, port: q)
        #expect(a.events.isPending(p) && a.upcalls.count(0) == 1)

        // B moves its end to vCPU 1: events now arrive there.
        try hub.bindVcpu(caller: b.id, port: q, vcpu: 1)
        try hub.send(caller: a.id, port: p)
        #expect(b.upcalls.all == [2, 1])
        #expect(b.events.scanPending(vcpu: 0) == [])
        #expect(b.events.scanPending(vcpu: 1) == [q])

        // B closes: A's end waits for B again, sends on it are dropped.
        try hub.close(caller: b.id, port: q)
        #expect(try hub.status(caller: b.id, domain: .calling, port: q) == .init(binding: .closed, vcpu: 0))
        #expect(try hub.status(caller: a.id, domain: .calling, port: p) == .init(binding: .unbound(remote: b.id), vcpu: 0))
        try hub.send(caller: a.id, port: p)
        #expect(!b.events.isPending(q) && b.upcalls.all == [2, 1])
        // ... and B can connect again.
        let q2 = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: p)
        #expect(try hub.status(caller: a.id, domain: .calling, port: p) == .init(binding: .interdomain(remote: b.id, port: q2), vcpu: 0))
        #expect(hub.invariantViolations() == [])
    }

    @Test func loopbackChannelWithDomidSelf() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 5)
        let p = try hub.allocUnbound(caller: a.id, in: .calling, remote: .calling)
        #expect(try hub.status(caller: a.id, domain: .calling, port: p).binding == .unbound(remote: a.id))
        let q = try hub.bindInterdomain(caller: a.id, remoteDomain: .calling, remotePort: p)
        #expect(q != p)
        #expect(try hub.status(caller: a.id, domain: .calling, port: q).binding == .interdomain(remote: a.id, port: p))
        #expect(a.events.scanPending(vcpu: 0) == [q])
        try hub.send(caller: a.id, port: p)
        #expect(a.events.scanPending(vcpu: 0) == [q])
        try hub.send(caller: a.id, port: q)
        #expect(a.events.scanPending(vcpu: 0) == [p])
        try hub.close(caller: a.id, port: p)
        #expect(try hub.status(caller: a.id, domain: .calling, port: q).binding == .unbound(remote: a.id))
        #expect(hub.invariantViolations() == [])
    }

    @Test func virqsBindPerVcpuOrGlobally() throws {
        let hub = EventChannels()
        let g = try EventTestDomain(hub, id: 3)

        let timer1 = try hub.bindVirq(caller: g.id, virq: .timer, vcpu: 1)
        #expect(try hub.status(caller: g.id, domain: .calling, port: timer1) == .init(binding: .virq(.timer), vcpu: 1))
        #expect(throws: XenError.EEXIST) { try hub.bindVirq(caller: g.id, virq: .timer, vcpu: 1) }
        let timer0 = try hub.bindVirq(caller: g.id, virq: .timer, vcpu: 0)  // per-vCPU: one on each
        #expect(timer0 != timer1)

        #expect(try hub.raiseVirq(in: g.id, virq: .timer, vcpu: 1))
        #expect(g.upcalls.all == [0, 1])
        #expect(g.events.scanPending(vcpu: 1) == [timer1])
        #expect(throws: XenError.EINVAL) { try hub.raiseVirq(in: g.id, virq: .timer, vcpu: nil) }
        #expect(throws: XenError.ENOENT) { try hub.raiseVirq(in: g.id, virq: .timer, vcpu: 2) }

        // A global VIRQ is bound on vCPU 0, once, and can be moved.
        #expect(throws: XenError.EINVAL) { try hub.bindVirq(caller: g.id, virq: .console, vcpu: 1) }
        let console = try hub.bindVirq(caller: g.id, virq: .console, vcpu: 0)
        #expect(throws: XenError.EEXIST) { try hub.bindVirq(caller: g.id, virq: .console, vcpu: 0) }
        try hub.bindVcpu(caller: g.id, port: console, vcpu: 1)
        #expect(try hub.status(caller: g.id, domain: .calling, port: console) == .init(binding: .virq(.console), vcpu: 1))
        #expect(try hub.raiseVirq(in: g.id, virq: .console, vcpu: nil))
        #expect(g.events.scanPending(vcpu: 1) == [console])
        // A per-vCPU VIRQ stays where it was bound.
        #expect(throws: XenError.EINVAL) { try hub.bindVcpu(caller: g.id, port: timer1, vcpu: 0) }

        // Unbound VIRQs are dropped; closing frees the VIRQ for a new binding.
        #expect(try !hub.raiseVirq(in: g.id, virq: .debug, vcpu: 0))
        try hub.close(caller: g.id, port: timer1)
        #expect(try !hub.raiseVirq(in: g.id, virq: .timer, vcpu: 1))
        _ = try hub.bindVirq(caller: g.id, virq: .timer, vcpu: 1)
        #expect(hub.invariantViolations() == [])
    }

    @Test func ipiPortsNotifyTheirVcpu() throws {
        let hub = EventChannels()
        let g = try EventTestDomain(hub, id: 4)
        let ipi = try hub.bindIPI(caller: g.id, vcpu: 1)
        #expect(try hub.status(caller: g.id, domain: .calling, port: ipi) == .init(binding: .ipi, vcpu: 1))
        try hub.send(caller: g.id, port: ipi)
        #expect(g.upcalls.all == [0, 1])
        #expect(g.events.scanPending(vcpu: 1) == [ipi])
        #expect(throws: XenError.EINVAL) { try hub.bindVcpu(caller: g.id, port: ipi, vcpu: 0) }
        #expect(throws: XenError.ENOENT) { try hub.bindIPI(caller: g.id, vcpu: 2) }
    }

    @Test func maskedPortsStayPendingUntilUnmasked() throws {
        let hub = EventChannels()
        let g = try EventTestDomain(hub, id: 1)
        let ipi = try hub.bindIPI(caller: g.id, vcpu: 0)
        g.events.mask(ipi)
        try hub.send(caller: g.id, port: ipi)
        // Pending, but no selector bit and no upcall while masked.
        #expect(g.events.isPending(ipi) && g.upcalls.count() == 0)
        #expect(g.sharedInfo.loadAcquire64(at: TwoLevelLayout.pendingSelOffset) == 0)
        #expect(g.events.scanPending(vcpu: 0) == [])

        // The guest unmasks, sees it pending, re-masks and asks the host, which raises the upcall.
        var asked: [EventPort] = []
        g.events.unmask(ipi) { asked.append($0) }
        #expect(asked == [ipi] && g.events.isMasked(ipi))
        try hub.unmask(caller: g.id, port: ipi)
        #expect(!g.events.isMasked(ipi) && g.upcalls.count() == 1)
        #expect(g.events.scanPending(vcpu: 0) == [ipi])

        // Xen's rule: the host re-raises only when it clears the mask bit itself.
        try hub.send(caller: g.id, port: ipi)
        _ = g.events.scanPending(vcpu: 0)
        g.events.mask(ipi)
        try hub.send(caller: g.id, port: ipi)
        #expect(!g.events.unmask(EventPort(9)))  // not pending: nothing to ask
        try hub.unmask(caller: g.id, port: EventPort(9))
        let before = g.upcalls.count()
        _ = g.events.unmask(ipi)  // re-masks because pending
        try hub.unmask(caller: g.id, port: ipi)
        #expect(g.upcalls.count() == before + 1)
        try hub.unmask(caller: g.id, port: ipi)  // already unmasked: no second upcall
        #expect(g.upcalls.count() == before + 1)
    }

    @Test func scanReportsPortsInOrderAndSkipsMasked() throws {
        let hub = EventChannels()
        let g = try EventTestDomain(hub, id: 1, vcpus: 1)
        let ports = try (0..<200).map { _ in try hub.bindIPI(caller: g.id, vcpu: 0) }
        #expect(ports.first == EventPort(1) && ports.last == EventPort(200))
        for port in ports.reversed() where port.rawValue % 3 == 0 { try hub.send(caller: g.id, port: port) }
        g.events.mask(EventPort(66))
        #expect(g.upcalls.count() == 1)
        let expected = ports.filter { $0.rawValue % 3 == 0 && $0 != EventPort(66) }
        #expect(g.events.scanPending(vcpu: 0) == expected)
        #expect(g.events.isPending(EventPort(66)))  // still there, masked
        #expect(g.events.scanPending(vcpu: 0) == [])
    }

    @Test func portLimitIsEnforcedAndPort0NeverHandedOut() throws {
        let hub = EventChannels()
        let g = try EventTestDomain(hub, id: 1, portLimit: 8)
        var ports: [EventPort] = []
        for _ in 0..<7 { ports.append(try hub.bindIPI(caller: g.id, vcpu: 0)) }
        #expect(ports == (1...7).map { EventPort(UInt32($0)) })
        #expect(throws: XenError.ENOSPC) { try hub.bindIPI(caller: g.id, vcpu: 0) }
        #expect(throws: XenError.ENOSPC) { try hub.allocUnbound(caller: g.id, in: .calling, remote: .calling) }
        #expect(throws: XenError.ENOSPC) { try hub.bindVirq(caller: g.id, virq: .timer, vcpu: 0) }
        try hub.close(caller: g.id, port: EventPort(3))
        #expect(try hub.bindIPI(caller: g.id, vcpu: 0) == EventPort(3))  // the lowest free one again
        #expect(throws: XenError.EINVAL) { try hub.status(caller: g.id, domain: .calling, port: EventPort(8)) }
        #expect(try hub.status(caller: g.id, domain: .calling, port: EventPort(0)).binding == .closed)

        // The default limit is 1024; all 1023 usable ports can be taken, never port 0.
        let big = try EventTestDomain(hub, id: 2, vcpus: 1)
        var seen = Set<EventPort>()
        for _ in 1..<EventChannels.defaultPortLimit { seen.insert(try hub.bindIPI(caller: big.id, vcpu: 0)) }
        #expect(seen.count == 1023 && !seen.contains(EventPort(0)))
        #expect(throws: XenError.ENOSPC) { try hub.bindIPI(caller: big.id, vcpu: 0) }
    }

    @Test func onlyPrivilegedCallersReachOtherDomains() throws {
        let hub = EventChannels()
        let dom0 = try EventTestDomain(hub, id: 0, privileged: true)
        let a = try EventTestDomain(hub, id: 1)
        let b = try EventTestDomain(hub, id: 2)
        #expect(throws: XenError.EPERM) { try hub.allocUnbound(caller: a.id, in: b.id, remote: a.id) }
        let p = try hub.allocUnbound(caller: b.id, in: .calling, remote: a.id)
        #expect(throws: XenError.EPERM) { try hub.status(caller: a.id, domain: b.id, port: p) }
        #expect(throws: XenError.ESRCH) { try hub.status(caller: a.id, domain: DomainID(9), port: p) }

        // The control domain allocates a port in a guest for another guest, and inspects it.
        let q = try hub.allocUnbound(caller: dom0.id, in: a.id, remote: b.id)
        #expect(try hub.status(caller: dom0.id, domain: a.id, port: q).binding == .unbound(remote: b.id))
        let r = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: q)
        #expect(try hub.status(caller: dom0.id, domain: b.id, port: r).binding == .interdomain(remote: a.id, port: q))
        // DOMID_SELF in remote means the caller, even when allocating in another domain.
        let s = try hub.allocUnbound(caller: dom0.id, in: b.id, remote: .calling)
        #expect(try hub.status(caller: dom0.id, domain: b.id, port: s).binding == .unbound(remote: dom0.id))
        // Only the domain a port waits for can bind it.
        #expect(throws: XenError.EINVAL) { try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: s) }
    }

    @Test func statusRecordMirrorsTheABI() {
        let status = EventChannelStatus(binding: .interdomain(remote: DomainID(7), port: EventPort(42)), vcpu: 3)
        let record = status.record(dom: .calling, port: EventPort(5))
        #expect(record.dom == VIREO_DOMID_SELF && record.port == 5)
        #expect(record.status == VIREO_EVTCHNSTAT_interdomain && record.vcpu == 3)
        #expect(record.u.interdomain.dom == 7 && record.u.interdomain.port == 42)
        let virq = EventChannelStatus(binding: .virq(.console), vcpu: 0).record(dom: DomainID(1), port: EventPort(2))
        #expect(virq.status == VIREO_EVTCHNSTAT_virq && virq.u.virq == UInt32(VIREO_VIRQ_CONSOLE))
        #expect(virq.u.interdomain.port == 0)  // the rest of the union is zero, not stale bytes
        #expect(EventChannelStatus(binding: .closed, vcpu: 0).status == VIREO_EVTCHNSTAT_closed)
        #expect(EventChannelStatus(binding: .ipi, vcpu: 0).status == VIREO_EVTCHNSTAT_ipi)
        #expect(EventChannelStatus(binding: .unbound(remote: .zero), vcpu: 0).status == VIREO_EVTCHNSTAT_unbound)
    }

    @Test func registrationIsValidated() throws {
        let hub = EventChannels()
        let memory = try GuestMemory(ramBytes: 64 * 1024, specialFrames: 1)
        let page = try memory.specialRegion(0)
        func register(_ id: DomainID = DomainID(1), vcpus: Int = 1, region: SharedRegion? = nil, limit: Int = 64) throws(XenError) {
            try hub.registerDomain(id, vcpus: vcpus, sharedInfo: region ?? page, portLimit: limit, owner: memory, upcall: { _ in })
        }
        #expect(throws: XenError.EINVAL) { try register(.calling) }
        #expect(throws: XenError.EINVAL) { try register(DomainID(0xffff)) }
        #expect(throws: XenError.EINVAL) { try register(vcpus: 0) }
        #expect(throws: XenError.EINVAL) { try register(vcpus: EventChannels.maxVcpus + 1) }
        #expect(throws: XenError.EINVAL) { try register(limit: 0) }
        #expect(throws: XenError.EINVAL) { try register(limit: 4097) }
        #expect(throws: XenError.EINVAL) { try register(region: page.slice(offset: 0, count: 3000)) }
        #expect(throws: XenError.EINVAL) { try register(region: page.slice(offset: 4, count: 3200)) }
        try register(limit: 4096)
        #expect(throws: XenError.EEXIST) { try register() }
        #expect(hub.isRegistered(DomainID(1)))
        try hub.removeDomain(DomainID(1))
        #expect(!hub.isRegistered(DomainID(1)))
        #expect(throws: XenError.ESRCH) { try hub.removeDomain(DomainID(1)) }
    }

    @Test func registeringVcpuInfoMovesTheRecordAndLosesNothing() throws {
        let hub = EventChannels()
        var g = try EventTestDomain(hub, id: 1, vcpus: 34)
        let ipi1 = try hub.bindIPI(caller: g.id, vcpu: 1)
        try hub.send(caller: g.id, port: ipi1)
        #expect(g.upcalls.count(1) == 1)

        // vCPU 1 moves its vcpu_info to RAM: the record is copied, every selector bit and the
        // upcall flag are set (the flag was set already, so no second upcall).
        let moved = try g.memory.translate(GuestPhysicalAddress(0x3040), count: 64)
        try hub.registerVcpuInfo(domain: g.id, vcpu: 1, region: moved)
        #expect(moved.loadAcquire64(at: TwoLevelLayout.pendingSelOffset) == ~0)
        #expect(moved.loadAcquire8(at: TwoLevelLayout.upcallPendingOffset) == 1)
        #expect(g.upcalls.count(1) == 1)
        g.events.useVcpuInfo(moved, forVcpu: 1)
        #expect(g.events.scanPending(vcpu: 1) == [ipi1])
        try hub.send(caller: g.id, port: ipi1)
        #expect(g.upcalls.count(1) == 2 && moved.loadAcquire64(at: TwoLevelLayout.pendingSelOffset) == 1)
        #expect(g.events.scanPending(vcpu: 1) == [ipi1])
        #expect(throws: XenError.EINVAL) { try hub.registerVcpuInfo(domain: g.id, vcpu: 1, region: moved) }

        // vCPU 33 has no slot in shared_info: its events stay pending until it registers one.
        let ipi33 = try hub.bindIPI(caller: g.id, vcpu: 33)
        try hub.send(caller: g.id, port: ipi33)
        #expect(g.events.isPending(ipi33) && g.upcalls.count(33) == 0)
        let record33 = try g.memory.translate(GuestPhysicalAddress(0x3080), count: 64)
        try hub.registerVcpuInfo(domain: g.id, vcpu: 33, region: record33)
        #expect(g.upcalls.count(33) == 1)
        g.events.useVcpuInfo(record33, forVcpu: 33)
        #expect(g.events.scanPending(vcpu: 33) == [ipi33])

        #expect(throws: XenError.ENOENT) { try hub.registerVcpuInfo(domain: g.id, vcpu: 34, region: record33) }
        #expect(throws: XenError.ENOENT) { try hub.registerVcpuInfo(domain: g.id, vcpu: -1, region: record33) }
        let odd = try g.memory.translate(GuestPhysicalAddress(0x3104), count: 64)
        #expect(throws: XenError.EINVAL) { try hub.registerVcpuInfo(domain: g.id, vcpu: 2, region: odd) }
        #expect(throws: XenError.EINVAL) { try hub.registerVcpuInfo(domain: g.id, vcpu: 2, region: odd.slice(offset: 4, count: 32)) }
        #expect(throws: XenError.ESRCH) { try hub.registerVcpuInfo(domain: DomainID(8), vcpu: 0, region: record33) }
    }

    /// Each domain's counters: a send counts as sent by the caller and received by the domain
    /// whose port it marks; an IPI is both for the one domain; a send on an unbound port is sent
    /// only; a refused send counts nowhere; the counts outlive the domain's removal.
    @Test func sendsAreCountedByAndToEachDomain() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1)
        let b = try EventTestDomain(hub, id: 2)
        let p = try hub.allocUnbound(caller: a.id, in: .calling, remote: b.id)
        try hub.send(caller: a.id, port: p)  // unbound: sent, reaches no one
        let q = try hub.bindInterdomain(caller: b.id, remoteDomain: a.id, remotePort: p)
        for _ in 0..<3 { try hub.send(caller: a.id, port: p) }
        try hub.send(caller: b.id, port: q)
        let ipi = try hub.bindIPI(caller: b.id, vcpu: 0)
        try hub.send(caller: b.id, port: ipi)
        #expect(throws: XenError.EINVAL) { try hub.send(caller: a.id, port: EventPort(900)) }
        let ca = try #require(hub.counters(of: a.id)), cb = try #require(hub.counters(of: b.id))
        #expect(ca.sent.load(ordering: .relaxed) == 4 && ca.received.load(ordering: .relaxed) == 1)
        #expect(cb.sent.load(ordering: .relaxed) == 2 && cb.received.load(ordering: .relaxed) == 4)
        try hub.removeDomain(b.id)
        #expect(hub.counters(of: b.id) == nil)
        #expect(cb.received.load(ordering: .relaxed) == 4, "the object keeps the final counts")
    }
}

/// SCHEDOP_poll's wake-ups (Xen's evtchn_check_pollers): a vCPU marked as polling is woken by
/// any of its domain's ports becoming pending, masked or not, and by nothing once unmarked.
@Suite struct EventChannelPollTests {
    @Test func aPollingVCPUWakesForAMaskedPortAndAnUpcallAlreadyRaised() throws {
        let hub = EventChannels()
        let a = try EventTestDomain(hub, id: 1)
        let b = try EventTestDomain(hub, id: 2)
        let p = try hub.allocUnbound(caller: b.id, in: .calling, remote: a.id)
        let q = try hub.bindInterdomain(caller: a.id, remoteDomain: b.id, remotePort: p)

        // Not polling, masked: the event stays pending and nobody is called.
        b.events.mask(p)
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.total == 0)
        #expect(b.events.isPending(p))

        // Polling vCPU 1, masked: the poller is called although no upcall is raised.
        #expect(b.events.clearPending(p))
        hub.setPolling(b.id, vcpu: 1, true)
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [0, 1])
        // Already pending: nothing new to look at, no call (as Xen returns early).
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [0, 1])

        // Unmasked while pending: EVTCHNOP_unmask raises vCPU 0's upcall. Its flag stays up,
        // so later events make no 0->1 change and call no upcall; the poller is still woken by each.
        b.events.unmask(p) { try? hub.unmask(caller: b.id, port: $0) }
        #expect(b.events.upcallPending(vcpu: 0))
        #expect(b.upcalls.all == [1, 1])
        #expect(b.events.clearPending(p))
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [1, 2])
        #expect(b.events.clearPending(p))
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [1, 3])

        // No longer polling: a new event calls nobody (the flag is still up).
        hub.setPolling(b.id, vcpu: 1, false)
        #expect(b.events.clearPending(p))
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [1, 3])
        #expect(b.events.isPending(p))

        // The flag down again: an event raises vCPU 0's upcall, and a poller beside it is called too.
        hub.setPolling(b.id, vcpu: 1, true)
        #expect(b.events.scanPending(vcpu: 0) == [p])  // acknowledges and takes the event
        #expect(!b.events.upcallPending(vcpu: 0))
        try hub.send(caller: a.id, port: q)
        #expect(b.upcalls.all == [2, 4])
    }
}
