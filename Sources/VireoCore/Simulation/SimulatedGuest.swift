import Glibc
import Synchronization
import VireoABI
import VireoAtomics
import VireoLinux

/// A guest played from the host, for tests and benchmarks (the core's counterpart of an
/// embedded event loop): it owns real guest memory with a shared_info page and a grant table
/// placed in its physical address space as a PVH guest places them, registers with the event
/// channel hub and the grant tables, and drives them with the same frontend code the guest
/// library uses: ``GuestGrantTable`` to grant and revoke, ``FrontRing`` for rings,
/// ``GuestEventState`` to take events. Every grant entry, ring entry and event bit it writes is
/// real shared memory that the host-side code reads exactly as it would read a real guest's.
///
/// Hostile tests reach the same memory through ``memory`` to write what a well-behaved guest
/// never would.
public final class SimulatedGuest: @unchecked Sendable {  // mutable state sits behind `state`
    public let id: DomainID
    public let memory: GuestMemory
    /// The host's side of this guest's grant table.
    public let grantTable: GrantTable
    public let hub: EventChannels
    public let grantTables: GrantTables
    /// The guest's view of its event bits (shared_info as placed in its physical memory).
    public let events: GuestEventState
    /// Where the guest placed shared_info and its grant table frames.
    public let sharedInfoFrame: GuestFrame
    public let grantFrames: [GuestFrame]

    private struct State {
        var grants: GuestGrantTable
        var nextFrame: UInt64 = 1  // frame 0 stays unused, as real guests keep it
        var freeFrames: [UInt64] = []
    }
    private let state: Mutex<State>
    private let upcalls = UpcallCounter()
    private let destroyed = Atomic<Bool>(false)

    /// A guest with `ramPages` pages of RAM and `grantFrames` grant table frames (512 grants
    /// each), registered as domain `id` with `hub` and `grantTables`.
    public init(id: DomainID, ramPages: Int = 256, hub: EventChannels, grantTables: GrantTables,
                grantFrames: Int = 4, portLimit: Int = EventChannels.defaultPortLimit) throws {
        let memory = try GuestMemory(ramBytes: UInt64(ramPages) * 4096, specialFrames: 1 + grantFrames,
                                     name: "vireo-simulated-\(id.rawValue)")
        // Special frame 0 is shared_info, 1... the grant table; the guest maps them in the
        // hole just above its RAM (XENMEM_add_to_physmap), as a PVH guest would.
        let sharedInfoFrame = GuestFrame(UInt64(ramPages))
        try memory.placeSpecialFrame(0, at: sharedInfoFrame)
        let table = try GrantTable(domain: id, memory: memory, firstSpecialFrame: 1, maxFrames: grantFrames,
                                   initialFrames: grantFrames)
        var frames: [GuestFrame] = []
        for i in 0..<grantFrames {
            let frame = GuestFrame(UInt64(ramPages + 1 + i))
            try table.place(frame: i, at: frame)
            frames.append(frame)
        }
        let guestView = try frames.map { try memory.region(frame: $0) }
        self.id = id
        self.memory = memory
        self.grantTable = table
        self.hub = hub
        self.grantTables = grantTables
        self.sharedInfoFrame = sharedInfoFrame
        self.grantFrames = frames
        self.events = GuestEventState(sharedInfo: try memory.region(frame: sharedInfoFrame))
        self.state = Mutex(State(grants: GuestGrantTable(frames: guestView)))
        let upcalls = self.upcalls
        try hub.registerDomain(id, vcpus: 1, sharedInfo: try memory.specialRegion(0), portLimit: portLimit,
                               owner: memory, upcall: { _ in upcalls.raised() })
        do {
            try grantTables.add(table)
        } catch {
            try? hub.removeDomain(id)
            throw error
        }
    }

    deinit { destroy() }

    /// The domain dies: its ports close, its grants can no longer be mapped, and mappings of
    /// them end. Idempotent.
    public func destroy() {
        guard !destroyed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        try? hub.removeDomain(id)
        grantTables.remove(id)
    }

    // MARK: Pages

    /// A free RAM page of the guest's.
    public func allocatePage() throws(GuestMemoryError) -> GuestFrame {
        let frame = state.withLock { s -> UInt64? in
            if let free = s.freeFrames.popLast() { return free }
            guard s.nextFrame < memory.ramFrames else { return nil }
            defer { s.nextFrame += 1 }
            return s.nextFrame
        }
        guard let frame else { throw .invalidLayout("simulated guest \(id) is out of RAM pages") }
        return GuestFrame(frame)
    }

    /// Returns a page to the allocator.
    public func freePage(_ frame: GuestFrame) {
        state.withLock { $0.freeFrames.append(frame.rawValue) }
    }

