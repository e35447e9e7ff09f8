import Synchronization
import VireoABI
import VireoLinux

/// Page-aligned host memory standing in for a guest page: the host domain's shared_info, plus
/// a private word for waiting. Freed when the last reference goes.
final class HostPage: @unchecked Sendable {  // immutable after init; the bytes are reached through SharedRegion only
    private let base: UnsafeMutableRawPointer
    /// The shared_info page.
    let sharedInfo: SharedRegion
    /// The futex word a dispatcher sleeps on (not part of any ABI structure).
    let wakeWord: SharedRegion
    /// One bit per port delivered immediately (``HostEventDomain/Delivery/immediate``), laid
    /// out as the pending bitmap: 64 words of 64 bits. Not part of any ABI structure either.
    let immediatePorts: SharedRegion

    init() {
        let page = GuestMemory.pageSize
        base = UnsafeMutableRawPointer.allocate(byteCount: 2 * page, alignment: page)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: 2 * page)
        sharedInfo = .unsafe(base, count: page)
        wakeWord = .unsafe(base + page, count: 4)
        immediatePorts = .unsafe(base + page + 64, count: TwoLevelLayout.bitmapBytes)
    }

    deinit { base.deallocate() }
}

/// What the upcall hook of the host domain captures: the page (kept alive), how many
/// dispatchers sleep, and the handlers (for ports delivered immediately). Not the domain object
/// itself, which would make a cycle through the hub.
private final class HostWaker: Sendable {
    typealias Handler = @Sendable (EventPort) -> Void

    let page: HostPage
    let sleepers = Atomic<Int>(0)
    let handlers = Mutex<[EventPort: Handler]>([:])

    init(page: HostPage) { self.page = page }

    /// Marks "something happened" and wakes sleeping dispatchers. The store is ordered before
    /// the sleeper count is read (full barrier), and a sleeper counts itself before the kernel
    /// re-reads the word, so either the sleeper sees 1 or this call sees the sleeper.
    func kick() {
        page.wakeWord.storeRelease32(1, at: 0)
        Barrier.full()
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
            page.wakeWord.withUnsafeMutableBytes(offset: 0, count: 4) { bytes in
                _ = vireo_futex_wake(bytes.baseAddress!.assumingMemoryBound(to: UInt32.self), Int32.max)
            }
        }
    }

    func setImmediate(_ port: EventPort, _ on: Bool) {
        let (word, bit) = TwoLevelLayout.position(of: port.rawValue)
        if on {
            _ = page.immediatePorts.testAndSetBit(bit, inWordAt: word * 8)
        } else {
            _ = page.immediatePorts.testAndClearBit(bit, inWordAt: word * 8)
        }
    }

    /// The immediate pass, on the thread whose send (or unmask) raised the upcall of vCPU 1,
    /// after the hub released its locks: the receive loop of `vireo/event_channel.h` on vCPU
    /// 1's selector, taking only immediate ports (a dispatcher port sharing a word stays pending
    /// for vCPU 0's scan, which its own selector bit names) and running each one's handler at
    /// once, with no lock held. Passes on several threads at once take each event once.
    func runImmediate() {
        let events = GuestEventState(sharedInfo: page.sharedInfo)
        let immediate = page.immediatePorts
        repeat {
            events.scanPending(vcpu: HostEventDomain.immediateVcpu, within: { immediate.loadAcquire64(at: $0 * 8) }) { port in
                let handler = handlers.withLock { $0[port] }
                handler?(port)
            }
        } while events.upcallPending(vcpu: HostEventDomain.immediateVcpu)
    }
}

/// The host's own domain (Xen's domain 0), where Vireo's backends live: its shared_info is a
/// host page, so backends bind ports exactly as guests do and receive events through the same
/// 2-level bits. Events are taken by ``dispatch(timeout:)``, which blocks until a port is
/// pending, runs the handler installed for each pending port, and returns them all.
///
/// The domain is removed from the hub when this object goes away.
public final class HostEventDomain: Sendable {
    public let id: DomainID
    public let hub: EventChannels
    public let portLimit: Int
    private let page: HostPage
    private let waker: HostWaker
    private let interrupted = Atomic<Bool>(false)

