import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoLinux
import VireoStore

/// A setup error of a backend, naming what is wrong.
public struct BackendError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// blkback over a raw image file: one virtual block device (vbd) of one frontend domain.
///
/// Wiring (Xen's): ``create()`` writes the toolstack's nodes, the backend directory
/// `/local/domain/0/backend/vbd/<domid>/<devid>` (frontend, frontend-id, mode, params,
/// sectors, info, sector-size, the feature nodes, state) and the frontend directory
/// `/local/domain/<domid>/device/vbd/<devid>` (backend, backend-id, virtual-device,
/// device-type, state), the latter owned by the frontend. ``run()`` then watches the frontend's
/// state: on Initialised (or Connected) it reads the ring(s) — `ring-ref` and `event-channel`,
/// or `queue-N/ring-ref` and `queue-N/event-channel` for `multi-queue-num-queues` > 1 — maps
/// each one-page ring, binds each event channel and enters Connected; on Closing/Closed it
/// disconnects.
///
/// Requests are copied out of the ring once and validated on the copy; their data pages are
/// mapped for the duration of one `preadv`/`pwritev` between them and the file (no bounce
/// buffer), and indirect segment pages are grant-copied into a host buffer once and validated
/// there. READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, DISCARD and INDIRECT are served. A bad
/// request gets BLKIF_RSP_ERROR (EOPNOTSUPP for an operation or flag not offered) and the ring
/// carries on; a ring whose producer index is out of range is disconnected (Closing).
///
/// Threads: ``run()`` (the control loop: XenStore, state, connection) and one per ring while
/// Connected. A ring's thread takes each request in turn, does its I/O synchronously and
/// publishes responses as it goes, so rings run in parallel and a frontend keeps up to a
/// ring's worth of requests queued per ring; within a ring requests complete in order, which
/// is also what makes WRITE_BARRIER's "after every earlier write" hold.
public final class BlockBackend: BackendService, @unchecked Sendable {  // run() owns the mutable state; stop() only touches atomics and the pipe
    public typealias Request = vireo_blkif_request
    public typealias Response = vireo_blkif_response

    public let frontend: DomainID
    public let device: UInt32
    /// The disk's size in 512-byte units (Xen's `sectors`, whatever the logical sector size).
    public let sectors: UInt64
    public let readOnly: Bool
    /// The logical sector size (`sector-size`): 512 or 4096. I/O must be aligned to it.
    public let sectorSize: Int
    /// Rings the backend serves at most (`multi-queue-max-queues`).
    public let maxQueues: Int
    /// Segments one BLKIF_OP_INDIRECT request may carry (`feature-max-indirect-segments`).
    public let maxIndirectSegments: Int
    /// Bytes per discardable extent (`discard-granularity`): the file system's block size,
    /// at least the sector size.
    public let discardGranularity: Int
    public let backendPath: String
    public let frontendPath: String
    public var name: String { "vbd-\(device)" }

    private let store: XenStore
    private let grants: GrantTables
    private let host: HostEventDomain
    private let fd: Int32
    private let wake: WakePipe
    private let stopping = Atomic<Bool>(false)
    private let indirectPagesPerRequest: Int
    /// The disk's grant table of the frontend, set while Connected (before the queues' threads
    /// start, cleared after they end).
    private var table: GrantTable?
    /// A queue's thread found its ring broken: the control loop disconnects (`brokenRing` text).
    private let ringBroken = Flag(false)
    private let brokenRing = Mutex<String?>(nil)

