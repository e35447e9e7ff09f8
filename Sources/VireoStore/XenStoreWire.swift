import VireoHypercalls

/// A message type of the xenstore wire protocol (`enum xsd_sockmsg_type`).
public struct XenStoreMessageType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ raw: vireo_xsd_sockmsg_type) { self.rawValue = raw.rawValue }

    public static let control = Self(VIREO_XS_CONTROL)
    public static let directory = Self(VIREO_XS_DIRECTORY)
    public static let read = Self(VIREO_XS_READ)
    public static let getPermissions = Self(VIREO_XS_GET_PERMS)
    public static let watch = Self(VIREO_XS_WATCH)
    public static let unwatch = Self(VIREO_XS_UNWATCH)
    public static let transactionStart = Self(VIREO_XS_TRANSACTION_START)
    public static let transactionEnd = Self(VIREO_XS_TRANSACTION_END)
    public static let introduce = Self(VIREO_XS_INTRODUCE)
    public static let release = Self(VIREO_XS_RELEASE)
    public static let getDomainPath = Self(VIREO_XS_GET_DOMAIN_PATH)
    public static let write = Self(VIREO_XS_WRITE)
    public static let mkdir = Self(VIREO_XS_MKDIR)
    public static let rm = Self(VIREO_XS_RM)
    public static let setPermissions = Self(VIREO_XS_SET_PERMS)
    public static let watchEvent = Self(VIREO_XS_WATCH_EVENT)
    public static let error = Self(VIREO_XS_ERROR)
    public static let isDomainIntroduced = Self(VIREO_XS_IS_DOMAIN_INTRODUCED)
    public static let resume = Self(VIREO_XS_RESUME)
    public static let setTarget = Self(VIREO_XS_SET_TARGET)
    public static let resetWatches = Self(VIREO_XS_RESET_WATCHES)
    public static let directoryPart = Self(VIREO_XS_DIRECTORY_PART)

    static let names: [UInt32: String] = [
        0: "CONTROL", 1: "DIRECTORY", 2: "READ", 3: "GET_PERMS", 4: "WATCH", 5: "UNWATCH",
        6: "TRANSACTION_START", 7: "TRANSACTION_END", 8: "INTRODUCE", 9: "RELEASE",
        10: "GET_DOMAIN_PATH", 11: "WRITE", 12: "MKDIR", 13: "RM", 14: "SET_PERMS",
        15: "WATCH_EVENT", 16: "ERROR", 17: "IS_DOMAIN_INTRODUCED", 18: "RESUME",
        19: "SET_TARGET", 21: "RESET_WATCHES", 22: "DIRECTORY_PART",
    ]

    public var description: String { Self.names[rawValue] ?? "type \(rawValue)" }
}

/// An error a reply carries: the payload of an `XS_ERROR` reply is the name, NUL-terminated.
/// The names are Xen's table (`vireo_xsd_errors`); the store uses no others.
public enum XenStoreError: String, Error, Sendable, CaseIterable, CustomStringConvertible {
    case EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO, ENOTEMPTY, ENOSYS, EROFS,
         EBUSY, EAGAIN, EISCONN, E2BIG, EPERM

    /// The reply payload: the name and a NUL.
    public var payload: [UInt8] { Array(rawValue.utf8) + [0] }
    public var description: String { rawValue }
}

/// One message of the wire protocol: the 16-byte header's fields and the payload.
public struct XenStoreMessage: Sendable, Equatable, CustomStringConvertible {
    public var type: XenStoreMessageType
    public var requestID: UInt32
    public var transactionID: UInt32
    public var payload: [UInt8]

