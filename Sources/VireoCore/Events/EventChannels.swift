import Synchronization
import VireoABI

/// The hypervisor's event channels: every domain's port table, and the 2-level ABI bits in
/// each domain's shared_info (`vireo/event_channel.h`).
///
/// Operations take the calling domain's ID and the guest's raw arguments, validate every one
/// and throw Xen's errno for what Xen refuses. Each domain has its own lock; an operation that
/// touches two domains takes both in domain-ID order. Upcall hooks run after every lock is
/// released, and only when a vCPU's `evtchn_upcall_pending` goes from 0 to 1, so however many
/// events arrive, a vCPU gets at most one upcall per acknowledgement.
///
/// See Docs/shared-memory.md, "Event channels".
public final class EventChannels: Sendable {
    /// Ports per domain unless registration says otherwise.
    public static let defaultPortLimit = 1024
    /// The 2-level ABI's bound on ports (`VIREO_EVTCHN_2L_NR_CHANNELS`); no limit exceeds it.
    public static let maxPortLimit = TwoLevelLayout.portCount
    /// vCPUs per domain (Xen's limit for HVM guests).
    public static let maxVcpus = 128

    private let registry = Mutex<[DomainID: EventDomain]>([:])

    public init() {}

    /// Interdomain bindings point at each other's domains; removing every domain breaks those
    /// cycles so their owners (guest memory) are released with the hub.
    deinit {
        for id in registry.withLock({ Array($0.keys) }) { try? removeDomain(id) }
    }

    // MARK: Domains

    /// Registers a domain's event channel state.
    ///
    /// - Parameters:
    ///   - id: an ordinary domain ID, not registered already (EEXIST).
    ///   - vcpus: 1...``maxVcpus``.
    ///   - sharedInfo: the domain's shared_info page (`GuestMemory.specialRegion`), 8-byte
    ///     aligned and at least `sizeof(shared_info)`. Its event fields (pending and mask
    ///     bitmaps, each vcpu_info's selector and upcall flag) are cleared: a new domain starts
    ///     with nothing pending, whatever the memory held before.
    ///   - portLimit: ports 0..<portLimit exist (port 0 is never handed out); 1...4096.
    ///   - privileged: may allocate ports in, and query, other domains (Xen's control domain).
    ///   - owner: kept alive while the domain is registered (and while an operation in flight
    ///     still uses it): the memory behind `sharedInfo` and any registered vcpu_info.
    ///   - upcall: called with a vCPU index when that vCPU's `evtchn_upcall_pending` goes
    ///     from 0 to 1; the engine wakes or interrupts the vCPU. Called with no lock held, on
    ///     the thread of whichever operation raised the event; it must not block for long.
    /// - Throws: EINVAL for a bad argument, EEXIST when the ID is taken.
    public func registerDomain(
        _ id: DomainID, vcpus: Int, sharedInfo: SharedRegion, portLimit: Int = defaultPortLimit,
        privileged: Bool = false, owner: any AnyObject & Sendable,
        upcall: @escaping @Sendable (_ vcpu: Int) -> Void
    ) throws(XenError) {
        guard id.isOrdinary, (1...Self.maxVcpus).contains(vcpus), (1...Self.maxPortLimit).contains(portLimit),
              sharedInfo.count >= TwoLevelLayout.sharedInfoSize, Int(bitPattern: sharedInfo.base) % 8 == 0
        else { throw .EINVAL }
        let domain = EventDomain(
            id: id, vcpuCount: vcpus, portLimit: portLimit, privileged: privileged,
            sharedInfo: sharedInfo, owner: owner, upcall: upcall)
        try registry.withLock { (domains: inout [DomainID: EventDomain]) throws(XenError) in
            guard domains[id] == nil else { throw .EEXIST }
            // Cleared under the registry lock, before anyone can find the domain.
            sharedInfo.fill(0, at: TwoLevelLayout.pendingOffset, count: 2 * TwoLevelLayout.bitmapBytes)  // pending, then mask
            for vcpu in 0..<min(vcpus, TwoLevelLayout.legacyVcpuSlots) {
                let slot = vcpu * TwoLevelLayout.vcpuInfoSize
                sharedInfo.storeRelease64(0, at: slot + TwoLevelLayout.pendingSelOffset)
                sharedInfo.storeRelease8(0, at: slot + TwoLevelLayout.upcallPendingOffset)
            }
            domains[id] = domain
        }
    }

