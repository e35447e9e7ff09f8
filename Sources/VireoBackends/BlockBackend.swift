import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoStore

/// A setup error of a backend, naming what is wrong.
public struct BackendError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// blkback over a raw image file: one virtual block device (vbd) of one frontend domain.
///
/// Wiring (Xen's): ``create(...)`` writes the toolstack's nodes, the backend directory
/// `/local/domain/0/backend/vbd/<domid>/<devid>` (frontend, frontend-id, mode, params,
/// sectors, info, sector-size, feature-flush-cache, state) and the frontend directory
/// `/local/domain/<domid>/device/vbd/<devid>` (backend, backend-id, virtual-device,
/// device-type, state), the latter owned by the frontend. ``run()`` then watches the frontend's
/// state: on Initialised (or Connected) it reads ring-ref and event-channel, maps the one-page
/// ring, binds the event channel and enters Connected; on Closing/Closed it disconnects.
///
/// Requests are copied out of the ring once, validated on the copy, and served with grant
/// copies between the frontend's pages and a host buffer and `pread`/`pwrite` on the file;
/// FLUSH_DISKCACHE runs `fdatasync` before its response. A bad request gets
/// BLKIF_RSP_ERROR (EOPNOTSUPP for an operation not offered) and the ring carries on; a ring
/// whose producer index is out of range is disconnected (the backend goes to Closing).
public final class BlockBackend: BackendService, @unchecked Sendable {  // run() owns the mutable state; stop() only touches atomics and the pipe
    public typealias Request = vireo_blkif_request
    public typealias Response = vireo_blkif_response

    public let frontend: DomainID
    public let device: UInt32
    public let sectors: UInt64
    public let readOnly: Bool
    public let backendPath: String
    public let frontendPath: String
    public var name: String { "vbd-\(device)" }

