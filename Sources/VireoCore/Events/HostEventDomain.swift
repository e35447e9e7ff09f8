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

    init() {
        let page = GuestMemory.pageSize
        base = UnsafeMutableRawPointer.allocate(byteCount: 2 * page, alignment: page)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: 2 * page)
        sharedInfo = .unsafe(base, count: page)
        wakeWord = .unsafe(base + page, count: 4)
    }

    deinit { base.deallocate() }
}

/// What the upcall hook of the host domain captures: the page (kept alive) and how many
/// dispatchers sleep. Not the domain object itself, which would make a cycle through the hub.
private final class HostWaker: Sendable {
    let page: HostPage
    let sleepers = Atomic<Int>(0)

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
    private let handlers = Mutex<[EventPort: @Sendable (EventPort) -> Void]>([:])
    private let interrupted = Atomic<Bool>(false)

    /// Registers the host domain with `hub` as a privileged domain with one vCPU (the
    /// dispatcher); every port notifies vCPU 0.
    /// - Throws: what ``EventChannels/registerDomain(_:vcpus:sharedInfo:portLimit:privileged:owner:upcall:)`` throws.
    public init(hub: EventChannels, id: DomainID = .zero, portLimit: Int = EventChannels.defaultPortLimit) throws(XenError) {
        let page = HostPage()
        let waker = HostWaker(page: page)
        try hub.registerDomain(
            id, vcpus: 1, sharedInfo: page.sharedInfo, portLimit: portLimit, privileged: true,
            owner: page, upcall: { _ in waker.kick() })
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
    public func allocUnbound(remote: DomainID, handler: (@Sendable (EventPort) -> Void)? = nil) throws(XenError) -> EventPort {
        try withHandler(handler) { () throws(XenError) in try hub.allocUnbound(caller: id, in: .calling, remote: remote) }
    }

    /// Connects to a guest's unbound port (EVTCHNOP_bind_interdomain). The new port starts
    /// pending, so its handler runs at the next dispatch: check the shared ring once.
    public func bindInterdomain(remoteDomain: DomainID, remotePort: EventPort, handler: (@Sendable (EventPort) -> Void)? = nil) throws(XenError) -> EventPort {
        try withHandler(handler) { () throws(XenError) in
            try hub.bindInterdomain(caller: id, remoteDomain: remoteDomain, remotePort: remotePort)
        }
    }

    /// Binds a VIRQ of the host domain (EVTCHNOP_bind_virq on vCPU 0).
    public func bindVirq(_ virq: VirtualIRQ, handler: (@Sendable (EventPort) -> Void)? = nil) throws(XenError) -> EventPort {
        try withHandler(handler) { () throws(XenError) in try hub.bindVirq(caller: id, virq: virq, vcpu: 0) }
    }

    /// Installs (or, with nil, removes) the handler of a port.
    public func setHandler(for port: EventPort, _ handler: (@Sendable (EventPort) -> Void)?) {
        handlers.withLock { $0[port] = handler }
    }

    /// Rings the other end of `port`.
    public func send(_ port: EventPort) throws(XenError) { try hub.send(caller: id, port: port) }

    /// Closes `port` and drops its handler.
    public func close(_ port: EventPort) throws(XenError) {
        // Under the handler table's lock, so a bind that reuses the number cannot have its
        // new handler dropped by this close.
        try handlers.withLock { (table: inout [EventPort: @Sendable (EventPort) -> Void]) throws(XenError) in
            try hub.close(caller: id, port: port)
            table[port] = nil
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
        _ handler: (@Sendable (EventPort) -> Void)?, _ bind: () throws(XenError) -> EventPort
    ) throws(XenError) -> EventPort {
        guard let handler else { return try bind() }
        // Holding the handler table across the bind: a dispatch that takes the new port's first
        // event waits here, then finds its handler.
        return try handlers.withLock { (table: inout [EventPort: @Sendable (EventPort) -> Void]) throws(XenError) -> EventPort in
            let port = try bind()
            table[port] = handler
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
        let table = handlers.withLock { table in ports.map { table[$0] } }
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