    /// Removes a domain: closes every port (the far end of each interdomain channel becomes
    /// unbound, waiting for `id`, as Xen leaves it) and forgets the domain, so a later domain
    /// with the same ID starts with no ports and no pending state. An upcall raised just before
    /// the removal may still reach the hook after this returns.
    /// - Throws: ESRCH when no such domain is registered.
    public func removeDomain(_ id: DomainID) throws(XenError) {
        let domain = try registry.withLock { (domains: inout [DomainID: EventDomain]) throws(XenError) -> EventDomain in
            guard let domain = domains.removeValue(forKey: id) else { throw .ESRCH }
            return domain
        }
        // Dead first: from here no operation allocates or binds in this domain.
        let top = domain.state.withLock { (s: inout EventDomain.State) -> Int in
            s.dead = true
            return s.channels.count
        }
        for port in 1..<max(top, 1) {
            try? closePort(domain, port, allowDead: true)  // free ports refuse (EINVAL): nothing to do
        }
        domain.state.withLock { (s: inout EventDomain.State) in
            s.channels = [EventDomain.Channel(binding: .reserved, vcpu: 0)]
            s.virqPorts = Array(repeating: 0, count: s.virqPorts.count)
        }
    }

    /// The event counters of a registered domain (nil when it is not): sends it made and sends
    /// that reached it. The object outlives the domain's removal, so whoever holds it reads
    /// the final counts after the domain is gone.
    public func counters(of id: DomainID) -> EventCounters? {
        registry.withLock { $0[id]?.counters }
    }

    /// Whether `id` is registered.
    public func isRegistered(_ id: DomainID) -> Bool {
        registry.withLock { $0[id] != nil }
    }

    /// Moves `vcpu`'s vcpu_info to `region` (`VCPUOP_register_vcpu_info`, after the dispatcher
    /// has checked and translated the guest's frame and offset). The region must be memory the
    /// domain's owner keeps alive. As in Xen, the current record is copied over and every
    /// selector bit and the upcall flag are set so no event is lost (one upcall may find nothing).
    /// - Throws: ESRCH (no such domain), ENOENT (no such vCPU), EINVAL (region under 64 bytes
    ///   or not 8-byte aligned, or the vCPU already moved its vcpu_info).
    public func registerVcpuInfo(domain id: DomainID, vcpu: Int, region: SharedRegion) throws(XenError) {
        let domain = try lookup(id)
        guard vcpu >= 0, vcpu < domain.vcpuCount else { throw .ENOENT }
        guard region.count >= TwoLevelLayout.vcpuInfoSize, Int(bitPattern: region.base) % 8 == 0 else { throw .EINVAL }
        let record = region.slice(offset: 0, count: TwoLevelLayout.vcpuInfoSize)
        let upcall = try domain.state.withLock { (s: inout EventDomain.State) throws(XenError) -> Upcall? in
            guard !s.dead else { throw .ESRCH }
            guard !s.vcpuInfoMoved[vcpu] else { throw .EINVAL }
            return domain.moveVcpuInfo(vcpu, to: record, &s)
        }
        upcall?.fire()
    }

    // MARK: EVTCHNOP_* (caller = the domain making the hypercall)

