import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoLinux
import VireoStore


/// blkback over a raw image file: one virtual block device (vbd) of one frontend domain, a
/// ``XenbusDevice`` that ``XenbusBackend`` publishes and connects (``BlockBackend``).
///
/// Nodes (Xen's): the backend directory `/local/domain/0/backend/vbd/<domid>/<devid>` gets
/// mode, params, type, sectors, info, sector-size and the feature nodes besides XenbusBackend's
/// own; the frontend directory `/local/domain/<domid>/device/vbd/<devid>` virtual-device and
/// device-type. On connect it reads the ring(s) — `ring-ref` and `event-channel`, or
/// `queue-N/ring-ref` and `queue-N/event-channel` for `multi-queue-num-queues` > 1 — maps each
/// one-page ring and binds each event channel.
///
/// Requests are copied out of the ring once and validated on the copy; their data pages are
/// mapped for the duration of one `preadv`/`pwritev` between them and the file (no bounce
/// buffer), and indirect segment pages are grant-copied into a host buffer once and validated
/// there. READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, DISCARD and INDIRECT are served. A bad
/// request gets BLKIF_RSP_ERROR (EOPNOTSUPP for an operation or flag not offered) and the ring
/// carries on; a ring whose producer index is out of range is disconnected (Closing).
///
/// Threads: XenbusBackend's control loop (XenStore, state, connection; ``serve(_:)`` has
/// nothing to do) and one ``ServiceWorker`` per ring while Connected, taking turns on a
/// ``BackendWorkerPool`` (the process's shared one, a thread per core, unless one is given).
/// A ring's turn takes each request in turn, up to the pool's budget, does its I/O
/// synchronously and publishes responses as it goes; with work left it goes to the back of
/// the pool's queue, so rings of every frontend share the threads round-robin and one that
/// keeps its ring full, or storms with events, cannot starve the others (SECURITY 12; see
/// Docs/block.md). Within a ring requests complete in order, which is also what makes
/// WRITE_BARRIER's "after every earlier write" hold.
public final class BlockDevice: XenbusDevice, @unchecked Sendable {  // immutable but for the counters; a connection's queues belong to their workers
    public typealias Request = vireo_blkif_request
    public typealias Response = vireo_blkif_response

    public let kind = "vbd"
    /// The device number (`virtual-device`; 51712 = xvda), the backend's handle.
    public let number: UInt32
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

    /// The pool whose threads serve the rings.
    public let pool: BackendWorkerPool

    private let fd: Int32
    private let indirectPagesPerRequest: Int