    /// Indirect pages a request may name, given ``maxIndirectSegments``.
    private var maxIndirectPages: Int {
        (maxIndirectSegments + Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME) - 1) / Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
    }

    /// Counters, for tests and diagnostics.
    public struct Statistics: Sendable, Equatable {
        public var requests = 0
        public var errors = 0
        public var notifications = 0
        public var flushes = 0
        public var connections = 0
        public var barriers = 0
        public var discards = 0
        public var indirect = 0
        /// Times the service loop found requests waiting (each batch is answered with one push
        /// and at most one notification per queue).
        public var batches = 0
    }
    private let counters = Counters()
    public var statistics: Statistics { counters.snapshot() }

    /// The state the backend last published.
    public var state: UInt32 { published.load(ordering: .acquiring) }
    private let published = Atomic<UInt32>(0)
    /// Why the last connection failed or was dropped, if it was.
    public var lastFailure: String? { failure.withLock { $0 } }
    private let failure = Mutex<String?>(nil)
    /// Rings connected now (0 when not Connected).
    public var queueCount: Int { connectedQueues.load(ordering: .acquiring) }
    private let connectedQueues = Atomic<Int>(0)

    /// One ring (queue) of the connection, served by a thread of its own (as Xen's blkback
    /// runs a kernel thread per ring): its event channel wakes that thread only, and it owns
    /// the buffers its requests use.
    private final class Queue: @unchecked Sendable {  // ring and scratch: the queue's thread only
        let index: Int
        let mapping: MappingBox
        var ring: BackRing<Request, Response>
        let port: EventPort
        let wake: WakePipe
        let scratch: Scratch
        let stopping = Atomic<Bool>(false)
        let finished = Atomic<Bool>(false)
        init(index: Int, mapping: MappingBox, ring: BackRing<Request, Response>, port: EventPort, wake: WakePipe,
             scratch: Scratch) {
            self.index = index
            self.mapping = mapping
            self.ring = ring
            self.port = port
            self.wake = wake
            self.scratch = scratch
        }
    }
    private final class MappingBox: @unchecked Sendable {  // GrantMapping is Sendable; the box is only read
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }
    private var queues: [Queue] = []
    /// The backend's XenStore requests go through `session`, whose replies wake nobody; the
    /// frontend's state watch lives on `watcher`, whose events wake the service loop and set
    /// `frontendChanged`. (One session for both made every reply wake the loop, which then read
    /// the state again: the loop never slept.)
    private var session: XenStoreConnection?
    private var watcher: XenStoreConnection?
    private let frontendChanged = Flag(true)
    private final class Flag: Sendable {
        let value: Atomic<Bool>
        init(_ initial: Bool) { value = Atomic(initial) }
    }

    /// Opens `path` (read-write unless `readOnly`) for device `device` (51712 = xvda) of domain
    /// `frontend`. The image's size is rounded down to whole sectors of `sectorSize` (512 or
    /// 4096 bytes). `maxQueues` (1...16) rings and indirect requests of up to
    /// `maxIndirectSegments` (11...4096) segments are offered.
    /// - Throws: ``BackendError`` naming the file when it cannot be opened or is empty, or the
    ///   option that is out of range.
    public init(path: String, readOnly: Bool, frontend: DomainID, device: UInt32 = 51712, sectorSize: Int = 512,
                maxQueues: Int = 4, maxIndirectSegments: Int = 256,
                store: XenStore, grants: GrantTables, host: HostEventDomain) throws(BackendError) {
        guard sectorSize == 512 || sectorSize == 4096 else {
            throw BackendError("sector size \(sectorSize): only 512 and 4096 are served")
        }
        guard (1...16).contains(maxQueues) else { throw BackendError("max queues \(maxQueues): 1...16") }
        guard (Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)...4096).contains(maxIndirectSegments) else {
            throw BackendError("max indirect segments \(maxIndirectSegments): 11...4096")
        }
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else {
            throw BackendError("cannot open the disk image '\(path)': \(String(cString: strerror(errno)))")
        }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw BackendError("the disk image '\(path)' is not a regular file")
        }
        let sectors = UInt64(info.st_size) / UInt64(sectorSize) * UInt64(sectorSize / 512)
        guard sectors > 0 else {
            close(fd)
            throw BackendError("the disk image '\(path)' is smaller than one \(sectorSize)-byte sector")
        }
        let wake: WakePipe
        do { wake = try WakePipe(for: "block backend") } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.sectors = sectors
        self.readOnly = readOnly
        self.sectorSize = sectorSize
        self.maxQueues = maxQueues
        self.maxIndirectSegments = maxIndirectSegments
        let block = Int(info.st_blksize)
        discardGranularity = block >= sectorSize && block <= 1 << 20 && block & (block - 1) == 0 ? block : sectorSize
        self.frontend = frontend
        self.device = device
        self.store = store
        self.grants = grants
        self.host = host
        self.wake = wake
        backendPath = "/local/domain/\(host.id.rawValue)/backend/vbd/\(frontend.rawValue)/\(device)"
        frontendPath = "/local/domain/\(frontend.rawValue)/device/vbd/\(device)"
        let pages = (maxIndirectSegments + Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME) - 1) / Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
        indirectPagesPerRequest = pages
    }

    deinit {
        close(fd)
    }

    // MARK: XenStore

    private func storeRequest(_ type: XenStoreMessageType, _ payload: [UInt8]) throws(BackendError) -> [UInt8] {
        guard let session else { throw BackendError("no XenStore session") }
        let reply = store.request(XenStoreMessage(type: type, payload: payload), from: session)
        guard let reply, reply.type == type else {
            let text = reply.map { String(decoding: $0.payload.prefix { $0 != 0 }, as: UTF8.self) } ?? "no reply"
            throw BackendError("XenStore \(type) \(String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self)): \(text)")
        }
        return reply.payload
    }

    private func write(_ path: String, _ value: String) throws(BackendError) {
        _ = try storeRequest(.write, Array(path.utf8) + [0] + Array(value.utf8))
    }

    private func setPermissions(_ path: String, _ permissions: [String]) throws(BackendError) {
        var payload = Array(path.utf8) + [0]
        for p in permissions { payload += Array(p.utf8) + [0] }
        _ = try storeRequest(.setPermissions, payload)
    }

    /// A frontend node's value, or nil when it is missing (or unreadable).
    private func read(_ path: String) -> String? {
        guard let bytes = try? storeRequest(.read, Array(path.utf8) + [0]) else { return nil }
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    private func readNumber(_ path: String) -> UInt64? {
        guard let text = read(path), !text.isEmpty, text.utf8.count <= 19,
              text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
        return UInt64(text)
    }

    private func publish(state: UInt32) throws(BackendError) {
        try write(backendPath + "/state", "\(state)")
        published.store(state, ordering: .releasing)
    }

    /// The backend's nodes, in the order they are written: the toolstack's, the size, then
    /// every feature the backend serves (Xen's names and defaults).
    public var backendNodes: [(key: String, value: String)] {
        [("frontend", frontendPath), ("frontend-id", "\(frontend.rawValue)"), ("mode", readOnly ? "r" : "w"),
         ("params", "image"), ("type", "file"), ("online", "1"),
         ("sectors", "\(sectors)"), ("info", readOnly ? "\(VIREO_VDISK_READONLY)" : "0"),
         ("sector-size", "\(sectorSize)"), ("physical-sector-size", "\(sectorSize)"),
         ("feature-flush-cache", "1"), ("feature-barrier", "1"),
         ("feature-discard", "1"), ("discard-granularity", "\(discardGranularity)"), ("discard-alignment", "0"),
         ("discard-secure", "0"),
         ("feature-max-indirect-segments", "\(maxIndirectSegments)"),
         ("multi-queue-max-queues", "\(maxQueues)"), ("max-ring-page-order", "0")]
    }

    /// Writes the toolstack's nodes and the backend's features, and enters InitWait. Call
    /// once, before the frontend starts looking (before the guest boots).
    public func create() throws(BackendError) {
        let wake = self.wake, changed = frontendChanged
        session = store.connect(domain: host.id)
        watcher = store.connect(domain: host.id, wake: {
            changed.value.store(true, ordering: .releasing)
            wake.kick()
        })
        let front = frontend.rawValue, back = host.id.rawValue
        // The backend directory: dom0's, readable by the frontend. The frontend directory: the
        // frontend's own, readable by the backend. Each node gets its permissions explicitly.
        let backendPermissions = ["n\(back)", "r\(front)"], frontendPermissions = ["n\(front)", "r\(back)"]
        _ = try storeRequest(.mkdir, Array(backendPath.utf8) + [0])
        try setPermissions(backendPath, backendPermissions)
        for (key, value) in backendNodes + [("state", "\(XenbusBackendState.initialising)")] {
            try write(backendPath + "/" + key, value)
            try setPermissions(backendPath + "/" + key, backendPermissions)
        }
        _ = try storeRequest(.mkdir, Array(frontendPath.utf8) + [0])
        try setPermissions(frontendPath, frontendPermissions)
        for (key, value) in [("backend", backendPath), ("backend-id", "\(back)"), ("virtual-device", "\(device)"),
                             ("device-type", "disk"), ("state", "\(XenbusBackendState.initialising)")] {
            try write(frontendPath + "/" + key, value)
            try setPermissions(frontendPath + "/" + key, frontendPermissions)
        }
        let watch = XenStoreMessage(type: .watch, payload: Array((frontendPath + "/state").utf8) + [0] + Array("vbd-front".utf8) + [0])
        guard let watcher, store.request(watch, from: watcher)?.type == .watch else {
            throw BackendError("XenStore watch \(frontendPath)/state refused")
        }
        try publish(state: XenbusBackendState.initWait)
    }

    // MARK: Running

    /// Makes ``run()`` return soon.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Serves the device until ``stop()``: follows the frontend's state on the caller's thread
    /// (the control loop); while Connected each ring is served by a thread of its own, started
    /// at connection and joined at disconnection. Call ``create()`` first.
    public func run() {
        var idle = 0
        while !stopping.load(ordering: .acquiring) {
            // The frontend's state is read when its watch fired (and, as a safety net, every
            // second of quiet), not on every ring event.
            if frontendChanged.value.exchange(false, ordering: .acquiringAndReleasing) || idle >= 10 {
                _ = watcher?.takeMessages()  // the events only say "look again"; the queue stays empty
                followFrontend()
                idle = 0
            }
            if ringBroken.value.exchange(false, ordering: .acquiringAndReleasing), !queues.isEmpty {
                fail(brokenRing.withLock { $0 } ?? "\(frontendPath): ring protocol error")
            }
            if stopping.load(ordering: .acquiring) { break }
            idle = wake.wait(milliseconds: 100) ? 0 : idle + 1
        }
        disconnect()
        if let session { store.disconnect(session) }
        if let watcher { store.disconnect(watcher) }
        session = nil
        watcher = nil
    }

    /// Reacts to the frontend's state (level-triggered: read on every wake).
    private func followFrontend() {
        guard session != nil else { return }
        let front = readNumber(frontendPath + "/state").map { UInt32(truncatingIfNeeded: $0) } ?? 0
        let mine = state
        switch front {
        case XenbusBackendState.initialised, XenbusBackendState.connected:
            if queues.isEmpty && mine == XenbusBackendState.initWait { connect() }
        case XenbusBackendState.closing:
            if mine != XenbusBackendState.closing && mine != XenbusBackendState.closed {
                disconnect()
                try? publish(state: XenbusBackendState.closing)
            }
        case XenbusBackendState.closed:
            if mine != XenbusBackendState.closed {
                disconnect()
                try? publish(state: XenbusBackendState.closed)
            }
        case XenbusBackendState.initialising:
            // A frontend starting again after Closed: offer the device anew.
            if mine == XenbusBackendState.closed { try? publish(state: XenbusBackendState.initWait) }
        default: break
        }
    }

    private func fail(_ text: String) {
        failure.withLock { $0 = text }
        disconnect()
        try? publish(state: XenbusBackendState.closing)
    }

    private func connect() {
        if let text = read(frontendPath + "/protocol"), text != "x86_64-abi" {
            return fail("\(frontendPath)/protocol: '\(text)' is not x86_64-abi")
        }
        if read(frontendPath + "/ring-page-order") != nil {
            guard let order = readNumber(frontendPath + "/ring-page-order"), order == 0 else {
                return fail("\(frontendPath)/ring-page-order: not 0 (only one-page rings are served)")
            }
        }
        // Xen's multi-queue: absent means one ring with its keys at the top; 1...max rings,
        // and with more than one each ring's keys live under queue-<n>.
        var count = 1
        if read(frontendPath + "/multi-queue-num-queues") != nil {
            guard let n = readNumber(frontendPath + "/multi-queue-num-queues"), n >= 1, n <= UInt64(maxQueues) else {
                return fail("\(frontendPath)/multi-queue-num-queues: not a number in 1...\(maxQueues) (multi-queue-max-queues)")
            }
            count = Int(n)
        }
        guard let table = grants.table(for: frontend) else { return fail("domain \(frontend.rawValue) has no grant table") }
        self.table = table
        var opened: [Queue] = []
        for index in 0..<count {
            let directory = count == 1 ? frontendPath : frontendPath + "/queue-\(index)"
            guard let ref = readNumber(directory + "/ring-ref"), ref <= UInt64(UInt32.max) else {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(directory)/ring-ref: missing or not a grant reference")
            }
            guard let channel = readNumber(directory + "/event-channel"), channel <= UInt64(UInt32.max) else {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(directory)/event-channel: missing or not a port")
            }
            let box: MappingBox
            do {
                box = MappingBox(try table.map(GrantRef(UInt32(ref)), by: host.id, readOnly: false))
            } catch {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(directory)/ring-ref \(ref): cannot map: \(error)")
            }
            let ring: BackRing<Request, Response>
            do {
                ring = try BackRing<Request, Response>(attaching: try box.mapping.sharedRegion())
            } catch {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(directory)/ring-ref \(ref): not a blkif ring: \(error)")
            }
            let wake: WakePipe
            do { wake = try WakePipe(for: "block backend queue \(index)") } catch {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(error)")
            }
            let port: EventPort
            do {
                port = try host.bindInterdomain(remoteDomain: frontend, remotePort: EventPort(UInt32(channel))) { _ in
                    wake.kick()
                }
            } catch {
                for queue in opened { try? host.close(queue.port) }
                return fail("\(directory)/event-channel \(channel): cannot bind: \(error)")
            }
            opened.append(Queue(index: index, mapping: box, ring: ring, port: port, wake: wake,
                                scratch: Scratch(segments: maxIndirectSegments, indirectPages: indirectPagesPerRequest)))
        }
        queues = opened
        for queue in opened {
            ServiceThread.start(name: "blkback-\(frontend.rawValue)-q\(queue.index)") { [self] in serve(queue) }
        }
        connectedQueues.store(opened.count, ordering: .releasing)
        counters.connections.add(1, ordering: .relaxed)
        failure.withLock { $0 = nil }
        do { try publish(state: XenbusBackendState.connected) } catch { fail("\(error)") }
    }

    /// Stops the queues' threads (each finishes the request it is serving), then closes the
    /// ports and unmaps the rings.
    private func disconnect() {
        for queue in queues {
            queue.stopping.store(true, ordering: .releasing)
            queue.wake.kick()
        }
        for queue in queues {
            while !queue.finished.load(ordering: .acquiring) { usleep(200) }
            try? host.close(queue.port)
        }
        queues = []  // the mappings end with the boxes
        table = nil
        connectedQueues.store(0, ordering: .releasing)
    }

    /// A queue's thread: serves its ring until the queue stops or its ring breaks the protocol.
    private func serve(_ queue: Queue) {
        while !queue.stopping.load(ordering: .acquiring) {
            guard serveRing(queue) else { break }
            if queue.stopping.load(ordering: .acquiring) { break }
            queue.wake.wait(milliseconds: 100)
        }
        queue.finished.store(true, ordering: .releasing)
    }

    /// Serves every request pending on one ring. Responses are published every
    /// ``pushEvery`` requests and when no request is left, so the frontend can refill slots
    /// while the backend works on the rest of the batch (the backend does not run dry waiting
    /// for a whole batch's round trip), without a push and a possible notification per
    /// request; a notification is sent only when the frontend asked for one (`rsp_event`), and
    /// the final check before sleeping catches requests that raced with it. A frontend that
    /// keeps the ring full cannot hold the thread: it stops between requests when asked.
    /// Returns false when the ring broke the protocol (reported to the control loop, which
    /// disconnects the device).
    private func serveRing(_ queue: Queue) -> Bool {
        do {
            while !queue.stopping.load(ordering: .relaxed) {
                var served = 0, errors = 0, notified = 0
                while !queue.stopping.load(ordering: .relaxed), let request = try queue.ring.consumeRequest() {
                    let (status, operation) = handle(request, queue.scratch)
                    try queue.ring.produceResponse { slot in
                        slot.set(\.id, to: request.id)
                        slot.set(\.operation, to: operation)
                        slot.set(\.status, to: status)
                    }
                    served += 1
                    if status != Int16(VIREO_BLKIF_RSP_OKAY) { errors += 1 }
                    if served % Self.pushEvery == 0, queue.ring.pushResponsesAndCheckNotify() {
                        notified += 1
                        try? host.send(queue.port)
                    }
                }
                if queue.ring.pushResponsesAndCheckNotify() {
                    notified += 1
                    try? host.send(queue.port)
                }
                if served > 0 {
                    counters.requests.add(served, ordering: .relaxed)
                    counters.batches.add(1, ordering: .relaxed)
                    if errors > 0 { counters.errors.add(errors, ordering: .relaxed) }
                }
                if notified > 0 { counters.notifications.add(notified, ordering: .relaxed) }
                if try queue.ring.finalCheckForRequests() { continue }
                return true
            }
            return true
        } catch {
            // The control loop disconnects the device; this thread only reports and stops.
            brokenRing.withLock { $0 = "\(frontendPath): ring protocol error on queue \(queue.index): \(error)" }
            ringBroken.value.store(true, ordering: .releasing)
            wake.kick()
            return false
        }
    }

    // MARK: Requests

    /// Responses published together at most while a batch is being served (a quarter of a
    /// one-page ring).
    static let pushEvery = 8

    private static let okay = Int16(VIREO_BLKIF_RSP_OKAY)
    private static let error = Int16(VIREO_BLKIF_RSP_ERROR)
    private static let unsupported = Int16(VIREO_BLKIF_RSP_EOPNOTSUPP)

    /// Serves one request (a copy, read from the ring once): every field is checked before
    /// any byte moves. Returns the response status and the operation the response names (the
    /// request's, or for INDIRECT the inner READ/WRITE, as Xen's blkback answers).
    private func handle(_ request: Request, _ scratch: Scratch) -> (status: Int16, operation: UInt8) {
        let operation = Int32(request.operation)
        switch operation {
        case VIREO_BLKIF_OP_READ, VIREO_BLKIF_OP_WRITE, VIREO_BLKIF_OP_FLUSH_DISKCACHE, VIREO_BLKIF_OP_WRITE_BARRIER:
            return (direct(request, scratch), request.operation)
        case VIREO_BLKIF_OP_DISCARD:
            let discard = withUnsafeBytes(of: request) { $0.loadUnaligned(as: vireo_blkif_request_discard.self) }
            return (self.discard(discard), request.operation)
        case VIREO_BLKIF_OP_INDIRECT:
            let indirect = withUnsafeBytes(of: request) { $0.loadUnaligned(as: vireo_blkif_request_indirect.self) }
            let inner = indirect.indirect_op
            let answer = inner == UInt8(VIREO_BLKIF_OP_READ) || inner == UInt8(VIREO_BLKIF_OP_WRITE) ? inner : request.operation
            return (self.indirect(indirect, scratch), answer)
        default:
            return (Self.unsupported, request.operation)  // reserved, or unknown
        }
    }

    /// READ, WRITE, FLUSH_DISKCACHE and WRITE_BARRIER: segments in the request itself.
    private func direct(_ request: Request, _ scratch: Scratch) -> Int16 {
        let operation = Int32(request.operation)
        let count = Int(request.nr_segments)
        let isRW = operation == VIREO_BLKIF_OP_READ || operation == VIREO_BLKIF_OP_WRITE
        // READ/WRITE carry 1...11 segments; FLUSH and BARRIER 0 (a pure flush) ... 11.
        guard count <= Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST), !(isRW && count == 0) else { return Self.error }
        let write = operation != VIREO_BLKIF_OP_READ
        if readOnly && (operation == VIREO_BLKIF_OP_WRITE_BARRIER || (write && count > 0)) { return Self.error }
        for i in 0..<count {
            let segment = request.segment(i)
            scratch.setSegment(i, segment)
        }
        let barrier = operation == VIREO_BLKIF_OP_WRITE_BARRIER
        if barrier {
            counters.barriers.add(1, ordering: .relaxed)
            // Every earlier request of this ring has completed (a ring's thread serves them in
            // order, each done before the next starts; a barrier orders its own ring, as in Xen's
            // blkback): make them durable before the barrier's own write.
            guard fdatasync(fd) == 0 else { return Self.error }
        }
        if count > 0 {
            let status = transfer(segments: count, at: request.sector_number, read: !write, scratch)
            guard status == Self.okay else { return status }
        }
        if operation == VIREO_BLKIF_OP_FLUSH_DISKCACHE || barrier {
            counters.flushes.add(1, ordering: .relaxed)
            if !readOnly { guard fdatasync(fd) == 0 else { return Self.error } }
        }
        return Self.okay
    }

    /// INDIRECT: a READ or WRITE whose segment descriptors fill granted pages. The pages are
    /// grant-copied once into a host buffer, and the descriptors validated from that copy.
    private func indirect(_ request: vireo_blkif_request_indirect, _ scratch: Scratch) -> Int16 {
        counters.indirect.add(1, ordering: .relaxed)
        let inner = Int32(request.indirect_op)
        guard inner == VIREO_BLKIF_OP_READ || inner == VIREO_BLKIF_OP_WRITE else { return Self.error }
        let count = Int(request.nr_segments)
        guard count >= 1, count <= maxIndirectSegments else { return Self.error }
        let perPage = Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
        let pages = (count + perPage - 1) / perPage
        guard pages <= maxIndirectPages, pages <= Int(VIREO_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST) else { return Self.error }
        if readOnly && inner == VIREO_BLKIF_OP_WRITE { return Self.error }
        let segmentSize = MemoryLayout<vireo_blkif_request_segment>.stride
        for page in 0..<pages {
            let bytes = min(count - page * perPage, perPage) * segmentSize
            let ref = withUnsafeBytes(of: request.indirect_grefs) { $0.loadUnaligned(fromByteOffset: page * 4, as: UInt32.self) }
            let status = grants.copy(GrantCopySegment(source: .grant(frontend, GrantRef(ref), offset: 0),
                                                      dest: .local(scratch.indirectRegion, offset: page * 4096),
                                                      length: bytes), by: host.id)
            guard status == .okay else { return Self.error }
        }
        for i in 0..<count {
            scratch.setSegment(i, scratch.indirectRegion.load(vireo_blkif_request_segment.self, at: i * segmentSize))
        }
        return transfer(segments: count, at: request.sector_number, read: inner == VIREO_BLKIF_OP_READ, scratch)
    }

    /// DISCARD: punches a hole over the range (it then reads as zeros; the file keeps its size).
    private func discard(_ request: vireo_blkif_request_discard) -> Int16 {
        counters.discards.add(1, ordering: .relaxed)
        // discard-secure is 0: a guest asking for secure erasure is told it is not offered.
        if request.flag & UInt8(VIREO_BLKIF_DISCARD_SECURE) != 0 { return Self.unsupported }
        guard request.flag == 0, !readOnly else { return Self.error }
        let first = request.sector_number, count = request.nr_sectors
        guard first <= sectors, count <= sectors - first else { return Self.error }
        let unit = UInt64(sectorSize / 512)
        guard first % unit == 0, count % unit == 0 else { return Self.error }
        if count == 0 { return Self.okay }
        guard vireo_punch_hole(fd, Int64(first) * 512, Int64(count) * 512) == 0 else {
            return errno == EOPNOTSUPP ? Self.unsupported : Self.error
        }
        return Self.okay
    }

    /// Validates the `count` segments in the scratch (each inside its page, the whole range
    /// inside the disk and aligned to the sector size), then maps their pages for one
    /// `preadv`/`pwritev` at disk sector `first`.
    private func transfer(segments count: Int, at first: UInt64, read: Bool, _ scratch: Scratch) -> Int16 {
        var end = first
        for i in 0..<count {
            let firstSect = scratch.first[i], lastSect = scratch.last[i]
            guard firstSect <= lastSect, lastSect <= 7 else { return Self.error }
            let n = UInt64(lastSect - firstSect) + 1
            let (next, overflow) = end.addingReportingOverflow(n)
            guard !overflow else { return Self.error }
            end = next
        }
        guard end <= sectors else { return Self.error }
        let unit = UInt64(sectorSize / 512)
        guard first % unit == 0, (end - first) % unit == 0 else { return Self.error }
        guard let table else { return Self.error }
        let fd = self.fd
        do {
            return try table.withMappedPages(UnsafeBufferPointer(rebasing: scratch.refs[0..<count]), by: host.id,
                                             writable: read, pages: scratch.pages) { pages in
                for i in 0..<count {
                    let offset = Int(scratch.first[i]) * 512, bytes = (Int(scratch.last[i] - scratch.first[i]) + 1) * 512
                    scratch.vectors[i] = pages[i].ioVector(offset: offset, count: bytes)
                }
                return Self.transferFully(fd: fd, scratch.vectors, count: count, at: off_t(first) * 512, read: read)
                    ? Self.okay : Self.error
            }
        } catch {
            return Self.error  // a bad reference, a grant to another domain, a read into a read-only grant
        }
    }

    /// One `preadv`/`pwritev` over `count` vectors at `offset`, resuming short transfers and
    /// retrying EINTR; false on an error or end of file. The vectors are consumed.
    private static func transferFully(fd: Int32, _ vectors: UnsafeMutableBufferPointer<iovec>, count: Int,
                                      at offset: off_t, read: Bool) -> Bool {
        var index = 0, position = offset
        while index < count {
            let base = vectors.baseAddress! + index
            let n = read ? preadv(fd, base, Int32(count - index), position) : pwritev(fd, base, Int32(count - index), position)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            position += off_t(n)
            var left = n
            while left > 0 && index < count {
                let length = vectors[index].iov_len
                if left >= length {
                    left -= length
                    index += 1
                } else {
                    vectors[index].iov_base = vectors[index].iov_base! + left
                    vectors[index].iov_len = length - left
                    left = 0
                }
            }
        }
        return true
    }
}