    /// EVTCHNOP_alloc_unbound: a new port in `dom`, waiting for `remote` to bind to it.
    /// `dom` and `remote` may be `DomainID.calling` (the caller); only a privileged caller may
    /// name another `dom`. The new port notifies vCPU 0.
    /// - Throws: ESRCH (no such domain), EPERM, ENOSPC (the domain's ports are all in use).
    public func allocUnbound(caller: DomainID, in dom: DomainID, remote: DomainID) throws(XenError) -> EventPort {
        let (me, target) = try lookup(caller, resolving: dom)
        guard target === me || me.privileged else { throw .EPERM }
        let remote = remote == .calling ? caller : remote
        let port = try target.state.withLock { (s: inout EventDomain.State) throws(XenError) -> Int in
            guard !s.dead else { throw .ESRCH }
            let port = try s.freePort(limit: target.portLimit)
            s.set(port, .init(binding: .unbound(remote: remote), vcpu: 0))
            return port
        }
        return EventPort(UInt32(port))
    }

    /// EVTCHNOP_bind_interdomain: connects a new local port to `remotePort` of `remoteDomain`
    /// (`DomainID.calling` for a loopback), which must be unbound and waiting for the caller.
    /// The new port notifies vCPU 0 and starts pending, so that an event the peer sent before
    /// the connection existed is not lost.
    /// - Throws: ESRCH (no such domain), ENOSPC, EINVAL (the remote port is out of range or not
    ///   unbound for the caller).
    public func bindInterdomain(caller: DomainID, remoteDomain: DomainID, remotePort: EventPort) throws(XenError) -> EventPort {
        let (me, remote) = try lookup(caller, resolving: remoteDomain)
        let remoteIndex = try remote.index(remotePort)
        func requireWaiting(_ rs: EventDomain.State) throws(XenError) {
            guard case .unbound(let waitingFor) = rs.channel(remoteIndex).binding, waitingFor == me.id else {
                throw .EINVAL
            }
        }
        let (port, upcall): (Int, Upcall?)
        if remote === me {
            (port, upcall) = try me.state.withLock { (s: inout EventDomain.State) throws(XenError) -> (Int, Upcall?) in
                guard !s.dead else { throw .ESRCH }
                let port = try s.freePort(limit: me.portLimit)
                try requireWaiting(s)
                s.set(remoteIndex, .init(binding: .interdomain(peer: me, port: port), vcpu: s.channel(remoteIndex).vcpu))
                s.set(port, .init(binding: .interdomain(peer: me, port: remoteIndex), vcpu: 0))
                return (port, me.markPending(port, vcpu: 0, s))
            }
        } else {
            (port, upcall) = try EventDomain.withBoth(me, remote) {
                (s: inout EventDomain.State, rs: inout EventDomain.State) throws(XenError) -> (Int, Upcall?) in
                guard !s.dead, !rs.dead else { throw .ESRCH }
                let port = try s.freePort(limit: me.portLimit)
                try requireWaiting(rs)
                rs.set(remoteIndex, .init(binding: .interdomain(peer: me, port: port), vcpu: rs.channel(remoteIndex).vcpu))
                s.set(port, .init(binding: .interdomain(peer: remote, port: remoteIndex), vcpu: 0))
                return (port, me.markPending(port, vcpu: 0, s))
            }
        }
        upcall?.fire()
        return EventPort(UInt32(port))
    }

    /// EVTCHNOP_bind_virq: a new port the host rings when `virq` fires on `vcpu`. A global
    /// VIRQ must be bound with vCPU 0.
    /// - Throws: EINVAL (no such VIRQ, or a global one with vcpu != 0), ENOENT (no such vCPU),
    ///   EEXIST (the VIRQ is bound on that vCPU already), ENOSPC.
    public func bindVirq(caller: DomainID, virq: VirtualIRQ, vcpu: UInt32) throws(XenError) -> EventPort {
        let me = try lookup(caller)
        guard virq.isValid else { throw .EINVAL }
        guard virq.isPerVcpu || vcpu == 0 else { throw .EINVAL }
        guard vcpu < UInt32(me.vcpuCount) else { throw .ENOENT }
        let vcpu = Int(vcpu)
        let port = try me.state.withLock { (s: inout EventDomain.State) throws(XenError) -> Int in
            guard !s.dead else { throw .ESRCH }
            let slot = EventDomain.virqSlot(virq, vcpu: vcpu)
            guard s.virqPorts[slot] == 0 else { throw .EEXIST }
            let port = try s.freePort(limit: me.portLimit)
            s.set(port, .init(binding: .virq(virq), vcpu: vcpu))
            s.virqPorts[slot] = port
            return port
        }
        return EventPort(UInt32(port))
    }

