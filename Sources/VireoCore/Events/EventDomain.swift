import Synchronization
import VireoABI

/// An upcall to make once every lock is released: the receiving domain's hook and the vCPU,
/// plus the vCPUs in SCHEDOP_poll that the event may concern (woken through the same hook).
struct Upcall: Sendable {
    let hook: @Sendable (Int) -> Void
    var vcpu: Int?
    var pollers: (low: UInt64, high: UInt64) = (0, 0)

    func fire() {
        if let vcpu { hook(vcpu) }
        for (base, bits) in [(0, pollers.low), (64, pollers.high)] {
            var rest = bits
            while rest != 0 {
                let index = base + rest.trailingZeroBitCount
                rest &= rest &- 1
                if index != vcpu { hook(index) }
            }
        }
    }
}

/// One registered domain's event channels: its port table, VIRQ bindings and vcpu_info
/// placement, behind the domain's lock, plus what never changes while it is registered.
///
/// A removed domain's object is marked dead and never registered again: a later domain with
/// the same ID gets a new object. Interdomain bindings point at the peer's object, not its ID,
/// so nothing can reach a new domain through a binding made with an old one.
final class EventDomain: Sendable {
    /// The vCPUs in SCHEDOP_poll (bit `vcpu` of the pair; 128 vCPUs at most): Xen's poll_mask.
    /// A port that becomes pending wakes them whether it is masked or not (evtchn_check_pollers).
    let pollingLow = Atomic<UInt64>(0)
    let pollingHigh = Atomic<UInt64>(0)

    enum Binding: Sendable {
        case free
        /// Port 0: never handed out.
        case reserved
        case unbound(remote: DomainID)
        case interdomain(peer: EventDomain, port: Int)
        case virq(VirtualIRQ)
        case ipi

        var isFree: Bool { if case .free = self { true } else { false } }
    }

    struct Channel: Sendable {
        var binding: Binding
        /// The vCPU the port notifies (validated against the domain's vCPU count).
        var vcpu: Int
        static let free = Channel(binding: .free, vcpu: 0)
    }

    struct State: Sendable {
        /// Set once when the domain is removed; every operation then fails or does nothing.
        var dead = false
        /// Indexed by port; ports at or beyond `count` (and below the limit) are free.
        var channels: [Channel] = [Channel(binding: .reserved, vcpu: 0)]
        /// The port bound to each VIRQ, at `vcpu * VirtualIRQ.count + virq` (global VIRQs on
        /// vCPU 0's row, as Xen keeps them); 0 when unbound.
        var virqPorts: [Int]
        /// Each vCPU's vcpu_info: its slot in shared_info, or where the guest moved it; nil for
        /// a vCPU from 32 up that has not registered one (its events stay pending until then).
        var vcpuInfo: [SharedRegion?]
        var vcpuInfoMoved: [Bool]

        func channel(_ port: Int) -> Channel { port < channels.count ? channels[port] : .free }

        mutating func set(_ port: Int, _ channel: Channel) {
            while channels.count <= port { channels.append(.free) }
            channels[port] = channel
        }

        /// The lowest free port (Xen hands out the lowest), without taking it.
        func freePort(limit: Int) throws(XenError) -> Int {
            for port in 1..<channels.count where channels[port].binding.isFree { return port }
            guard channels.count < limit else { throw .ENOSPC }
            return channels.count
        }
    }

    let id: DomainID
    let vcpuCount: Int
    let portLimit: Int
    let privileged: Bool
    let sharedInfo: SharedRegion
    let upcall: @Sendable (Int) -> Void
    /// Keeps the memory behind `sharedInfo` and every registered vcpu_info alive.
    let owner: any AnyObject & Sendable
    let state: Mutex<State>
    /// Sends by and to this domain (``EventChannels/counters(of:)``).
    let counters = EventCounters()