/// The backend's counters, updated without a lock.
private final class Counters: Sendable {
    let requests = Atomic<Int>(0), errors = Atomic<Int>(0), notifications = Atomic<Int>(0)
    let flushes = Atomic<Int>(0), connections = Atomic<Int>(0), barriers = Atomic<Int>(0)
    let discards = Atomic<Int>(0), indirect = Atomic<Int>(0), batches = Atomic<Int>(0)

    func snapshot() -> BlockBackend.Statistics {
        var s = BlockBackend.Statistics()
        s.requests = requests.load(ordering: .relaxed)
        s.errors = errors.load(ordering: .relaxed)
        s.notifications = notifications.load(ordering: .relaxed)
        s.flushes = flushes.load(ordering: .relaxed)
        s.connections = connections.load(ordering: .relaxed)
        s.barriers = barriers.load(ordering: .relaxed)
        s.discards = discards.load(ordering: .relaxed)
        s.indirect = indirect.load(ordering: .relaxed)
        s.batches = batches.load(ordering: .relaxed)
        return s
    }
}

/// Buffers the service loop reuses for every request (no allocation per request): the
/// validated segments, the mapped pages, the I/O vectors and the copied indirect pages.
private final class Scratch: @unchecked Sendable {  // used by one queue's thread only
    let refs: UnsafeMutableBufferPointer<GrantRef>
    let first: UnsafeMutableBufferPointer<UInt8>
    let last: UnsafeMutableBufferPointer<UInt8>
    let pages: UnsafeMutableBufferPointer<SharedRegion>
    let vectors: UnsafeMutableBufferPointer<iovec>
    let indirect: UnsafeMutableRawPointer
    let indirectRegion: SharedRegion