    public init(type: XenStoreMessageType, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8]) {
        self.type = type
        self.requestID = requestID
        self.transactionID = transactionID
        self.payload = payload
    }

    /// A request whose payload is `strings`, each NUL-terminated (the common form).
    public init(_ type: XenStoreMessageType, _ strings: String..., requestID: UInt32 = 0, transactionID: UInt32 = 0) {
        var payload: [UInt8] = []
        for s in strings { payload += Array(s.utf8); payload.append(0) }
        self.init(type: type, requestID: requestID, transactionID: transactionID, payload: payload)
    }

    /// The header's size on the wire.
    public static let headerSize = MemoryLayout<vireo_xsd_sockmsg>.size
    /// The largest payload, either way.
    public static let payloadMax = Int(VIREO_XENSTORE_PAYLOAD_MAX)

    /// The NUL-separated strings of the payload; a trailing piece without a NUL is included.
    public var strings: [String] {
        guard !payload.isEmpty else { return [] }
        var parts = payload.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        if payload.last == 0 { parts.removeLast() }
        return parts
    }

    /// The payload as text without its final NUL (a read value or a single-string reply).
    public var text: String {
        String(decoding: payload.last == 0 ? payload.dropLast() : payload[...], as: UTF8.self)
    }

    /// The error this reply carries, if it is an `XS_ERROR`.
    public var error: XenStoreError? {
        type == .error ? XenStoreError(rawValue: text) : nil
    }

    /// Header and payload, little-endian, as they travel.
    public var encoded: [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(Self.headerSize + payload.count)
        encode(into: &bytes)
        return bytes
    }

    public func encode(into bytes: inout [UInt8]) {
        for word in [type.rawValue, requestID, transactionID, UInt32(payload.count)] {
            bytes.append(UInt8(truncatingIfNeeded: word))
            bytes.append(UInt8(truncatingIfNeeded: word >> 8))
            bytes.append(UInt8(truncatingIfNeeded: word >> 16))
            bytes.append(UInt8(truncatingIfNeeded: word >> 24))
        }
        bytes += payload
    }

    public var description: String {
        let shown = payload.map { $0 == 0 ? "|" : ($0 >= 32 && $0 < 127 ? String(UnicodeScalar($0)) : "?") }.joined()
        return "\(type) req \(requestID) tx \(transactionID) \"\(shown)\""
    }
}

/// The stream broke the protocol: the connection cannot continue.
public enum XenStoreWireError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A header announced more than ``XenStoreMessage/payloadMax`` bytes.
    case payloadTooLong(UInt32)

    public var description: String {
        switch self {
        case .payloadTooLong(let n): "xenstore message payload of \(n) bytes exceeds \(XenStoreMessage.payloadMax)"
        }
    }
}

/// Reassembles messages from a byte stream that may arrive in any fragments (a header split
/// over ring updates, many messages in one read).
public struct XenStoreDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    /// Bytes received but not yet part of a complete message.
    public var bufferedCount: Int { buffer.count - start }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        compact()
        buffer.append(contentsOf: bytes)
    }

    public mutating func append(_ bytes: [UInt8]) {
        compact()
        buffer += bytes
    }

    /// Drops everything buffered (a reconnection).
    public mutating func reset() {
        buffer.removeAll(keepingCapacity: true)
        start = 0
    }

    private mutating func compact() {
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeSubrange(0..<start)
            start = 0
        }
    }

    private func word(_ at: Int) -> UInt32 {
        UInt32(buffer[at]) | UInt32(buffer[at + 1]) << 8 | UInt32(buffer[at + 2]) << 16 | UInt32(buffer[at + 3]) << 24
    }

    /// The next complete message, nil if more bytes are needed.
    /// - Throws: ``XenStoreWireError/payloadTooLong(_:)`` as soon as a header announces too much.
    public mutating func next() throws(XenStoreWireError) -> XenStoreMessage? {
        guard buffer.count - start >= XenStoreMessage.headerSize else { return nil }
        let length = word(start + 12)
        guard length <= UInt32(XenStoreMessage.payloadMax) else { throw .payloadTooLong(length) }
        let end = start + XenStoreMessage.headerSize + Int(length)
        guard buffer.count >= end else { return nil }
        let message = XenStoreMessage(
            type: XenStoreMessageType(rawValue: word(start)), requestID: word(start + 4),
            transactionID: word(start + 8), payload: Array(buffer[(start + XenStoreMessage.headerSize)..<end]))
        start = end
        if start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0 }
        return message
    }
}