    /// The guest's view of one of its pages.
    public func page(_ frame: GuestFrame) throws(GuestMemoryError) -> SharedRegion {
        try memory.region(frame: frame)
    }

    // MARK: Grants (the frontend's side)

    /// Grants `domain` access to `frame`, writing the entry as a guest does.
    public func grantAccess(to domain: DomainID, frame: GuestFrame, readOnly: Bool) throws(GrantStatus) -> GrantRef {
        guard let ref = state.withLock({ $0.grants.grantAccess(to: domain, frame: frame, readOnly: readOnly) }) else {
            throw .noSpace
        }
        return ref
    }

    /// Revokes a grant; false (nothing changed) while the backend still uses it.
    public func endAccess(_ ref: GrantRef) -> Bool {
        state.withLock { $0.grants.endAccess(ref) }
    }

    public func isInUse(_ ref: GrantRef) -> Bool {
        state.withLock { $0.grants.isInUse(ref) }
    }

    // MARK: Rings

    /// Initialises a shared ring on `frame` and returns the guest's front end of it.
    public func frontRing<Request: BitwiseCopyable, Response: BitwiseCopyable>(
        on frame: GuestFrame, _ request: Request.Type = Request.self, _ response: Response.Type = Response.self
    ) throws -> FrontRing<Request, Response> {
        try FrontRing<Request, Response>(initializing: try page(frame))
    }

    // MARK: Events (the hypercalls a guest makes, with itself as the caller)

    public func allocUnbound(remote: DomainID) throws(XenError) -> EventPort {
        try hub.allocUnbound(caller: id, in: id, remote: remote)
    }

    public func bindInterdomain(remoteDomain: DomainID, remotePort: EventPort) throws(XenError) -> EventPort {
        try hub.bindInterdomain(caller: id, remoteDomain: remoteDomain, remotePort: remotePort)
    }

    /// EVTCHNOP_send.
    public func notify(_ port: EventPort) throws(XenError) {
        try hub.send(caller: id, port: port)
    }

    public func close(_ port: EventPort) throws(XenError) {
        try hub.close(caller: id, port: port)
    }

    /// Upcalls the host has raised for this guest so far.
    public var upcallCount: Int { upcalls.count.load(ordering: .sequentiallyConsistent) }

    /// Takes every pending, unmasked port, as the guest's upcall handler does.
    public func takePendingEvents() -> [EventPort] {
        var ports: [EventPort] = []
        repeat {
            events.scanPending(vcpu: 0) { ports.append($0) }
        } while events.upcallPending(vcpu: 0)
        return ports
    }

    /// Waits until an event is pending or `timeout` passes, as a halted vCPU does: asleep
    /// until the hub raises the guest's upcall (which wakes it), not polling on a timer; returns
    /// the pending ports, empty on timeout.
    public func waitForEvents(timeout: Duration) -> [EventPort] {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        while true {
            // Reset before looking: an upcall after this point stores 1 again and the sleep
            // below returns at once (the scan's exchanges are full barriers after this store).
            upcalls.rearm()
            let ports = takePendingEvents()
            if !ports.isEmpty { return ports }
            let left = clock.now.duration(to: deadline)
            guard left > .zero else { return [] }
            let (seconds, attoseconds) = left.components
            upcalls.sleep(nanoseconds: seconds >= Int64.max / 1_000_000_000 - 1
                ? Int64.max : seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
        }
    }
}

/// The upcall hook's state, shared with the hub without a reference to the guest itself: how
/// many upcalls were raised, and the word a halted ``SimulatedGuest/waitForEvents(timeout:)``
/// sleeps on (a futex: 0 while nothing was raised since the sleeper looked).
private final class UpcallCounter: @unchecked Sendable {  // `word` is touched only through atomics and futex calls
    let count = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private let word: UnsafeMutablePointer<UInt32>

    init() {
        word = .allocate(capacity: 1)
        word.initialize(to: 0)
    }

    deinit { word.deallocate() }

    /// The hook: counts, marks the word, and wakes a sleeper if there is one (no system call
    /// when the guest is not halted).
    func raised() {
        count.add(1, ordering: .sequentiallyConsistent)
        vireo_store_release_u32(word, 1)
        vireo_fence_full()
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 { _ = vireo_futex_wake(word, Int32.max) }
    }

    func rearm() {
        vireo_store_release_u32(word, 0)
        vireo_fence_full()
    }

    /// Sleeps while no upcall was raised since ``rearm()``, at most `nanoseconds`.
    func sleep(nanoseconds: Int64) {
        sleepers.add(1, ordering: .sequentiallyConsistent)
        _ = vireo_futex_wait(word, 0, nanoseconds)
        sleepers.subtract(1, ordering: .sequentiallyConsistent)
    }
}