    /// Indirect pages a request may name, given ``maxIndirectSegments``.
    private var maxIndirectPages: Int {
        (maxIndirectSegments + Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME) - 1) / Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
    }

    /// Counters, for tests and diagnostics (connections are ``XenbusBackend/connections``).
    public struct Statistics: Sendable, Equatable {
        public var requests = 0
        public var errors = 0
        public var notifications = 0
        public var flushes = 0
        public var barriers = 0
        public var discards = 0
        public var indirect = 0
        /// Times the service loop found requests waiting (each batch is answered with one push
        /// and at most one notification per queue).
        public var batches = 0
        /// Turns that ended because the budget ran out with requests left (the ring went
        /// behind the others).
        public var turnsCut = 0
        /// Turns that found no request at all (a spurious event, or the 100 ms safety net).
        public var emptyTurns = 0
    }
    private let counters = Counters()
    /// The domain's I/O counters (the toolstack's metrics), when given.
    let io: IOCounters?
    public var statistics: Statistics { counters.snapshot() }

    /// Rings connected now (0 when not Connected).
    public var queueCount: Int { connectedQueues.load(ordering: .acquiring) }
    private let connectedQueues = Atomic<Int>(0)

    /// One ring (queue) of the connection, served by a worker of its own: its event channel
    /// wakes that worker only, and it owns the buffers its requests use.
    final class Queue: @unchecked Sendable {  // the ring and scratch: the queue's worker only
        let index: Int
        let mapped: MappedBackRing<Request, Response>
        let port: EventPort
        let worker: ServiceWorker
        let scratch: Scratch
        let link: FrontendLink
        let table: GrantTable
        init(index: Int, mapped: MappedBackRing<Request, Response>, port: EventPort, worker: ServiceWorker, scratch: Scratch,
             link: FrontendLink, table: GrantTable) {
            self.index = index
            self.mapped = mapped
            self.port = port
            self.worker = worker
            self.scratch = scratch
            self.link = link
            self.table = table
        }
    }

    /// A connection: its rings.
    public final class Connection {
        let queues: [Queue]
        init(queues: [Queue]) { self.queues = queues }
    }

    /// Opens `path` (read-write unless `readOnly`) as device `number`. The image's size is
    /// rounded down to whole sectors of `sectorSize` (512 or 4096 bytes). `maxQueues` (1...16)
    /// rings and indirect requests of up to `maxIndirectSegments` (11...4096) segments are offered;
    /// the rings take turns on `pool`.
    /// - Throws: ``BackendError`` naming the file when it cannot be opened or is empty, or the
    ///   option that is out of range.
    public init(path: String, readOnly: Bool, number: UInt32 = 51712, sectorSize: Int = 512, maxQueues: Int = 4,
                maxIndirectSegments: Int = 256, pool: BackendWorkerPool = .shared, counters io: IOCounters? = nil) throws(BackendError) {
        self.io = io
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
        self.fd = fd
        self.pool = pool
        self.number = number
        self.sectors = sectors
        self.readOnly = readOnly
        self.sectorSize = sectorSize
        self.maxQueues = maxQueues
        self.maxIndirectSegments = maxIndirectSegments
        let block = Int(info.st_blksize)
        discardGranularity = block >= sectorSize && block <= 1 << 20 && block & (block - 1) == 0 ? block : sectorSize
        indirectPagesPerRequest = (maxIndirectSegments + Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME) - 1)
            / Int(VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME)
    }

    deinit {
        close(fd)
    }

    // MARK: XenbusDevice

    /// The backend's nodes beyond XenbusBackend's own, in the order they are written: the
    /// toolstack's, the size, then every feature the backend serves (Xen's names and defaults).
    public var backendNodes: [(key: String, value: String)] {
        [("mode", readOnly ? "r" : "w"), ("params", "image"), ("type", "file"),
         ("sectors", "\(sectors)"), ("info", readOnly ? "\(VIREO_VDISK_READONLY)" : "0"),
         ("sector-size", "\(sectorSize)"), ("physical-sector-size", "\(sectorSize)"),
         ("feature-flush-cache", "1"), ("feature-barrier", "1"),
         ("feature-discard", "1"), ("discard-granularity", "\(discardGranularity)"), ("discard-alignment", "0"),
         ("discard-secure", "0"),
         ("feature-max-indirect-segments", "\(maxIndirectSegments)"),
         ("multi-queue-max-queues", "\(maxQueues)"), ("max-ring-page-order", "0")]
    }

    public var frontendNodes: [(key: String, value: String)] {
        [("virtual-device", "\(number)"), ("device-type", "disk")]
    }

    /// Reads the frontend's ring keys (Xen's multi-queue: absent means one ring with its keys
    /// at the top; 1...max rings, and with more than one each ring's keys live under
    /// queue-<n>), maps each ring, binds each event channel to the ring's own worker, then
    /// starts the workers.
    public func connect(_ link: FrontendLink) throws(BackendError) -> Connection {
        if let text = link.read("protocol"), text != "x86_64-abi" {
            throw BackendError("\(link.path)/protocol: '\(text)' is not x86_64-abi")
        }
        if link.read("ring-page-order") != nil {
            guard (try? link.number("ring-page-order")) == 0 else {
                throw BackendError("\(link.path)/ring-page-order: not 0 (only one-page rings are served)")
            }
        }
        var count = 1
        if link.read("multi-queue-num-queues") != nil {
            guard let n = try? link.number("multi-queue-num-queues", limit: UInt64(maxQueues)), n >= 1 else {
                throw BackendError("\(link.path)/multi-queue-num-queues: not a number in 1...\(maxQueues) (multi-queue-max-queues)")
            }
            count = Int(n)
        }
        guard let table = link.grants.table(for: link.domain) else {
            throw BackendError("domain \(link.domain.rawValue) has no grant table")
        }
        var opened: [Queue] = []
        do {
            for index in 0..<count {
                let directory = count == 1 ? "" : "queue-\(index)/"
                let mapped: MappedBackRing<Request, Response> = try link.mapRing(directory + "ring-ref")
                let worker = try ServiceWorker(name: "blkback-\(link.domain.rawValue)-q\(index)", pool: pool)
                let port = try link.bindEvent(directory + "event-channel", waking: worker)
                opened.append(Queue(index: index, mapped: mapped, port: port, worker: worker,
                                    scratch: Scratch(segments: maxIndirectSegments, indirectPages: indirectPagesPerRequest),
                                    link: link, table: table))
            }
        } catch {
            for queue in opened { try? link.host.close(queue.port) }
            throw error
        }
        for queue in opened {
            queue.worker.start(for: link, budgeted: { [self] (budget: Int) throws(BackendError) -> ServiceTurn in
                try serveRing(queue, budget: budget)
            })
        }
        connectedQueues.store(opened.count, ordering: .releasing)
        return Connection(queues: opened)
    }

    /// The rings' workers serve them: nothing is left for the control loop.
    public func serve(_ connection: Connection) throws(BackendError) {}

    /// Stops the queues' workers (each finishes the request it is serving), then closes the
    /// ports; the rings are unmapped as the queues go.
    public func disconnect(_ connection: Connection) {
        for queue in connection.queues { queue.worker.stop() }
        for queue in connection.queues { try? queue.link.host.close(queue.port) }
        connectedQueues.store(0, ordering: .releasing)
    }

    // MARK: Rings

    /// ``pushEvery`` requests and when no request is left, so the frontend can refill slots
    /// while the backend works on the rest of the batch (the backend does not run dry waiting
    /// for a whole batch's round trip), without a push and a possible notification per
    /// request; a notification is sent only when the frontend asked for one (`rsp_event`), and
    /// the final check before sleeping catches requests that raced with it. A frontend that
    /// keeps the ring full cannot hold the thread: it stops between requests when asked, and
    /// after `budget` requests the turn ends with the responses pushed and ``ServiceTurn/more``
    /// (the ring goes behind the others). A turn that finds nothing (a spurious event) costs one
    /// look at the producer index and the final check.
    /// Throws when the ring broke the protocol (the worker reports it to the control loop,
    /// which disconnects the device).
    private func serveRing(_ queue: Queue, budget: Int) throws(BackendError) -> ServiceTurn {
        let worker = queue.worker
        var left = budget
        do {
            while !worker.isStopping {
                var served = 0, errors = 0, notified = 0
                while !worker.isStopping, left > 0, let request = try queue.mapped.ring.consumeRequest() {
                    left -= 1
                    let (status, operation) = handle(request, queue)
                    try queue.mapped.ring.produceResponse { slot in
                        slot.set(\.id, to: request.id)
                        slot.set(\.operation, to: operation)
                        slot.set(\.status, to: status)
                    }
                    served += 1
                    if status != Int16(VIREO_BLKIF_RSP_OKAY) { errors += 1 }
                    if served % Self.pushEvery == 0, queue.mapped.ring.pushResponsesAndCheckNotify() {
                        notified += 1
                        try? queue.link.host.send(queue.port)
                    }
                }
                // Counted before the turn's last push: once the frontend sees its last response,
                // the counters (the domain's metrics) include it.
                if served > 0 {
                    counters.requests.add(served, ordering: .relaxed)
                    counters.batches.add(1, ordering: .relaxed)
                    if errors > 0 { counters.errors.add(errors, ordering: .relaxed) }
                    if let io {
                        io.requests.add(served, ordering: .relaxed)
                        if errors > 0 { io.errors.add(errors, ordering: .relaxed) }
                    }
                }
                if queue.mapped.ring.pushResponsesAndCheckNotify() {
                    notified += 1
                    try? queue.link.host.send(queue.port)
                }
                if notified > 0 { counters.notifications.add(notified, ordering: .relaxed) }
                if left == 0 {
                    counters.turnsCut.add(1, ordering: .relaxed)
                    return .more
                }
                if try queue.mapped.ring.finalCheckForRequests() { continue }
                if left == budget {
                    counters.emptyTurns.add(1, ordering: .relaxed)
                    return .empty
                }
                return .idle
            }
            return .idle
        } catch {
            throw BackendError("ring protocol error on queue \(queue.index): \(error)")
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
    private func handle(_ request: Request, _ queue: Queue) -> (status: Int16, operation: UInt8) {
        let operation = Int32(request.operation)
        switch operation {
        case VIREO_BLKIF_OP_READ, VIREO_BLKIF_OP_WRITE, VIREO_BLKIF_OP_FLUSH_DISKCACHE, VIREO_BLKIF_OP_WRITE_BARRIER:
            return (direct(request, queue), request.operation)
        case VIREO_BLKIF_OP_DISCARD:
            let discard = withUnsafeBytes(of: request) { $0.loadUnaligned(as: vireo_blkif_request_discard.self) }
            return (self.discard(discard), request.operation)
        case VIREO_BLKIF_OP_INDIRECT:
            let indirect = withUnsafeBytes(of: request) { $0.loadUnaligned(as: vireo_blkif_request_indirect.self) }
            let inner = indirect.indirect_op
            let answer = inner == UInt8(VIREO_BLKIF_OP_READ) || inner == UInt8(VIREO_BLKIF_OP_WRITE) ? inner : request.operation
            return (self.indirect(indirect, queue), answer)
        default:
            return (Self.unsupported, request.operation)  // reserved, or unknown
        }
    }

    /// READ, WRITE, FLUSH_DISKCACHE and WRITE_BARRIER: segments in the request itself.
    private func direct(_ request: Request, _ queue: Queue) -> Int16 {
        let scratch = queue.scratch
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
            let status = transfer(segments: count, at: request.sector_number, read: !write, queue)
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
    private func indirect(_ request: vireo_blkif_request_indirect, _ queue: Queue) -> Int16 {
        let scratch = queue.scratch, link = queue.link
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
            let status = link.grants.copy(GrantCopySegment(source: .grant(link.domain, GrantRef(ref), offset: 0),
                                                      dest: .local(scratch.indirectRegion, offset: page * 4096),
                                                      length: bytes), by: link.host.id)
            guard status == .okay else { return Self.error }
        }
        for i in 0..<count {
            scratch.setSegment(i, scratch.indirectRegion.load(vireo_blkif_request_segment.self, at: i * segmentSize))
        }
        return transfer(segments: count, at: request.sector_number, read: inner == VIREO_BLKIF_OP_READ, queue)
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
    private func transfer(segments count: Int, at first: UInt64, read: Bool, _ queue: Queue) -> Int16 {
        let scratch = queue.scratch
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
        let fd = self.fd, table = queue.table
        do {
            return try table.withMappedPages(UnsafeBufferPointer(rebasing: scratch.refs[0..<count]), by: queue.link.host.id,
                                             writable: read, pages: scratch.pages) { pages in
                for i in 0..<count {
                    let offset = Int(scratch.first[i]) * 512, bytes = (Int(scratch.last[i] - scratch.first[i]) + 1) * 512
                    scratch.vectors[i] = pages[i].ioVector(offset: offset, count: bytes)
                }
                guard Self.transferFully(fd: fd, scratch.vectors, count: count, at: off_t(first) * 512, read: read) else { return Self.error }
                if let io {
                    if read { io.blockReadBytes.add(Int(end - first) * 512, ordering: .relaxed) } else {
                        io.blockWrittenBytes.add(Int(end - first) * 512, ordering: .relaxed)
                    }
                }
                return Self.okay
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

/// blkback: ``BlockDevice`` hosted by ``XenbusBackend``.
public typealias BlockBackend = XenbusBackend<BlockDevice>

extension XenbusBackend where Device == BlockDevice {
    /// Serves the image at `path` as device `device` (51712 = xvda) of domain `frontend`: see
    /// ``BlockDevice/init(path:readOnly:number:sectorSize:maxQueues:maxIndirectSegments:pool:counters:)``.
    public convenience init(path: String, readOnly: Bool, frontend: DomainID, device: UInt32 = 51712, sectorSize: Int = 512,
                            maxQueues: Int = 4, maxIndirectSegments: Int = 256, pool: BackendWorkerPool = .shared, counters: IOCounters? = nil,
                            store: XenStore, grants: GrantTables, host: HostEventDomain) throws(BackendError) {
        let disk = try BlockDevice(path: path, readOnly: readOnly, number: device, sectorSize: sectorSize, maxQueues: maxQueues,
                                   maxIndirectSegments: maxIndirectSegments, pool: pool, counters: counters)
        try self.init(disk, frontend: frontend, handle: device, store: store, grants: grants, host: host)
    }

    /// Rings connected now (0 when not Connected).
    public var queueCount: Int { device.queueCount }
}

/// The backend's counters, updated without a lock.
private final class Counters: Sendable {
    let requests = Atomic<Int>(0), errors = Atomic<Int>(0), notifications = Atomic<Int>(0)
    let flushes = Atomic<Int>(0), barriers = Atomic<Int>(0)
    let discards = Atomic<Int>(0), indirect = Atomic<Int>(0), batches = Atomic<Int>(0)
    let turnsCut = Atomic<Int>(0), emptyTurns = Atomic<Int>(0)

    func snapshot() -> BlockDevice.Statistics {
        var s = BlockDevice.Statistics()
        s.requests = requests.load(ordering: .relaxed)
        s.errors = errors.load(ordering: .relaxed)
        s.notifications = notifications.load(ordering: .relaxed)
        s.flushes = flushes.load(ordering: .relaxed)
        s.barriers = barriers.load(ordering: .relaxed)
        s.discards = discards.load(ordering: .relaxed)
        s.indirect = indirect.load(ordering: .relaxed)
        s.batches = batches.load(ordering: .relaxed)
        s.turnsCut = turnsCut.load(ordering: .relaxed)
        s.emptyTurns = emptyTurns.load(ordering: .relaxed)
        return s
    }
}

/// Buffers the service loop reuses for every request (no allocation per request): the
/// validated segments, the mapped pages, the I/O vectors and the copied indirect pages.
final class Scratch: @unchecked Sendable {  // used by one queue's thread only
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