    /// How a port's events reach its handler.
    public enum Delivery: Sendable {
        /// On the dispatcher's thread (``dispatch(timeout:)``): the handler may take its time,
        /// and runs on one thread at a time.
        case dispatcher
        /// At once, on the thread that made the port pending, after the hub has released its
        /// locks: a guest's vCPU inside its EVTCHNOP_send, a host thread that sends on a
        /// loopback channel or unmasks the port. No hand-off to the dispatcher thread, which
        /// for a handler that only wakes a worker is a thread hand-off saved per event (Xen's
        /// send marks dom0's port and kicks dom0's vCPU from the sender's CPU the same way).
        /// The handler must be short and must not block: a wake-up, a flag. It may run on
        /// several threads at once, and must not take a lock that a thread may hold while it
        /// sends to, or unmasks, a port of this domain. A hostile guest's storm runs it on the
        /// guest's own vCPU thread, charged to the guest's own CPU time.
        case immediate
    }

    /// The host vCPU whose ports are delivered immediately: their events raise its upcall,
    /// and its upcall hook runs the handlers on the raising thread. vCPU 0 is the dispatcher's.
    public static let immediateVcpu = 1

    /// Registers the host domain with `hub` as a privileged domain with two vCPUs: vCPU 0 the
    /// dispatcher, vCPU 1 the immediate deliveries (``Delivery``).
    /// - Throws: what ``EventChannels/registerDomain(_:vcpus:sharedInfo:portLimit:privileged:owner:upcall:)`` throws.
    public init(hub: EventChannels, id: DomainID = .zero, portLimit: Int = EventChannels.defaultPortLimit) throws(XenError) {
        let page = HostPage()
        let waker = HostWaker(page: page)
        try hub.registerDomain(
            id, vcpus: 2, sharedInfo: page.sharedInfo, portLimit: portLimit, privileged: true,
            owner: page, upcall: { vcpu in
                if vcpu == Self.immediateVcpu { waker.runImmediate() } else { waker.kick() }
            })
        self.id = id
        self.hub = hub
        self.portLimit = portLimit
        self.page = page
        self.waker = waker
    }

    deinit { try? hub.removeDomain(id) }

    /// The domain's event bits, as a guest sees its own.
    public var events: GuestEventState { GuestEventState(sharedInfo: page.sharedInfo) }

    // MARK: Binding (each installs the port's handler before any dispatch can see the port)

    /// A new port waiting for `remote` to bind (EVTCHNOP_alloc_unbound in this domain).
    public func allocUnbound(
        remote: DomainID, delivery: Delivery = .dispatcher, handler: (@Sendable (EventPort) -> Void)? = nil
    ) throws(XenError) -> EventPort {
        try withHandler(handler, delivery) { () throws(XenError) in try hub.allocUnbound(caller: id, in: .calling, remote: remote) }
    }

    /// Connects to a guest's unbound port (EVTCHNOP_bind_interdomain). The new port starts
    /// pending, so its handler runs at the next dispatch (whatever its delivery: the port
    /// notifies the dispatcher's vCPU until the bind has installed the handler): check the
    /// shared ring once.
    public func bindInterdomain(
        remoteDomain: DomainID, remotePort: EventPort, delivery: Delivery = .dispatcher,
        handler: (@Sendable (EventPort) -> Void)? = nil
    ) throws(XenError) -> EventPort {
        try withHandler(handler, delivery) { () throws(XenError) in
            try hub.bindInterdomain(caller: id, remoteDomain: remoteDomain, remotePort: remotePort)
        }
    }

    /// Binds a VIRQ of the host domain (EVTCHNOP_bind_virq on vCPU 0).
    public func bindVirq(_ virq: VirtualIRQ, handler: (@Sendable (EventPort) -> Void)? = nil) throws(XenError) -> EventPort {
        try withHandler(handler, .dispatcher) { () throws(XenError) in try hub.bindVirq(caller: id, virq: virq, vcpu: 0) }
    }

    /// Installs (or, with nil, removes) the handler of a port.
    public func setHandler(for port: EventPort, _ handler: (@Sendable (EventPort) -> Void)?) {
        waker.handlers.withLock { $0[port] = handler }
    }

    /// Rings the other end of `port`.
    public func send(_ port: EventPort) throws(XenError) { try hub.send(caller: id, port: port) }

    /// Closes `port` and drops its handler.
    public func close(_ port: EventPort) throws(XenError) {
        // Under the handler table's lock, so a bind that reuses the number cannot have its
        // new handler dropped by this close.
        try waker.handlers.withLock { (table: inout [EventPort: @Sendable (EventPort) -> Void]) throws(XenError) in
            try hub.close(caller: id, port: port)
            table[port] = nil
            waker.setImmediate(port, false)
        }
    }

