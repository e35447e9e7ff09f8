import Foundation
import Glibc

/// A blocking HTTP/1.1 client for the control API over its Unix socket: what `vireo`'s verbs
/// use. One connection per request (`Connection: close`).
public struct DaemonClient: Sendable {
    public let socketPath: String

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public struct Response: Sendable {
        public var status: Int
        public var body: [UInt8]
        /// Header fields, names in lower case.
        public var headers: [String: String] = [:]
        public var text: String { String(decoding: body, as: UTF8.self) }
        /// The error body's message, or the text.
        public var errorMessage: String {
            (try? JSONDecoder().decode(ErrorBody.self, from: Data(body)).error) ?? text
        }
    }

    /// The socket path: the given one, else `VIREO_SOCKET`, else /run/vireo/vireod.sock.
    public static func defaultSocket(_ given: String? = nil) -> String {
        given ?? ProcessInfo.processInfo.environment["VIREO_SOCKET"] ?? "/run/vireo/vireod.sock"
    }

    public init(socketPath: String) { self.socketPath = socketPath }

    /// Sends one request and reads the whole response.
    /// - Throws: ``Failure`` "cannot reach vireod at PATH: ..." when the socket does not answer.
    public func request(_ method: String, _ target: String, body: [UInt8]? = nil, timeout: Int = 120) throws -> Response {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "cannot reach vireod at \(socketPath): socket: \(Self.errnoText())") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw Failure(description: "cannot reach vireod at \(socketPath): the path is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw Failure(description: "cannot reach vireod at \(socketPath): \(Self.errnoText()) (is vireod running? --socket or VIREO_SOCKET name its socket)")
        }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var head = "\(method) \(target) HTTP/1.1\r\nHost: vireod\r\nConnection: close\r\n"
        if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
        let message = Array((head + "\r\n").utf8) + (body ?? [])
        var sent = 0
        while sent < message.count {
            let n = message[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Failure(description: "vireod at \(socketPath) closed the connection: \(Self.errnoText())") }
            sent += n
        }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw Failure(description: "no answer from vireod at \(socketPath): \(Self.errnoText())") }
            if n == 0 { break }
            received += buffer[..<n]
        }
        return try Self.parse(received, from: socketPath)
    }

    static func parse(_ bytes: [UInt8], from path: String) throws -> Response {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = bytes.indices.first(where: { bytes[$0...].starts(with: separator) }) else {
            throw Failure(description: "vireod at \(path) sent no HTTP response")
        }
        let headLines = String(decoding: bytes[..<end], as: UTF8.self).components(separatedBy: "\r\n")
        let statusParts = headLines.first?.split(separator: " ") ?? []
        guard statusParts.count >= 2, let status = Int(statusParts[1]) else {
            throw Failure(description: "vireod at \(path) sent a bad status line")
        }
        var body = Array(bytes[(end + 4)...])
        var headers: [String: String] = [:]
        for line in headLines.dropFirst() {
            let pair = line.split(separator: ":", maxSplits: 1)
            guard pair.count == 2 else { continue }
            let name = pair[0].lowercased(), value = pair[1].trimmingCharacters(in: .whitespaces)
            headers[name] = value
            if name == "content-length", let length = Int(value), length <= body.count {
                body = Array(body[..<length])
            }
        }
        return Response(status: status, body: body, headers: headers)
    }

    static func errnoText() -> String { String(cString: strerror(errno)) }
}
