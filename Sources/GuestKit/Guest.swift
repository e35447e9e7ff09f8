#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// One guest's view of the hypervisor: the platform, a scratch page for hypercall arguments,
/// shared_info once mapped, the event handlers and the tasks of the cooperative loop. Every
/// GuestKit frontend holds one. Single-threaded: handlers and tasks run from ``runOnce()``.
public final class Guest<Platform: GuestPlatform> {
    public let platform: Platform
    let scratchAddress: UInt64
    let scratch: SharedRegion
    /// shared_info, after ``mapSharedInfo(at:)``.
    public private(set) var sharedInfo: SharedRegion?
    /// Its guest-physical address.
    var sharedInfoAddress: UInt64 = 0
    /// The upcall vector, once ``enableUpcalls()`` set it.
    public private(set) var upcallVector: UInt8?
    var events: GuestEventState?
    /// Handlers by port number (a small table grown on demand: no Dictionary in a guest).
    var handlers: [((EventPort) -> Void)?] = []
    /// Events that arrived on ports without a handler, until ``takeUnhandled()``.
    var unhandled: [EventPort] = []
    var tasks: [() -> Bool] = []

    public init(platform: Platform) {
        self.platform = platform
        scratchAddress = platform.allocatePage()
        scratch = platform.memory(at: scratchAddress, count: guestPageSize)
    }

    /// A frame above the domain's RAM, free for the special pages GuestKit places (shared_info
    /// at `+0`, grant frames after it), as Xen's own guests put them in the hole above RAM.
    public func frameAboveRAM(_ offset: UInt64) throws(GuestError) -> GuestFrame {
        GuestFrame(try currentReservation() + 16 + offset)
    }

    // MARK: shared_info and time

    /// Places shared_info at `frame` (XENMEM_add_to_physmap) and starts using its event bits.
    @discardableResult
    public func mapSharedInfo(at frame: GuestFrame? = nil) throws(GuestError) -> SharedRegion {
        var place = GuestFrame(0)
        if let frame { place = frame } else { place = try frameAboveRAM(0) }
        try addToPhysmap(space: VIREO_XENMAPSPACE_shared_info, index: 0, at: place)
        let region = platform.memory(at: place.rawValue << guestPageShift, count: guestPageSize)
        sharedInfo = region
        sharedInfoAddress = place.rawValue << guestPageShift
        events = GuestEventState(sharedInfo: region)
        return region
    }

    func requireSharedInfo() -> SharedRegion {
        guard let sharedInfo else { fatalError("GuestKit: map shared_info first (Guest.mapSharedInfo)") }
        return sharedInfo
    }

    /// System time in nanoseconds since the domain booted, from vCPU 0's pvclock record
    /// (a seqlock: read until the version is even and unchanged).
    public func systemTime() -> UInt64 {
        let info = requireSharedInfo()
        let time = 32  // vcpu_info[0].time
        while true {
            let version = info.loadAcquire32(at: time)
            Barrier.read()
            let stamp = info.load(UInt64.self, at: time + 8)
            let system = info.load(UInt64.self, at: time + 16)
            let mul = info.load(UInt32.self, at: time + 24)
            let shift = info.load(Int8.self, at: time + 28)
            Barrier.read()
            guard version & 1 == 0, version == info.loadAcquire32(at: time) else { continue }
            var delta = platform.timestampCounter() &- stamp
            delta = shift >= 0 ? delta << UInt64(shift) : delta >> UInt64(-Int(shift))
            let product = delta.multipliedFullWidth(by: UInt64(mul))
            return system &+ (product.high << 32 | product.low >> 32)
        }
    }

    /// The wall-clock time at boot (seconds and nanoseconds since 1970) from shared_info.
    public func wallclockAtBoot() -> (seconds: UInt64, nanoseconds: UInt32) {
        let info = requireSharedInfo()
        while true {
            let version = info.loadAcquire32(at: 3072)
            Barrier.read()
            let low = info.load(UInt32.self, at: 3076)
            let nanoseconds = info.load(UInt32.self, at: 3080)
            let high = info.load(UInt32.self, at: 3084)
            Barrier.read()
            if version & 1 == 0 && version == info.loadAcquire32(at: 3072) {
                return (UInt64(high) << 32 | UInt64(low), nanoseconds)
            }
        }
    }

