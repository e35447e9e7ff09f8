#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// A watch firing: the path that changed and the token the watch was set with.
public struct XenStoreWatchEvent: Equatable, Sendable {
    public let path: [UInt8]
    public let token: [UInt8]
}

/// The guest's XenStore client over its store ring (`vireo/io/xs_wire.h`): requests go into
/// `req`, replies and watch events come back in `rsp`; the store's event channel is notified
/// after each index update. The page and port come from the HVM params STORE_PFN/STORE_EVTCHN.
///
/// Requests are one at a time (each waits for its reply, running the guest's loop meanwhile);
/// watch events that arrive in between are queued for ``takeWatchEvents()``. Replies are
/// parsed from bytes the store wrote: a length over the protocol's 4096 is a broken ring.
public final class XenStoreClient<Platform: GuestPlatform> {
    public let guest: Guest<Platform>
    public let port: EventPort
    let requests: ByteRing
    let responses: ByteRing
    var input: [UInt8] = []
    var nextRequestID: UInt32 = 1
    var watchEvents: [XenStoreWatchEvent] = []
    static var headerSize: Int { 16 }
    static var maxPayload: Int { Int(VIREO_XENSTORE_PAYLOAD_MAX) }

    /// The client of the store page the toolstack gave this domain.
    public convenience init(guest: Guest<Platform>) throws(GuestError) {
        let (page, port) = try guest.toolstackRing(page: VIREO_HVM_PARAM_STORE_PFN, port: VIREO_HVM_PARAM_STORE_EVTCHN)
        self.init(guest: guest, page: page, port: port)
    }

    public init(guest: Guest<Platform>, page: SharedRegion, port: EventPort) {
        self.guest = guest
        self.port = port
        requests = ByteRing.xenstoreRequests(page)
        responses = ByteRing.xenstoreResponses(page)
        // The loop's scan clears the port; the client looks at the ring itself after each pass.
        guest.setHandler(for: port) { _ in }
    }

    // MARK: Operations

    /// The value at `path`.
    public func read(_ path: String, transaction: UInt32 = 0) throws(GuestError) -> [UInt8] {
        try request(VIREO_XS_READ, Self.string(path) + [0], transaction: transaction)
    }

    /// Writes `value` at `path` (creating it and its parents).
    public func write(_ path: String, _ value: [UInt8], transaction: UInt32 = 0) throws(GuestError) {
        _ = try request(VIREO_XS_WRITE, Self.string(path) + [0] + value, transaction: transaction)
    }

    public func write(_ path: String, _ value: String, transaction: UInt32 = 0) throws(GuestError) {
        try write(path, Array(value.utf8), transaction: transaction)
    }

    /// The names of `path`'s children.
    public func directory(_ path: String, transaction: UInt32 = 0) throws(GuestError) -> [[UInt8]] {
        let reply = try request(VIREO_XS_DIRECTORY, Self.string(path) + [0], transaction: transaction)
        return reply.split(separator: 0, omittingEmptySubsequences: true).map { Array($0) }
    }

    /// Removes `path` and everything under it.
    public func remove(_ path: String, transaction: UInt32 = 0) throws(GuestError) {
        _ = try request(VIREO_XS_RM, Self.string(path) + [0], transaction: transaction)
    }

    /// This domain's ID, from the toolstack's `domid` node (a relative path: relative paths
    /// are under the domain's home).
    public func domainID() throws(GuestError) -> DomainID {
        guard let id = Bytes.decimal(Self.trimmed(try read("domid"))), id < UInt64(VIREO_DOMID_FIRST_RESERVED) else {
            throw GuestError.EINVAL
        }
        return DomainID(UInt16(id))
    }

    /// This domain's home path ("/local/domain/ID").
    public func domainPath() throws(GuestError) -> [UInt8] {
        let id = try domainID()
        return Self.trimmed(try request(VIREO_XS_GET_DOMAIN_PATH, Bytes.decimal(UInt64(id.rawValue)) + [0], transaction: 0))
    }

    /// Watches `path` (and below); the store fires the watch once at once.
    public func watch(_ path: String, token: String) throws(GuestError) {
        _ = try request(VIREO_XS_WATCH, Self.string(path) + [0] + Self.string(token) + [0], transaction: 0)
    }

    public func unwatch(_ path: String, token: String) throws(GuestError) {
        _ = try request(VIREO_XS_UNWATCH, Self.string(path) + [0] + Self.string(token) + [0], transaction: 0)
    }

    /// Watch events received so far, oldest first.
    public func takeWatchEvents() -> [XenStoreWatchEvent] {
        pump()
        _ = takeReply(0)
        let events = watchEvents
        watchEvents = []
        return events
    }

    /// Runs the guest's loop until a watch event arrives; returns it.
    public func waitForWatchEvent() throws(GuestError) -> XenStoreWatchEvent {
        while true {
            try receive()
            _ = takeReply(0)  // no request has ID 0: this only queues watch events
            if !watchEvents.isEmpty { return watchEvents.removeFirst() }
            guest.runOnce()
        }
    }

    // MARK: Transactions

