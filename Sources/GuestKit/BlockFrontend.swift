#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// The frontend of a paravirtual block device (blkfront, `vireo/io/blkif.h`).
///
/// ``connect()`` does Xen's handshake: it waits for the backend's InitWait, allocates and
/// grants the one-page ring, offers an unbound event channel to the backend, writes
/// `ring-ref`, `event-channel`, `protocol` and state Initialised, waits for Connected and
/// reads `sectors`, `info`, `sector-size` and the features the backend offers
/// (`feature-flush-cache`, `feature-barrier`, `feature-discard`, `discard-granularity`,
/// `feature-max-indirect-segments`). Transfers grant their data pages to the backend for the
/// request's lifetime only: each grant is revoked when the response comes. A transfer of more
/// than 11 pages goes as one BLKIF_OP_INDIRECT request when the backend offers indirect
/// segments (its descriptors in a page of the slot's, granted read-only for that request).
/// Up to a ring's worth of requests are in flight; responses are matched by id alone.
/// One ring only: the backend's multi-queue offer is not taken.
public final class BlockFrontend<Platform: GuestPlatform> {
    public typealias Request = vireo_blkif_request
    public typealias Response = vireo_blkif_response

    public let guest: Guest<Platform>
    public let store: XenStoreClient<Platform>
    public let bus: XenbusFrontend<Platform>
    /// The guest's grant table; the frontend grants and revokes through it.
    public var grants: GuestGrants<Platform>
    /// Disk size in 512-byte sectors, once connected.
    public private(set) var sectors: UInt64 = 0
    /// The backend refuses writes.
    public private(set) var readOnly = false
    /// The backend accepts FLUSH_DISKCACHE.
    public private(set) var canFlush = false
    /// The backend accepts WRITE_BARRIER.
    public private(set) var canBarrier = false
    /// The backend accepts DISCARD; `discardGranularity` is its extent size in bytes.
    public private(set) var canDiscard = false
    public private(set) var discardGranularity: UInt64 = 0
    /// The logical sector size in bytes (`sector-size`; `sectors` still counts 512-byte units).
    public private(set) var sectorSize: UInt64 = 512
    /// Segments (pages) one request may carry: 11, or more with indirect segments (the
    /// backend's `feature-max-indirect-segments`, at most one indirect page's 512).
    public private(set) var maxSegments = Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)
    /// Grants a backend still held when their request completed (never expected).
    public private(set) var leakedGrants = 0

    var ring: FrontRing<Request, Response>?
    var ringRef = GrantRef(0)
    public private(set) var port = EventPort(0)

    /// Per slot, the page that holds an indirect request's descriptors (allocated at first use).
    var indirectPages: [UInt64] = []

    /// One in-flight request, by slot; the id carries the slot and a generation.
    struct Pending {
        var generation: UInt64
        var refs: [GrantRef]
        var done: Bool
        var status: Int16
    }
    var slots: [Pending] = []
    var nextGeneration: UInt64 = 1

    /// Opens device `device` (51712 is xvda) from the frontend node `device/vbd/<device>`.
    public init(guest: Guest<Platform>, store: XenStoreClient<Platform>, grants: GuestGrants<Platform>,
                device: UInt32 = 51712) throws(GuestError) {
        self.guest = guest
        self.store = store
        self.grants = grants
        let digits = String(decoding: Bytes.decimal(UInt64(device)), as: UTF8.self)
        bus = try XenbusFrontend(store: store, node: "device/vbd/" + digits)
    }

    /// Slots in the ring: the most requests in flight.
    public var ringSize: Int { ring?.size ?? 0 }

    /// Xen's handshake, up to Connected.
    public func connect() throws(GuestError) {
        let state = try bus.waitForBackend([.initWait, .connected, .closing, .closed])
        guard state == .initWait else { throw GuestError.EIO }
        let page = guest.platform.allocatePage()
        let region = guest.platform.memory(at: page, count: guestPageSize)
        do { ring = try FrontRing<Request, Response>(initializing: region) } catch { throw GuestError.EINVAL }
        guard let ref = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(page >> guestPageShift), readOnly: false) else {
            throw GuestError.ENOSPC
        }
        ringRef = ref
        port = try guest.allocUnbound(remote: bus.backendDomain)
        guest.setHandler(for: port) { _ in }
        slots = []
        indirectPages = []
        for _ in 0..<(ring?.size ?? 0) {
            slots.append(Pending(generation: 0, refs: [], done: true, status: 0))
            indirectPages.append(0)
        }
        try store.write(bus.node + "/ring-ref", Bytes.decimal(UInt64(ref.rawValue)))
        try store.write(bus.node + "/event-channel", Bytes.decimal(UInt64(port.rawValue)))
        try store.write(bus.node + "/protocol", Bytes.of("x86_64-abi"))
        try bus.switchState(.initialised)
        guard try bus.waitForBackend([.connected, .closing, .closed]) == .connected else { throw GuestError.EIO }
        guard let size = Bytes.decimal(XenStoreClient<Platform>.trimmed(try store.read(bus.backend + "/sectors"))) else {
            throw GuestError.EIO
        }
        sectors = size
        if let info = try? store.read(bus.backend + "/info"), let bits = Bytes.decimal(XenStoreClient<Platform>.trimmed(info)) {
            readOnly = bits & UInt64(VIREO_VDISK_READONLY) != 0
        }
        canFlush = flag("feature-flush-cache")
        canBarrier = flag("feature-barrier")
        canDiscard = flag("feature-discard")
        if let size = number("sector-size"), size == 512 || size == 4096 { sectorSize = size }
        discardGranularity = number("discard-granularity") ?? sectorSize
        if let most = number("feature-max-indirect-segments"), most > UInt64(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            let perPage = UInt64(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
            maxSegments = Int(most < perPage ? most : perPage)
        }
        try bus.switchState(.connected)
    }

    /// A backend node as a decimal number, nil when missing or not a number.
    func number(_ key: String) -> UInt64? {
        guard let bytes = try? store.read(bus.backend + "/" + key) else { return nil }
        return Bytes.decimal(XenStoreClient<Platform>.trimmed(bytes))
    }

    /// Whether a backend feature node says "1".
    func flag(_ key: String) -> Bool { number(key) == 1 }

    // MARK: Requests

    /// Queues one request: `count` sectors from disk sector `sector`, laid out from sector 0
    /// of `frames[0]` on (eight to a page, at most ``maxSegments`` pages: more than 11 go as one
    /// indirect request). Returns its id. Waits for a free slot when the ring is full.
    /// `operation` is a VIREO_BLKIF_OP_*: READ, WRITE, WRITE_BARRIER, or FLUSH_DISKCACHE (the
    /// last two also with no frames: a pure flush or barrier).
    public func submit(_ operation: Int32, sector: UInt64, frames: [GuestFrame], count: Int) throws(GuestError) -> UInt64 {
        guard ring != nil else { throw GuestError.EINVAL }
        let direct = Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)
        let isRW = operation == VIREO_BLKIF_OP_READ || operation == VIREO_BLKIF_OP_WRITE
        guard frames.count <= (isRW ? maxSegments : direct), count <= frames.count * 8,
              count > (frames.count - 1) * 8 || frames.isEmpty else { throw GuestError.EINVAL }
        let slot = try takeSlot()
        var request = Request()
        request.operation = UInt8(truncatingIfNeeded: operation)
        request.sector_number = sector
        var refs: [GrantRef] = []
        var left = count
        let readOnlyGrant = operation != VIREO_BLKIF_OP_READ
        let indirect = frames.count > direct
        let descriptors = indirect ? guest.platform.memory(at: try indirectPage(slot), count: guestPageSize) : nil
        for (i, frame) in frames.enumerated() {
            guard let ref = grants.grantAccess(to: bus.backendDomain, frame: frame, readOnly: readOnlyGrant) else {
                for r in refs { _ = grants.endAccess(r) }
                throw GuestError.ENOSPC
            }
            refs.append(ref)
            let n = left < 8 ? left : 8
            left -= n
            if let descriptors {
                var segment = vireo_blkif_request_segment()
                segment.gref = ref.rawValue
                segment.first_sect = 0
                segment.last_sect = UInt8(n - 1)
                descriptors.store(segment, at: i * MemoryLayout<vireo_blkif_request_segment>.stride)
            } else {
                request.setSegment(i, gref: ref.rawValue, firstSector: 0, lastSector: UInt8(n - 1))
            }
        }
        if indirect {
            // The descriptors are written before the page is granted, and the grant before the
            // request is published: the backend copies them once and never sees a half list.
            let page = GuestFrame(indirectPages[slot] >> guestPageShift)
            guard let listRef = grants.grantAccess(to: bus.backendDomain, frame: page, readOnly: true) else {
                for r in refs { _ = grants.endAccess(r) }
                throw GuestError.ENOSPC
            }
            refs.append(listRef)
            var outer = vireo_blkif_request_indirect()
            outer.operation = UInt8(VIREO_BLKIF_OP_INDIRECT)
            outer.indirect_op = UInt8(truncatingIfNeeded: operation)
            outer.nr_segments = UInt16(frames.count)
            outer.sector_number = sector
            outer.indirect_grefs.0 = listRef.rawValue
            withUnsafeMutableBytes(of: &request) { $0.storeBytes(of: outer, as: vireo_blkif_request_indirect.self) }
        } else {
            request.nr_segments = UInt8(frames.count)
            request.handle = 0
        }
        return try publish(&request, slot: slot, refs: refs)
    }

    /// Queues a DISCARD of `count` sectors (512-byte units) from `sector`; returns its id.
    public func submitDiscard(sector: UInt64, count: UInt64) throws(GuestError) -> UInt64 {
        guard ring != nil else { throw GuestError.EINVAL }
        guard canDiscard else { throw GuestError.ENOSYS }
        let slot = try takeSlot()
        var discard = vireo_blkif_request_discard()
        discard.operation = UInt8(VIREO_BLKIF_OP_DISCARD)
        discard.flag = 0
        discard.sector_number = sector
        discard.nr_sectors = count
        var request = Request()
        withUnsafeMutableBytes(of: &request) { $0.storeBytes(of: discard, as: vireo_blkif_request_discard.self) }
        return try publish(&request, slot: slot, refs: [])
    }

    /// The page for slot `slot`'s indirect descriptors, allocated at its first use.
    func indirectPage(_ slot: Int) throws(GuestError) -> UInt64 {
        if indirectPages[slot] == 0 { indirectPages[slot] = guest.platform.allocatePage() }
        return indirectPages[slot]
    }

    /// Waits for a free ring slot and a free request slot; returns the latter.
    func takeSlot() throws(GuestError) -> Int {
        while ring!.freeRequests == 0 {
            try collect()
            if ring!.freeRequests == 0 { try waitForResponses() }
        }
        // A slot is free once its result was taken by wait(): more than a ring's worth of
        // requests whose results nobody took is the caller's error.
        var slot = 0
        while slot < slots.count && slots[slot].generation != 0 { slot += 1 }
        guard slot < slots.count else { throw GuestError.EBUSY }
        return slot
    }

    /// Gives `request` its id (slot and generation), records it and publishes it.
    func publish(_ request: inout Request, slot: Int, refs: [GrantRef]) throws(GuestError) -> UInt64 {
        let generation = nextGeneration
        nextGeneration &+= 1
        let id = generation << 8 | UInt64(slot)
        request.id = id  // at offset 8 in every request layout
        slots[slot] = Pending(generation: generation, refs: refs, done: false, status: 0)
        do { try ring!.produceRequest(request) } catch { throw GuestError.EIO }
        if ring!.pushRequestsAndCheckNotify() { try guest.send(port) }
        return id
    }

    /// Takes every published response: revokes its grants and records its status.
    func collect() throws(GuestError) {
        guard ring != nil else { return }
        while true {
            let response: Response?
            do { response = try ring!.consumeResponse() } catch { throw GuestError.EIO }
            guard let response else { return }
            let slot = Int(response.id & 0xff)
            // A response for no request of ours (a confused or hostile backend) is dropped.
            guard slot < slots.count, !slots[slot].done, slots[slot].generation == response.id >> 8 else { continue }
            for ref in slots[slot].refs where !grants.endAccess(ref) { leakedGrants += 1 }
            slots[slot].refs = []
            slots[slot].done = true
            slots[slot].status = response.status
        }
    }

    /// Sleeps in the guest's loop until the backend may have answered.
    func waitForResponses() throws(GuestError) {
        let more: Bool
        do { more = try ring!.finalCheckForResponses() } catch { throw GuestError.EIO }
        if !more { guest.runOnce() }
    }

    /// Waits for request `id`; returns its BLKIF_RSP_* status and frees its slot.
    public func wait(_ id: UInt64) throws(GuestError) -> Int16 {
        let slot = Int(id & 0xff)
        guard slot < slots.count, slots[slot].generation == id >> 8 else { throw GuestError.EINVAL }
        while true {
            try collect()
            if slots[slot].done { break }
            try waitForResponses()
        }
        let status = slots[slot].status
        slots[slot].generation = 0
        return status
    }

    /// Whether request `id` has completed (without waiting; ``wait(_:)`` still takes its result).
    public func isDone(_ id: UInt64) throws(GuestError) -> Bool {
        try collect()
        let slot = Int(id & 0xff)
        return slot < slots.count && slots[slot].generation == id >> 8 && slots[slot].done
    }

    // MARK: Synchronous helpers

    func check(_ status: Int16) throws(GuestError) {
        if status == Int16(VIREO_BLKIF_RSP_EOPNOTSUPP) { throw GuestError.ENOSYS }
        if status != Int16(VIREO_BLKIF_RSP_OKAY) { throw GuestError.EIO }
    }

    /// Reads `count` sectors from `sector` into `frames`.
    public func read(sector: UInt64, count: Int, into frames: [GuestFrame]) throws(GuestError) {
        try check(try wait(try submit(VIREO_BLKIF_OP_READ, sector: sector, frames: frames, count: count)))
    }

    /// Writes `count` sectors from `frames` at `sector`.
    public func write(sector: UInt64, count: Int, from frames: [GuestFrame]) throws(GuestError) {
        try check(try wait(try submit(VIREO_BLKIF_OP_WRITE, sector: sector, frames: frames, count: count)))
    }

    /// Makes every completed write durable.
    public func flush() throws(GuestError) {
        guard canFlush else { throw GuestError.ENOSYS }
        try check(try wait(try submit(VIREO_BLKIF_OP_FLUSH_DISKCACHE, sector: 0, frames: [], count: 0)))
    }

    /// Writes `count` sectors from `frames` at `sector` as a barrier: after every earlier
    /// write, before every later one, durable when it returns. No frames: a pure barrier.
    public func writeBarrier(sector: UInt64, count: Int, from frames: [GuestFrame]) throws(GuestError) {
        guard canBarrier else { throw GuestError.ENOSYS }
        try check(try wait(try submit(VIREO_BLKIF_OP_WRITE_BARRIER, sector: sector, frames: frames, count: count)))
    }

    /// Tells the backend `count` sectors from `sector` are no longer needed (they may then
    /// read as zeros). Both should be multiples of ``sectorSize`` in 512-byte units.
    public func discard(sector: UInt64, count: UInt64) throws(GuestError) {
        try check(try wait(try submitDiscard(sector: sector, count: count)))
    }

    /// Closes the device: Closing, wait for the backend to follow, Closed; the ring grant is
    /// revoked once the backend has unmapped it.
    public func disconnect() throws(GuestError) {
        try bus.switchState(.closing)
        _ = try bus.waitForBackend([.closing, .closed])
        try bus.switchState(.closed)
        _ = try bus.waitForBackend([.closed])
        if ring != nil {
            if !grants.endAccess(ringRef) { leakedGrants += 1 }
            ring = nil
        }
        guest.removeHandler(for: port)
        try? guest.close(port)
    }
}