    init(
        id: DomainID, vcpuCount: Int, portLimit: Int, privileged: Bool, sharedInfo: SharedRegion,
        owner: any AnyObject & Sendable, upcall: @escaping @Sendable (Int) -> Void
    ) {
        self.id = id
        self.vcpuCount = vcpuCount
        self.portLimit = portLimit
        self.privileged = privileged
        self.sharedInfo = sharedInfo
        self.owner = owner
        self.upcall = upcall
        let slots = (0..<vcpuCount).map { vcpu -> SharedRegion? in
            guard vcpu < TwoLevelLayout.legacyVcpuSlots else { return nil }
            return sharedInfo.slice(offset: vcpu * TwoLevelLayout.vcpuInfoSize, count: TwoLevelLayout.vcpuInfoSize)
        }
        state = Mutex(State(
            virqPorts: Array(repeating: 0, count: vcpuCount * VirtualIRQ.count),
            vcpuInfo: slots,
            vcpuInfoMoved: Array(repeating: false, count: vcpuCount)
        ))
    }

    /// A guest-supplied port as an index into this domain's table: below the domain's limit
    /// (which is at most the 2-level ABI's 4096), else EINVAL as Xen's port_is_valid.
    func index(_ port: EventPort) throws(XenError) -> Int {
        guard port.rawValue < UInt32(portLimit) else { throw .EINVAL }
        return Int(port.rawValue)
    }

    static func virqSlot(_ virq: VirtualIRQ, vcpu: Int) -> Int {
        (virq.isPerVcpu ? vcpu : 0) * VirtualIRQ.count + Int(virq.rawValue)
    }

    // MARK: The 2-level bits (call with this domain's lock held)

    private func pendingWord(_ word: Int) -> Int { TwoLevelLayout.pendingOffset + word * 8 }
    private func maskWord(_ word: Int) -> Int { TwoLevelLayout.maskOffset + word * 8 }

    /// Send steps 1-5 of `vireo/event_channel.h` for `port`, notifying `vcpu`. Each step is a
    /// locked read-modify-write (a full barrier), so a guest that sees a selector bit finds the
    /// pending bit behind it, and one that sees the upcall flag finds the selector bit.
    /// Returns the upcall to make after the locks are released, if this send made the flag 0->1.
    func markPending(_ port: Int, vcpu: Int, _ s: State) -> Upcall? {
        guard !s.dead else { return nil }
        let (word, bit) = TwoLevelLayout.position(of: UInt32(port))
        // 1. Already pending: the receiver has not consumed the last event and will see this
        //    one with it. This is what turns an event storm into a single upcall.
        if sharedInfo.testAndSetBit(bit, inWordAt: pendingWord(word)) { return nil }
        // A vCPU polling (SCHEDOP_poll) wakes to look at its ports, masked or not. The pending
        // bit's locked set above is a full barrier before this load; a poller sets its bit
        // before it looks at its ports, so one of the two sees the other.
        var wake = pollers().map { Upcall(hook: upcall, vcpu: nil, pollers: $0) }
        // 2. Masked: stays pending, re-examined at unmask.
        if sharedInfo.testBit(bit, inWordAt: maskWord(word)) { return wake }
        if let raised = raiseSelector(word, vcpu: vcpu, s) {
            if wake == nil { return raised }
            wake?.vcpu = raised.vcpu
        }
        return wake
    }

    /// The polling vCPUs, nil when none (the common case: two loads).
    private func pollers() -> (low: UInt64, high: UInt64)? {
        let low = pollingLow.load(ordering: .sequentiallyConsistent)
        let high = pollingHigh.load(ordering: .sequentiallyConsistent)
        return low | high == 0 ? nil : (low, high)
    }