    public func transactionStart() throws(GuestError) -> UInt32 {
        let reply = Self.trimmed(try request(VIREO_XS_TRANSACTION_START, [0], transaction: 0))
        guard let id = Bytes.decimal(reply), id != 0, id <= UInt64(UInt32.max) else { throw GuestError.EIO }
        return UInt32(id)
    }

    /// Ends a transaction: commits it (EAGAIN when it conflicted) or aborts it.
    public func transactionEnd(_ id: UInt32, commit: Bool) throws(GuestError) {
        _ = try request(VIREO_XS_TRANSACTION_END, Bytes.of(commit ? "T" : "F") + [0], transaction: id)
    }

    /// Runs `body` in a transaction and commits it, starting again from the top whenever the
    /// store answers EAGAIN (another writer touched what the transaction read). An error from
    /// `body` aborts the transaction and is rethrown.
    public func transaction<Result>(maxAttempts: Int = 16,
                                    _ body: (UInt32) throws(GuestError) -> Result) throws(GuestError) -> Result {
        var attempts = 0
        while true {
            attempts += 1
            let id = try transactionStart()
            let result: Result
            do {
                result = try body(id)
            } catch {
                try? transactionEnd(id, commit: false)
                if error == .EAGAIN && attempts < maxAttempts { continue }
                throw error
            }
            do {
                try transactionEnd(id, commit: true)
                return result
            } catch {
                if error != .EAGAIN || attempts >= maxAttempts { throw error }
            }
        }
    }

    // MARK: The wire

    static func string(_ text: String) -> [UInt8] { Array(text.utf8) }

    /// A reply without its trailing NUL, if any.
    static func trimmed(_ bytes: [UInt8]) -> [UInt8] {
        bytes.last == 0 ? Array(bytes.dropLast()) : bytes
    }

    /// Sends one request and waits for its reply; an XS_ERROR reply throws its errno.
    public func request(_ type: vireo_xsd_sockmsg_type, _ payload: [UInt8], transaction: UInt32) throws(GuestError) -> [UInt8] {
        guard payload.count <= Self.maxPayload else { throw GuestError.E2BIG }
        let id = nextRequestID
        nextRequestID = nextRequestID == UInt32.max ? 1 : nextRequestID + 1
        var message = [UInt8](repeating: 0, count: Self.headerSize)
        Self.put(type.rawValue, into: &message, at: 0)
        Self.put(id, into: &message, at: 4)
        Self.put(transaction, into: &message, at: 8)
        Self.put(UInt32(payload.count), into: &message, at: 12)
        message += payload
        try send(message)
        while true {
            try receive()
            if let reply = takeReply(id) {
                if reply.type == VIREO_XS_ERROR.rawValue { throw GuestError(storeErrorName: Self.trimmed(reply.payload)) }
                return reply.payload
            }
            guest.runOnce()
        }
    }

    static func put(_ value: UInt32, into bytes: inout [UInt8], at offset: Int) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    static func get(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        var value: UInt32 = 0
        for i in 0..<4 { value |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
        return value
    }

    /// Writes all of `message` into `req`, notifying the store after each piece and running
    /// the loop while the ring is full.
    func send(_ message: [UInt8]) throws(GuestError) {
        var done = 0
        while done < message.count {
            var wrote = -1
            message.withUnsafeBytes { raw in
                wrote = (try? requests.write(UnsafeRawBufferPointer(rebasing: raw[done...]))) ?? -1
            }
            guard wrote >= 0 else { throw GuestError.EIO }
            if wrote > 0 {
                try guest.send(port)
                done += wrote
            } else {
                guest.runOnce()
            }
        }
    }

    /// Moves whatever `rsp` holds into `input`, notifying the store when it made room.
    func receive() throws(GuestError) {
        var buffer = [UInt8](repeating: 0, count: 1024)
        while true {
            var count = -1
            buffer.withUnsafeMutableBytes { raw in count = (try? responses.read(into: raw)) ?? -1 }
            guard count >= 0 else { throw GuestError.EIO }
            guard count > 0 else { return }
            input += buffer[0..<count]
            try guest.send(port)
        }
    }

    /// Receives without throwing (for queries that only look).
    func pump() { try? receive() }

    /// Takes complete messages off the front of `input`: watch events are queued; the reply to
    /// `id` is returned.
    func takeReply(_ id: UInt32) -> (type: UInt32, payload: [UInt8])? {
        while input.count >= Self.headerSize {
            let type = Self.get(input, at: 0), requestID = Self.get(input, at: 4), length = Int(Self.get(input, at: 12))
            precondition(length <= Self.maxPayload, "XenStore reply longer than the protocol allows")
            guard input.count >= Self.headerSize + length else { return nil }
            let payload = Array(input[Self.headerSize..<(Self.headerSize + length)])
            input.removeFirst(Self.headerSize + length)
            if type == VIREO_XS_WATCH_EVENT.rawValue {
                let parts = payload.split(separator: 0, maxSplits: 1, omittingEmptySubsequences: false)
                let path = parts.isEmpty ? [] : Array(parts[0])
                let token = parts.count > 1 ? Self.trimmed(Array(parts[1])) : []
                watchEvents.append(XenStoreWatchEvent(path: path, token: token))
                continue
            }
            if requestID == id { return (type, payload) }
            // A reply to no outstanding request: the store broke the protocol; drop it.
        }
        return nil
    }
}