    /// EVTCHNOP_bind_ipi: a new port any vCPU of the caller sends on to notify `vcpu`.
    /// - Throws: ENOENT (no such vCPU), ENOSPC.
    public func bindIPI(caller: DomainID, vcpu: UInt32) throws(XenError) -> EventPort {
        let me = try lookup(caller)
        guard vcpu < UInt32(me.vcpuCount) else { throw .ENOENT }
        let port = try me.state.withLock { (s: inout EventDomain.State) throws(XenError) -> Int in
            guard !s.dead else { throw .ESRCH }
            let port = try s.freePort(limit: me.portLimit)
            s.set(port, .init(binding: .ipi, vcpu: Int(vcpu)))
            return port
        }
        return EventPort(UInt32(port))
    }

    /// EVTCHNOP_close: frees a port of the caller. The far end of an interdomain channel
    /// becomes unbound, waiting for the caller again. The port's pending bit is cleared, so a
    /// later binding of the same number starts clean.
    /// - Throws: EINVAL (out of range, port 0, or already free).
    public func close(caller: DomainID, port: EventPort) throws(XenError) {
        let me = try lookup(caller)
        try closePort(me, try me.index(port), allowDead: false)
    }

    private func closePort(_ domain: EventDomain, _ port: Int, allowDead: Bool) throws(XenError) {
        try EventDomain.withPort(domain, port, allowDead: allowDead,
            local: { (s: inout EventDomain.State) throws(XenError) in
                switch s.channel(port).binding {
                case .free, .reserved:
                    throw .EINVAL
                case .unbound, .ipi:
                    break
                case .virq(let virq):
                    s.virqPorts[EventDomain.virqSlot(virq, vcpu: s.channel(port).vcpu)] = 0
                case .interdomain(_, let otherEnd):  // a loopback: the other end is ours too
                    s.channels[otherEnd].binding = .unbound(remote: domain.id)
                }
                domain.release(port, &s)
            },
            remote: { (s: inout EventDomain.State, _: EventDomain, ps: inout EventDomain.State, peerPort: Int) in
                ps.channels[peerPort].binding = .unbound(remote: domain.id)
                domain.release(port, &s)
            })
    }

    /// EVTCHNOP_send: rings the other end of a caller's port: the peer's port for an
    /// interdomain channel, the bound vCPU for an IPI port. Sending on an unbound port succeeds
    /// and does nothing, as in Xen. The caller's lock is held while the peer is marked, so a
    /// concurrent close cannot turn this into an event on whatever reuses the peer's port.
    /// - Throws: EINVAL (out of range, or the port is free, port 0 or a VIRQ port).
    public func send(caller: DomainID, port: EventPort) throws(XenError) {
        let me = try lookup(caller)
        let index = try me.index(port)
        let upcall = try EventDomain.withPort(me, index,
            // Step 1 without the peer's lock: a peer port already pending makes this send a
            // no-op, so a storm at a peer that is not consuming (a masked port, a busy backend)
            // does not take the peer's lock for every event, which the peer's other channels
            // need. The full barrier orders the caller's earlier writes (a ring's entries)
            // before the bit is read, as the locked test-and-set in markPending does: a receiver
            // that clears the bit after this read then sees those writes.
            peek: { (peer: EventDomain, peerPort: Int) -> Upcall?? in
                Barrier.full()
                guard peer.isPendingUnlocked(peerPort) else { return nil }
                peer.counters.received.add(1, ordering: .relaxed)  // an event all the same, merged with the last
                return .some(nil)
            },
            local: { (s: inout EventDomain.State) throws(XenError) -> Upcall? in
                let channel = s.channel(index)
                switch channel.binding {
                case .ipi:
                    me.counters.received.add(1, ordering: .relaxed)
                    return me.markPending(index, vcpu: channel.vcpu, s)
                case .interdomain(_, let otherEnd):  // a loopback
                    me.counters.received.add(1, ordering: .relaxed)
                    return me.markPending(otherEnd, vcpu: s.channel(otherEnd).vcpu, s)
                case .unbound:
                    return nil
                case .free, .reserved, .virq:
                    throw .EINVAL
                }
            },
            remote: { (_: inout EventDomain.State, peer: EventDomain, ps: inout EventDomain.State, peerPort: Int) -> Upcall? in
                peer.counters.received.add(1, ordering: .relaxed)
                return peer.markPending(peerPort, vcpu: ps.channel(peerPort).vcpu, ps)
            })
        me.counters.sent.add(1, ordering: .relaxed)
        upcall?.fire()
    }