    /// The wall-clock time now, in nanoseconds since 1970.
    public func wallclock() -> UInt64 {
        let boot = wallclockAtBoot()
        return boot.seconds &* 1_000_000_000 &+ UInt64(boot.nanoseconds) &+ systemTime()
    }

    // MARK: Event channels

    /// Runs `handler` from the loop each time `port` fires (replacing any earlier one).
    public func setHandler(for port: EventPort, _ handler: @escaping (EventPort) -> Void) {
        let index = Int(port.rawValue)
        if handlers.count <= index { handlers.append(contentsOf: repeatElement(nil, count: index + 1 - handlers.count)) }
        handlers[index] = handler
    }

    public func removeHandler(for port: EventPort) {
        let index = Int(port.rawValue)
        if index < handlers.count { handlers[index] = nil }
    }

    /// Ports that fired with no handler since the last call.
    public func takeUnhandled() -> [EventPort] {
        let ports = unhandled
        unhandled = []
        return ports
    }

    /// The upcall entry, called from the loop (or an interrupt stub's deferred work): takes
    /// every pending, unmasked port of vCPU 0 and runs its handler. Returns how many fired.
    @discardableResult
    public func dispatchEvents() -> Int {
        guard let events else { return 0 }
        var fired: [EventPort] = []
        events.scanPending(vcpu: 0) { fired.append($0) }
        for port in fired {
            let index = Int(port.rawValue)
            if index < handlers.count, let handler = handlers[index] {
                handler(port)
            } else {
                unhandled.append(port)
            }
        }
        return fired.count
    }

    /// Asks for events as an interrupt, the way Xen's HVM guests take them: points the
    /// platform's upcall entry at vCPU 0's `evtchn_upcall_pending` and sets
    /// HVM_PARAM_CALLBACK_IRQ to its vector (type 2: no EOI). From then on the loop sleeps
    /// by halting until the upcall comes instead of in SCHEDOP_block; handlers still run
    /// from the loop, never in the interrupt. False (nothing changed) where the platform
    /// takes no interrupts, as in host tests. Map shared_info first.
    @discardableResult
    public func enableUpcalls() throws(GuestError) -> Bool {
        _ = requireSharedInfo()
        guard let vector = platform.installUpcallEntry(acknowledging: sharedInfoAddress) else { return false }
        let callback = UInt64(VIREO_HVM_PARAM_CALLBACK_TYPE_VECTOR) << 56 | UInt64(vector)
        try setHVMParam(VIREO_HVM_PARAM_CALLBACK_IRQ, callback)
        upcallVector = vector
        return true
    }

    /// Upcall interrupts taken so far (0 unless ``enableUpcalls()`` succeeded).
    public var upcalls: UInt64 { platform.upcallCount() }

    /// Sleeps until an event is pending: halting until the upcall once upcalls are enabled,
    /// else SCHEDOP_block.
    public func waitForEvent() {
        if upcallVector != nil { platform.waitForUpcall(pending: sharedInfoAddress) } else { block() }
    }

    public func mask(_ port: EventPort) { events?.mask(port) }

    /// Unmasks `port`, asking the hypervisor to re-raise it when it fired while masked.
    public func unmask(_ port: EventPort) throws(GuestError) {
        guard let events else { return }
        if events.unmask(port) { try unmaskHypercall(port) }
    }

    // MARK: The cooperative loop

    /// Adds a task the loop runs on every pass until it returns true (done). A task that is
    /// not done waits for events: the loop blocks when no task finished and no event fired.
    public func addTask(_ task: @escaping () -> Bool) { tasks.append(task) }

    /// One pass: dispatch pending events, run the tasks; when nothing happened and `block`,
    /// sleep until an event is pending (``waitForEvent()``). Returns whether anything happened.
    @discardableResult
    public func runOnce(block: Bool = true) -> Bool {
        var progress = dispatchEvents() > 0
        if !tasks.isEmpty {
            let running = tasks
            tasks = []
            var kept: [() -> Bool] = []
            for task in running {
                if task() { progress = true } else { kept.append(task) }
            }
            tasks = kept + tasks  // with those added while running
        }
        if !progress && block { waitForEvent() }
        return progress
    }

    /// Runs the loop until `done()` holds (checked before each pass).
    public func run(until done: () -> Bool) {
        while !done() { runOnce() }
    }

    /// Runs the loop until every task has finished.
    public func runTasks() {
        while !tasks.isEmpty { runOnce() }
    }
}