    /// Marks `vcpu` as in SCHEDOP_poll (or no longer).
    func setPolling(vcpu: Int, _ on: Bool) {
        guard (0..<128).contains(vcpu) else { return }
        let bit = UInt64(1) << UInt64(vcpu % 64)
        switch (vcpu < 64, on) {
        case (true, true): pollingLow.bitwiseOr(bit, ordering: .sequentiallyConsistent)
        case (true, false): pollingLow.bitwiseAnd(~bit, ordering: .sequentiallyConsistent)
        case (false, true): pollingHigh.bitwiseOr(bit, ordering: .sequentiallyConsistent)
        case (false, false): pollingHigh.bitwiseAnd(~bit, ordering: .sequentiallyConsistent)
        }
    }

    /// Whether `port`'s pending bit is set, read without this domain's lock: for a sender that
    /// holds the lock of the domain at the other end of the channel, which pins the binding
    /// (closing either end takes both domains' locks), so the bit is this channel's.
    func isPendingUnlocked(_ port: Int) -> Bool {
        let (word, bit) = TwoLevelLayout.position(of: UInt32(port))
        return sharedInfo.testBit(bit, inWordAt: pendingWord(word))
    }

    /// Send steps 3-5: the selector bit for `word`, then the upcall flag.
    private func raiseSelector(_ word: Int, vcpu: Int, _ s: State) -> Upcall? {
        guard let info = s.vcpuInfo[vcpu] else { return nil }
        if info.testAndSetBit(word, inWordAt: TwoLevelLayout.pendingSelOffset) { return nil }
        if info.exchange8(1, at: TwoLevelLayout.upcallPendingOffset) != 0 { return nil }
        return Upcall(hook: upcall, vcpu: vcpu)
    }

    /// EVTCHNOP_unmask as Xen's 2-level ABI does it: only when this call is the one that clears
    /// the mask bit and the port is pending does it raise the selector and upcall.
    func unmask(_ port: Int, _ s: State) -> Upcall? {
        guard !s.dead else { return nil }
        let (word, bit) = TwoLevelLayout.position(of: UInt32(port))
        guard sharedInfo.testAndClearBit(bit, inWordAt: maskWord(word)),
              sharedInfo.testBit(bit, inWordAt: pendingWord(word)) else { return nil }
        return raiseSelector(word, vcpu: s.channel(port).vcpu, s)
    }

    /// Frees `port`: its pending bit is cleared so that a later binding of the same number
    /// starts without the old binding's event, and it notifies vCPU 0 again.
    func release(_ port: Int, _ s: inout State) {
        let (word, bit) = TwoLevelLayout.position(of: UInt32(port))
        _ = sharedInfo.testAndClearBit(bit, inWordAt: pendingWord(word))
        s.set(port, .free)
    }

    /// Moves `vcpu`'s vcpu_info to `region` (VCPUOP_register_vcpu_info): the current record is
    /// copied over, then every selector bit and the upcall flag are set so that no event is lost
    /// in the move (the guest may get one upcall that finds nothing).
    func moveVcpuInfo(_ vcpu: Int, to region: SharedRegion, _ s: inout State) -> Upcall? {
        if let old = s.vcpuInfo[vcpu] {
            region.copyBytes(from: old, offset: 0, to: 0, count: TwoLevelLayout.vcpuInfoSize)
        }
        s.vcpuInfo[vcpu] = region
        s.vcpuInfoMoved[vcpu] = true
        region.storeRelease64(~0, at: TwoLevelLayout.pendingSelOffset)
        guard region.exchange8(1, at: TwoLevelLayout.upcallPendingOffset) == 0 else { return nil }
        return Upcall(hook: upcall, vcpu: vcpu)
    }

    /// What EVTCHNOP_status reports for `port`.
    func status(_ port: Int, _ s: State) -> EventChannelStatus {
        let channel = s.channel(port)
        let binding: EventChannelStatus.Binding = switch channel.binding {
        case .free, .reserved: .closed
        case .unbound(let remote): .unbound(remote: remote)
        case .interdomain(let peer, let peerPort): .interdomain(remote: peer.id, port: EventPort(UInt32(peerPort)))
        case .virq(let virq): .virq(virq)
        case .ipi: .ipi
        }
        return EventChannelStatus(binding: binding, vcpu: UInt32(channel.vcpu))
    }