    private let store: XenStore
    private let grants: GrantTables
    private let host: HostEventDomain
    private let fd: Int32
    private let wake: WakePipe
    private let stopping = Atomic<Bool>(false)
    private let buffer: UnsafeMutableRawPointer
    private let bufferRegion: SharedRegion
    private static let bufferBytes = Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST) * 4096

    /// Counters, for tests and diagnostics.
    public struct Statistics: Sendable, Equatable {
        public var requests = 0
        public var errors = 0
        public var notifications = 0
        public var flushes = 0
        public var connections = 0
    }
    private let stats = Mutex(Statistics())
    public var statistics: Statistics { stats.withLock { $0 } }

    /// The state the backend last published.
    public var state: UInt32 { published.load(ordering: .acquiring) }
    private let published = Atomic<UInt32>(0)
    /// Why the last connection failed or was dropped, if it was.
    public var lastFailure: String? { failure.withLock { $0 } }
    private let failure = Mutex<String?>(nil)

    /// The connection to the frontend while Connected.
    private final class Connection {
        let mapping: MappingBox
        var ring: BackRing<Request, Response>
        let port: EventPort
        init(mapping: MappingBox, ring: BackRing<Request, Response>, port: EventPort) {
            self.mapping = mapping
            self.ring = ring
            self.port = port
        }
    }
    private final class MappingBox {
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }
    private var connection: Connection?
    private var session: XenStoreConnection?

    /// Opens `path` (read-write unless `readOnly`) for device `device` (51712 = xvda) of domain
    /// `frontend`. The image's size is rounded down to whole 512-byte sectors.
    /// - Throws: ``BackendError`` naming the file when it cannot be opened or is empty.
    public init(path: String, readOnly: Bool, frontend: DomainID, device: UInt32 = 51712,
                store: XenStore, grants: GrantTables, host: HostEventDomain) throws(BackendError) {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else {
            throw BackendError("cannot open the disk image '\(path)': \(String(cString: strerror(errno)))")
        }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw BackendError("the disk image '\(path)' is not a regular file")
        }
        let sectors = UInt64(info.st_size) / 512
        guard sectors > 0 else {
            close(fd)
            throw BackendError("the disk image '\(path)' is smaller than one 512-byte sector")
        }
        let wake: WakePipe
        do { wake = try WakePipe(for: "block backend") } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.sectors = sectors
        self.readOnly = readOnly
        self.frontend = frontend
        self.device = device
        self.store = store
        self.grants = grants
        self.host = host
        self.wake = wake
        backendPath = "/local/domain/\(host.id.rawValue)/backend/vbd/\(frontend.rawValue)/\(device)"
        frontendPath = "/local/domain/\(frontend.rawValue)/device/vbd/\(device)"
        buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.bufferBytes, alignment: 4096)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: Self.bufferBytes)
        bufferRegion = .unsafe(buffer, count: Self.bufferBytes)
    }

    deinit {
        close(fd)
        buffer.deallocate()
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

    /// Writes the toolstack's nodes and the backend's features, and enters InitWait. Call
    /// once, before the frontend starts looking (before the guest boots).
    public func create() throws(BackendError) {
        let wake = self.wake
        session = store.connect(domain: host.id, wake: { wake.kick() })
        let front = frontend.rawValue, back = host.id.rawValue
        // The backend directory: dom0's, readable by the frontend. The frontend directory: the
        // frontend's own, readable by the backend. Each node gets its permissions explicitly.
        let backendPermissions = ["n\(back)", "r\(front)"], frontendPermissions = ["n\(front)", "r\(back)"]
        _ = try storeRequest(.mkdir, Array(backendPath.utf8) + [0])
        try setPermissions(backendPath, backendPermissions)
        for (key, value) in [("frontend", frontendPath), ("frontend-id", "\(front)"), ("mode", readOnly ? "r" : "w"),
                             ("params", "image"), ("type", "file"), ("online", "1"),
                             ("feature-flush-cache", "1"), ("sectors", "\(sectors)"),
                             ("info", readOnly ? "\(VIREO_VDISK_READONLY)" : "0"), ("sector-size", "512"),
                             ("physical-sector-size", "512"), ("state", "\(XenbusBackendState.initialising)")] {
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
        _ = try storeRequest(.watch, Array((frontendPath + "/state").utf8) + [0] + Array("vbd-front".utf8) + [0])
        try publish(state: XenbusBackendState.initWait)
    }

    // MARK: Running

    /// Makes ``run()`` return soon.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Serves the device until ``stop()``: follows the frontend's state and serves the ring
    /// while connected. Call ``create()`` first. Runs on the caller's thread.
    public func run() {
        while !stopping.load(ordering: .acquiring) {
            followFrontend()
            if connection != nil { serveRing() }
            if stopping.load(ordering: .acquiring) { break }
            wake.wait(milliseconds: 100)
        }
        disconnect()
        if let session { store.disconnect(session) }
        session = nil
    }

    /// Reacts to the frontend's state (level-triggered: read on every wake).
    private func followFrontend() {
        guard session != nil else { return }
        let front = readNumber(frontendPath + "/state").map { UInt32(truncatingIfNeeded: $0) } ?? 0
        let mine = state
        switch front {
        case XenbusBackendState.initialised, XenbusBackendState.connected:
            if connection == nil && mine == XenbusBackendState.initWait { connect() }
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
        if let order = readNumber(frontendPath + "/ring-page-order"), order != 0 {
            return fail("\(frontendPath)/ring-page-order: \(order) (only one-page rings are served)")
        }
        guard let ref = readNumber(frontendPath + "/ring-ref"), ref <= UInt64(UInt32.max) else {
            return fail("\(frontendPath)/ring-ref: missing or not a grant reference")
        }
        guard let channel = readNumber(frontendPath + "/event-channel"), channel <= UInt64(UInt32.max) else {
            return fail("\(frontendPath)/event-channel: missing or not a port")
        }
        guard let table = grants.table(for: frontend) else { return fail("domain \(frontend.rawValue) has no grant table") }
        let box: MappingBox
        do {
            box = MappingBox(try table.map(GrantRef(UInt32(ref)), by: host.id, readOnly: false))
        } catch {
            return fail("\(frontendPath)/ring-ref \(ref): cannot map: \(error)")
        }
        let ring: BackRing<Request, Response>
        do {
            ring = try BackRing<Request, Response>(attaching: try box.mapping.sharedRegion())
        } catch {
            return fail("ring-ref \(ref): not a blkif ring: \(error)")
        }
        let wake = self.wake
        let port: EventPort
        do {
            port = try host.bindInterdomain(remoteDomain: frontend, remotePort: EventPort(UInt32(channel))) { _ in
                wake.kick()
            }
        } catch {
            return fail("\(frontendPath)/event-channel \(channel): cannot bind: \(error)")
        }
        connection = Connection(mapping: box, ring: ring, port: port)
        stats.withLock { $0.connections += 1 }
        failure.withLock { $0 = nil }
        do { try publish(state: XenbusBackendState.connected) } catch { fail("\(error)") }
    }

    private func disconnect() {
        guard let connection else { return }
        try? host.close(connection.port)
        self.connection = nil  // the mapping ends with the box
    }

    /// Serves every request pending, with event suppression and the final check.
    private func serveRing() {
        guard let connection else { return }
        do {
            while true {
                while let request = try connection.ring.consumeRequest() {
                    let status = handle(request)
                    try connection.ring.produceResponse { slot in
                        slot.set(\.id, to: request.id)
                        slot.set(\.operation, to: request.operation)
                        slot.set(\.status, to: status)
                    }
                    stats.withLock {
                        $0.requests += 1
                        if status != Int16(VIREO_BLKIF_RSP_OKAY) { $0.errors += 1 }
                    }
                }
                if connection.ring.pushResponsesAndCheckNotify() {
                    stats.withLock { $0.notifications += 1 }
                    try? host.send(connection.port)
                }
                if try connection.ring.finalCheckForRequests() { continue }
                return
            }
        } catch {
            fail("\(frontendPath): ring protocol error: \(error)")
        }
    }

    // MARK: Requests

    /// Serves one request (a copy, read from the ring once): every field is checked before
    /// any byte moves. Returns the response status.
    func handle(_ request: Request) -> Int16 {
        let error = Int16(VIREO_BLKIF_RSP_ERROR)
        let operation = Int32(request.operation)
        let count = Int(request.nr_segments)
        switch operation {
        case VIREO_BLKIF_OP_READ, VIREO_BLKIF_OP_WRITE:
            guard count >= 1 else { return error }
        case VIREO_BLKIF_OP_FLUSH_DISKCACHE:
            break  // 0 segments: a pure flush; with segments also a write of them
        default:
            return Int16(VIREO_BLKIF_RSP_EOPNOTSUPP)
        }
        guard count <= Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST) else { return error }
        let write = operation != VIREO_BLKIF_OP_READ
        if write && readOnly && count > 0 { return error }
        // Validate every segment and the whole range first.
        var segments: [(ref: GrantRef, pageOffset: Int, bytes: Int)] = []
        segments.reserveCapacity(count)
        var end = request.sector_number
        var total = 0
        for i in 0..<count {
            let segment = request.segment(i)
            guard segment.first_sect <= segment.last_sect, segment.last_sect <= 7 else { break }
            let n = Int(segment.last_sect - segment.first_sect) + 1
            let (next, overflow) = end.addingReportingOverflow(UInt64(n))
            guard !overflow else { break }
            end = next
            segments.append((GrantRef(segment.gref), Int(segment.first_sect) * 512, n * 512))
            total += n * 512
        }
        guard segments.count == count, end <= sectors else { return error }
        let offset = off_t(request.sector_number) * 512
        if count > 0 {
            if write {
                guard copy(segments, toBuffer: true) else { return error }
                guard writeFully(at: offset, count: total) else { return error }
            } else {
                guard readFully(at: offset, count: total) else { return error }
                guard copy(segments, toBuffer: false) else { return error }
            }
        }
        if operation == VIREO_BLKIF_OP_FLUSH_DISKCACHE {
            stats.withLock { $0.flushes += 1 }
            if !readOnly { guard fdatasync(fd) == 0 else { return error } }
        }
        return Int16(VIREO_BLKIF_RSP_OKAY)
    }

    /// Grant copies between the segments' pages and the buffer (laid out back to back).
    private func copy(_ segments: [(ref: GrantRef, pageOffset: Int, bytes: Int)], toBuffer: Bool) -> Bool {
        var at = 0
        for segment in segments {
            let remote = GrantCopyEndpoint.grant(frontend, segment.ref, offset: segment.pageOffset)
            let local = GrantCopyEndpoint.local(bufferRegion, offset: at)
            let status = grants.copy(GrantCopySegment(source: toBuffer ? remote : local, dest: toBuffer ? local : remote,
                                                      length: segment.bytes), by: host.id)
            guard status == .okay else { return false }
            at += segment.bytes
        }
        return true
    }

    private func readFully(at offset: off_t, count: Int) -> Bool {
        transferFully(at: offset, count: count) { pread($0, $1, $2, $3) }
    }

    private func writeFully(at offset: off_t, count: Int) -> Bool {
        transferFully(at: offset, count: count) { pwrite($0, $1, $2, $3) }
    }

    /// Moves `count` bytes between the buffer and the file at `offset`, resuming short transfers
    /// and retrying EINTR; false on an error or end of file.
    private func transferFully(at offset: off_t, count: Int,
                               _ io: (Int32, UnsafeMutableRawPointer, Int, off_t) -> Int) -> Bool {
        var done = 0
        while done < count {
            let n = io(fd, buffer + done, count - done, offset + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
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