    init(segments: Int, indirectPages: Int) {
        refs = .allocate(capacity: segments)
        refs.initialize(repeating: GrantRef(0))
        first = .allocate(capacity: segments)
        first.initialize(repeating: 0)
        last = .allocate(capacity: segments)
        last.initialize(repeating: 0)
        let empty = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)
        emptyPage = empty
        pages = .allocate(capacity: segments)
        pages.initialize(repeating: .unsafe(empty, count: 0))
        vectors = .allocate(capacity: segments)
        vectors.initialize(repeating: iovec(iov_base: nil, iov_len: 0))
        indirect = .allocate(byteCount: indirectPages * 4096, alignment: 4096)
        indirect.initializeMemory(as: UInt8.self, repeating: 0, count: indirectPages * 4096)
        indirectRegion = .unsafe(indirect, count: indirectPages * 4096)
    }
    private let emptyPage: UnsafeMutableRawPointer

    func setSegment(_ i: Int, _ segment: vireo_blkif_request_segment) {
        refs[i] = GrantRef(segment.gref)
        first[i] = segment.first_sect
        last[i] = segment.last_sect
    }

    deinit {
        refs.deallocate()
        first.deallocate()
        last.deallocate()
        pages.deallocate()
        vectors.deallocate()
        indirect.deallocate()
        emptyPage.deallocate()
    }
}

/// XenBus states (`vireo/io/xenbus.h`) as the numbers a backend writes.
public enum XenbusBackendState {
    public static let unknown: UInt32 = 0
    public static let initialising: UInt32 = 1
    public static let initWait: UInt32 = 2
    public static let initialised: UInt32 = 3
    public static let connected: UInt32 = 4
    public static let closing: UInt32 = 5
    public static let closed: UInt32 = 6
}