    /// EVTCHNOP_status: what `port` of `dom` (`DomainID.calling` for the caller) is bound to.
    /// Only a privileged caller may ask about another domain. Port 0 and free ports are closed.
    /// - Throws: ESRCH (no such domain), EPERM, EINVAL (port out of range).
    public func status(caller: DomainID, domain dom: DomainID, port: EventPort) throws(XenError) -> EventChannelStatus {
        let (me, target) = try lookup(caller, resolving: dom)
        guard target === me || me.privileged else { throw .EPERM }
        let index = try target.index(port)
        return try target.state.withLock { (s: inout EventDomain.State) throws(XenError) -> EventChannelStatus in
            guard !s.dead else { throw .ESRCH }
            return target.status(index, s)
        }
    }

    /// EVTCHNOP_unmask: clears the port's mask bit and, if this cleared it and the port is
    /// pending, raises the selector bit and upcall the send was held back from (Xen's 2-level
    /// unmask).
    /// - Throws: EINVAL (port out of range).
    public func unmask(caller: DomainID, port: EventPort) throws(XenError) {
        let me = try lookup(caller)
        let index = try me.index(port)
        let upcall = try me.state.withLock { (s: inout EventDomain.State) throws(XenError) -> Upcall? in
            guard !s.dead else { throw .ESRCH }
            return me.unmask(index, s)
        }
        upcall?.fire()
    }

    /// EVTCHNOP_bind_vcpu: which vCPU the port notifies from now on. Allowed for unbound and
    /// interdomain ports and global VIRQs; IPI ports and per-vCPU VIRQs keep their vCPU.
    /// - Throws: ENOENT (no such vCPU), EINVAL (port out of range, free, or not movable).
    public func bindVcpu(caller: DomainID, port: EventPort, vcpu: UInt32) throws(XenError) {
        let me = try lookup(caller)
        guard vcpu < UInt32(me.vcpuCount) else { throw .ENOENT }
        let index = try me.index(port)
        try me.state.withLock { (s: inout EventDomain.State) throws(XenError) in
            guard !s.dead else { throw .ESRCH }
            switch s.channel(index).binding {
            case .unbound, .interdomain:
                break
            case .virq(let virq) where !virq.isPerVcpu:
                break
            case .virq, .ipi, .free, .reserved:
                throw .EINVAL
            }
            s.channels[index].vcpu = Int(vcpu)
        }
    }

    // MARK: Host-raised events

    /// Raises `virq` in `domain` (the timer, the console...). `vcpu` names the vCPU for a
    /// per-vCPU VIRQ and is ignored for a global one, which goes to the vCPU its port notifies.
    /// Returns whether a port was bound to it (an unbound VIRQ is dropped, as in Xen).
    /// - Throws: ESRCH (no such domain), EINVAL (no such VIRQ, or a per-vCPU one without a
    ///   vCPU), ENOENT (no such vCPU).
    @discardableResult
    public func raiseVirq(in domain: DomainID, virq: VirtualIRQ, vcpu: Int?) throws(XenError) -> Bool {
        let target = try lookup(domain)
        guard virq.isValid else { throw .EINVAL }
        var row = 0
        if virq.isPerVcpu {
            guard let vcpu else { throw .EINVAL }
            guard vcpu >= 0, vcpu < target.vcpuCount else { throw .ENOENT }
            row = vcpu
        }
        let (bound, upcall) = target.state.withLock { (s: inout EventDomain.State) -> (Bool, Upcall?) in
            let port = s.virqPorts[EventDomain.virqSlot(virq, vcpu: row)]
            guard !s.dead, port != 0 else { return (false, nil) }
            return (true, target.markPending(port, vcpu: s.channel(port).vcpu, s))
        }
        upcall?.fire()
        return bound
    }