    // MARK: Locking two domains

    /// The global lock order: by domain ID, then (for a dead domain and its successor, which
    /// share an ID) by object identity. Every path that holds two domain locks takes them in
    /// this order, so no two of them can deadlock.
    func locksBefore(_ other: EventDomain) -> Bool {
        id != other.id ? id < other.id : ObjectIdentifier(self) < ObjectIdentifier(other)
    }

    /// Runs `body` with both domains locked, in lock order. `a` and `b` must differ.
    static func withBoth<R: Sendable>(
        _ a: EventDomain, _ b: EventDomain, _ body: (inout State, inout State) throws(XenError) -> R
    ) throws(XenError) -> R {
        precondition(a !== b, "withBoth needs two domains")
        if a.locksBefore(b) {
            return try a.state.withLock { (sa: inout State) throws(XenError) -> R in
                try b.state.withLock { (sb: inout State) throws(XenError) -> R in try body(&sa, &sb) }
            }
        }
        return try b.state.withLock { (sb: inout State) throws(XenError) -> R in
            try a.state.withLock { (sa: inout State) throws(XenError) -> R in try body(&sa, &sb) }
        }
    }

    /// Runs an operation on `port` of `domain` under the right locks. When the port is
    /// connected to another domain, `remote` runs with both domains locked (and gets the peer,
    /// its state and the peer's port); otherwise `local` runs with this domain locked. Either
    /// way the binding is read under the locks the closure runs with, so it is exactly the one
    /// the closure acts on: a port closed and rebound meanwhile is never mistaken for the old one.
    ///
    /// When the peer sorts first in the lock order, this domain's lock is dropped, both are
    /// taken in order, and the binding is read again; if it changed, the whole thing restarts.
    ///
    /// `peek`, when given, runs first for a connected port with only this domain locked (the
    /// binding pinned); a result from it finishes the operation without the peer's lock.
    static func withPort<R: Sendable>(
        _ domain: EventDomain, _ port: Int, allowDead: Bool = false,
        peek: ((EventDomain, Int) -> R?)? = nil,
        local: (inout State) throws(XenError) -> R,
        remote: (inout State, EventDomain, inout State, Int) throws(XenError) -> R
    ) throws(XenError) -> R {
        while true {
            let step = try domain.state.withLock { (s: inout State) throws(XenError) -> PortStep<R> in
                guard allowDead || !s.dead else { throw .ESRCH }
                guard case .interdomain(let peer, let peerPort) = s.channel(port).binding, peer !== domain else {
                    return .done(try local(&s))
                }
                if let peek, let result = peek(peer, peerPort) { return .done(result) }
                guard domain.locksBefore(peer) else { return .lockBoth(peer) }
                return .done(try peer.state.withLock { (ps: inout State) throws(XenError) -> R in
                    try remote(&s, peer, &ps, peerPort)
                })
            }
            guard case .lockBoth(let expectedPeer) = step else {
                if case .done(let result) = step { return result }
                continue
            }
            let retried = try withBoth(domain, expectedPeer) { (s: inout State, ps: inout State) throws(XenError) -> PortStep<R> in
                guard allowDead || !s.dead else { throw .ESRCH }
                guard case .interdomain(let peer, let peerPort) = s.channel(port).binding, peer === expectedPeer else {
                    return .again  // closed or rebound while unlocked: start over
                }
                return .done(try remote(&s, peer, &ps, peerPort))
            }
            if case .done(let result) = retried { return result }
        }
    }
}

/// The outcome of one locked look at a port in ``EventDomain/withPort(_:_:allowDead:local:remote:)``.
enum PortStep<R: Sendable>: Sendable {
    case done(R)
    case lockBoth(EventDomain)
    case again
}
