import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix

/// The control API served over HTTP/1.1 on a Unix domain socket (mode 0600: the socket's
/// owner is the operator). One request per connection is typical; keep-alive is honoured.
/// Handlers run off the event loop (a destroy waits for the domain's threads).
public final class ControlServer: Sendable {
    public let socketPath: String
    private let group: MultiThreadedEventLoopGroup
    private let channel: Channel
    private let tcpChannel: Channel?

    public enum Failure: Error, CustomStringConvertible {
        case inUse(String)
        case bind(String, String)
        case notLoopback(String)
        public var description: String {
            switch self {
            case .inUse(let path): "another vireod answers on \(path)"
            case .bind(let path, let why): "cannot listen on \(path): \(why)"
            case .notLoopback(let host): "--listen-tcp \(host): only loopback addresses (127.0.0.0/8, ::1) are served over TCP"
            }
        }
    }

    /// Serves on `socketPath`, and also on `tcp` (a loopback host and port) when given: the
    /// TCP listener exists for HTTP tools that cannot use a Unix socket (API fuzzers); it has no
    /// authentication, so only loopback addresses are accepted.
    public init(api: ControlAPI, socketPath: String, tcp: (host: String, port: Int)? = nil) throws {
        self.socketPath = socketPath
        // A socket file left by a daemon that died is removed; a live one is not taken over.
        var existing = stat()
        if lstat(socketPath, &existing) == 0 {
            // Only a socket is ever removed: any other file at the path is the operator's.
            guard (existing.st_mode & S_IFMT) == S_IFSOCK else { throw Failure.bind(socketPath, "a file that is not a socket is there") }
            if (try? DaemonClient(socketPath: socketPath).request("GET", "/v1/version", timeout: 5)) != nil { throw Failure.inUse(socketPath) }
            unlink(socketPath)
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HTTPHandler(api: api))
                }
            }
        do {
            let previous = umask(0o077)
            defer { umask(previous) }
            channel = try bootstrap.bind(unixDomainSocketPath: socketPath).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw Failure.bind(socketPath, "\(error)")
        }
        if let tcp {
            guard let address = try? SocketAddress.makeAddressResolvingHost(tcp.host, port: tcp.port),
                  Self.isLoopback(address) else {
                try? channel.close().wait()
                try? group.syncShutdownGracefully()
                unlink(socketPath)
                throw Failure.notLoopback(tcp.host)
            }
            do {
                tcpChannel = try bootstrap.bind(to: address).wait()
            } catch {
                try? channel.close().wait()
                try? group.syncShutdownGracefully()
                unlink(socketPath)
                throw Failure.bind("\(tcp.host):\(tcp.port)", "\(error)")
            }
        } else {
            tcpChannel = nil
        }
        self.group = group
    }

    static func isLoopback(_ address: SocketAddress) -> Bool {
        switch address {
        case .v4(let v4): return (UInt32(bigEndian: v4.address.sin_addr.s_addr) >> 24) == 127
        case .v6: return address.ipAddress == "::1"
        default: return false
        }
    }

    /// The TCP port actually bound (when asked for port 0).
    public var tcpPort: Int? { tcpChannel?.localAddress?.port }

    /// Stops listening and removes the socket file.
    public func close() {
        try? tcpChannel?.close().wait()
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        unlink(socketPath)
    }
}

/// Collects one request (head, body up to ``ControlAPI/maxBody``), answers it from a
/// global queue, writes the response on the channel's loop.
final class HTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let api: ControlAPI
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var tooLarge = false

    init(api: ControlAPI) { self.api = api }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = []
            tooLarge = false
        case .body(var buffer):
            if body.count + buffer.readableBytes > ControlAPI.maxBody {
                tooLarge = true
                body = []
            } else if !tooLarge, let bytes = buffer.readBytes(length: buffer.readableBytes) {
                body += bytes
            }
        case .end:
            guard let head else { return }
            self.head = nil
            let keepAlive = head.isKeepAlive
            let eventLoop = context.eventLoop
            let bound = NIOLoopBound(context, eventLoop: eventLoop)
            if tooLarge {
                let response = ControlAPI.error(APIError(413, "the body is larger than \(ControlAPI.maxBody) bytes", field: "body"))
                Self.respond(response, keepAlive: false, context: context)
                return
            }
            let request = APIRequest(method: head.method.rawValue, target: head.uri, body: body)
            body = []
            let api = self.api
            DispatchQueue.global().async {
                let response = api.handle(request)
                eventLoop.execute { Self.respond(response, keepAlive: keepAlive, context: bound.value) }
            }
        }
    }

    static func respond(_ response: APIResponse, keepAlive: Bool, context: ChannelHandlerContext) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: "\(response.body.count)")
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        for (name, value) in response.headers { headers.add(name: name, value: value) }
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: response.status), headers: headers)
        context.write(NIOAny(HTTPServerResponsePart.head(head)), promise: nil)
        context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(context.channel.allocator.buffer(bytes: response.body)))), promise: nil)
        let done = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: done)
        if !keepAlive {
            let channel = context.channel
            done.futureResult.whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