    /// SCHEDOP_poll's bookkeeping (Xen's `poll_mask`): while vCPU `vcpu` of `domain` polls, a
    /// port of the domain that becomes pending calls the domain's upcall hook for that vCPU,
    /// masked port or not, so the poller looks at its ports. Set it before looking at them.
    public func setPolling(_ domain: DomainID, vcpu: Int, _ polling: Bool) {
        (try? lookup(domain))?.setPolling(vcpu: vcpu, polling)
    }

    // MARK: Lookups

    private func lookup(_ id: DomainID) throws(XenError) -> EventDomain {
        guard let domain = registry.withLock({ $0[id] }) else { throw .ESRCH }
        return domain
    }

    /// The caller and the domain an argument names (`DomainID.calling` is the caller), found
    /// under one registry lock so both belong to the same moment.
    private func lookup(_ caller: DomainID, resolving other: DomainID) throws(XenError) -> (EventDomain, EventDomain) {
        let other = other == .calling ? caller : other
        let found = registry.withLock { (domains: inout [DomainID: EventDomain]) -> (EventDomain?, EventDomain?) in
            (domains[caller], domains[other])
        }
        guard let me = found.0, let them = found.1 else { throw .ESRCH }
        return (me, them)
    }

    // MARK: Test support

    /// Broken invariants, described (empty when all hold). Call when no operation is running:
    /// each domain is locked on its own, so concurrent operations could show a torn picture.
    /// Also checks that no free port is pending, which holds while guests do not set pending
    /// bits themselves.
    func invariantViolations() -> [String] {
        let domains = registry.withLock { Array($0.values) }
        var problems: [String] = []
        func snapshot(_ d: EventDomain) -> EventDomain.State { d.state.withLock { $0 } }
        for domain in domains {
            let s = snapshot(domain)
            let name = "\(domain.id)"
            if s.dead { problems.append("\(name) is registered but dead") }
            if case .reserved = s.channel(0).binding {} else { problems.append("\(name) port 0 is not reserved") }
            for port in 1..<max(s.channels.count, 1) {
                let channel = s.channels[port]
                if channel.vcpu < 0 || channel.vcpu >= domain.vcpuCount {
                    problems.append("\(name) port \(port) notifies missing vCPU \(channel.vcpu)")
                }
                switch channel.binding {
                case .reserved:
                    problems.append("\(name) port \(port) is marked reserved")
                case .free:
                    if GuestEventState(sharedInfo: domain.sharedInfo).isPending(EventPort(UInt32(port))) {
                        problems.append("\(name) free port \(port) is pending")
                    }
                case .interdomain(let peer, let peerPort):
                    let live = registry.withLock { $0[peer.id] } === peer
                    if !live { problems.append("\(name) port \(port) is bound to a removed \(peer.id)") }
                    guard case .interdomain(let back, let backPort) = snapshot(peer).channel(peerPort).binding,
                          back === domain, backPort == port else {
                        problems.append("\(name) port \(port) -> \(peer.id) port \(peerPort), which does not point back")
                        break
                    }
                case .virq(let virq):
                    if s.virqPorts[EventDomain.virqSlot(virq, vcpu: channel.vcpu)] != port {
                        problems.append("\(name) port \(port) is bound to \(virq) but not recorded there")
                    }
                case .unbound, .ipi:
                    break
                }
            }
            for (slot, port) in s.virqPorts.enumerated() where port != 0 {
                guard case .virq(let virq) = s.channel(port).binding, Int(virq.rawValue) == slot % VirtualIRQ.count else {
                    problems.append("\(name) VIRQ slot \(slot) names port \(port), which is not bound to it")
                    continue
                }
            }
        }
        return problems
    }
}