    /// Masks `port`: it can still become pending, but no dispatch reports it until unmasked.
    /// - Throws: EINVAL for a port beyond the domain's limit.
    public func mask(_ port: EventPort) throws(XenError) {
        guard port.rawValue < UInt32(portLimit) else { throw .EINVAL }
        events.mask(port)
    }

    /// Unmasks `port`; an event that arrived while it was masked is delivered at the next dispatch.
    public func unmask(_ port: EventPort) throws(XenError) { try hub.unmask(caller: id, port: port) }

    private func withHandler(
        _ handler: (@Sendable (EventPort) -> Void)?, _ delivery: Delivery, _ bind: () throws(XenError) -> EventPort
    ) throws(XenError) -> EventPort {
        guard let handler else { return try bind() }
        // Holding the handler table across the bind: a dispatch that takes the new port's first
        // event waits here, then finds its handler. An immediate port notifies the immediate
        // vCPU only from here on, with its handler in place (and a close, which takes this
        // lock, cannot come in between).
        return try waker.handlers.withLock { (table: inout [EventPort: @Sendable (EventPort) -> Void]) throws(XenError) -> EventPort in
            let port = try bind()
            table[port] = handler
            if delivery == .immediate {
                waker.setImmediate(port, true)
                do throws(XenError) {
                    try hub.bindVcpu(caller: id, port: port, vcpu: UInt32(Self.immediateVcpu))
                } catch {
                    waker.setImmediate(port, false)
                    table[port] = nil
                    try? hub.close(caller: id, port: port)
                    throw error
                }
            }
            return port
        }
    }

    // MARK: Dispatching

    /// Takes every pending, unmasked port without waiting; runs handlers; returns the ports.
    @discardableResult
    public func poll() -> [EventPort] {
        var ports: [EventPort] = []
        // Each pass acknowledges the upcall first; loop while another arrived meanwhile.
        repeat {
            events.scanPending(vcpu: 0) { ports.append($0) }
        } while events.upcallPending(vcpu: 0)
        guard !ports.isEmpty else { return [] }
        let table = waker.handlers.withLock { table in ports.map { table[$0] } }
        for (port, handler) in zip(ports, table) { handler?(port) }
        return ports
    }

    /// Blocks until some port is pending (or `timeout` passes, or ``interrupt()`` is called),
    /// then takes the pending ports, runs the handler of each that has one (on this thread,
    /// with no lock held) and returns them all, in port order per word. Returns at once if a
    /// port is already pending; `timeout` nil waits without limit. Returns an empty array on
    /// timeout or interruption.
    @discardableResult
    public func dispatch(timeout: Duration? = nil) -> [EventPort] {
        let clock = ContinuousClock()
        let deadline = timeout.map { clock.now.advanced(by: $0) }
        let word = page.wakeWord
        while true {
            // Reset before looking: an event after this point stores 1 again and the sleep
            // below returns at once. The scan's exchange is a full barrier after this store.
            word.storeRelease32(0, at: 0)
            let ports = poll()
            if !ports.isEmpty { return ports }
            if interrupted.exchange(false, ordering: .sequentiallyConsistent) { return [] }
            var waitNanoseconds: Int64 = -1
            if let deadline {
                let left = clock.now.duration(to: deadline)
                guard left > .zero else { return [] }
                let (seconds, attoseconds) = left.components
                waitNanoseconds = seconds >= Int64.max / 1_000_000_000 - 1
                    ? Int64.max : seconds * 1_000_000_000 + attoseconds / 1_000_000_000
            }
            waker.sleepers.add(1, ordering: .sequentiallyConsistent)
            word.withUnsafeMutableBytes(offset: 0, count: 4) { bytes in
                // Sleeps only while the word is still 0: no kick since the reset above.
                _ = vireo_futex_wait(bytes.baseAddress!.assumingMemoryBound(to: UInt32.self), 0, waitNanoseconds)
            }
            waker.sleepers.subtract(1, ordering: .sequentiallyConsistent)
        }
    }

    /// Makes one blocked (or the next) ``dispatch(timeout:)`` return, with nothing if no port
    /// is pending.
    public func interrupt() {
        interrupted.store(true, ordering: .sequentiallyConsistent)
        waker.kick()
    }
}
