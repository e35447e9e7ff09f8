import Glibc
import Synchronization
import VireoABI

/// A socket-level failure, naming the call and the errno.
public struct XenStoreSocketError: Error, Sendable, CustomStringConvertible {
    public let operation: String
    public let errno: Int32
    public let path: String

    public init(operation: String, errno: Int32, path: String) {
        self.operation = operation
        self.errno = errno
        self.path = path
    }

    public var description: String {
        "\(operation) \(path): \(String(cString: strerror(errno)))"
    }
}

/// Unix socket plumbing shared by the server and the client.
enum UnixSocket {
    static func address(_ path: String) throws(XenStoreSocketError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw XenStoreSocketError(operation: "socket path", errno: ENAMETOOLONG, path: path)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    static func withSockaddr<R>(_ address: inout sockaddr_un, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    static func stream() -> Int32 { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }

    static func setNonBlocking(_ fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }
}

/// One socket client of the server, touched only by the server's loop thread (and its
/// `flushRequested` flag by whoever queues output).
private final class SocketClient: @unchecked Sendable {
    let fd: Int32
    var connection: XenStoreConnection!
    var decoder = XenStoreDecoder()
    let flushRequested = Atomic<Bool>(false)

    init(fd: Int32) { self.fd = fd }
}

/// The store's Unix socket: every client is a privileged dom0 connection, as for Xen's
/// xenstored socket; Xen's `xenstore-*` tools reach it with `XENSTORED_PATH`.
///
/// One thread polls every client: it reads requests, runs them through the store in batches,
/// and writes replies and watch events. Output queued by other threads (a guest's ring, the
/// toolstack) wakes it through an eventfd. A client that leaves more than the
/// outstanding-request quota of replies unread is not read from until it catches up.
public final class XenStoreSocketServer: Sendable {
    public let store: XenStore
    public let path: String
    private let listenFD: Int32
    /// The loop's wake-up pipe: read end polled, write end kicked.
    private let wakeFD: Int32
    private let kickFD: Int32
    private let stopping = Atomic<Bool>(false)
    private let loopThread = Atomic<UInt>(0)
    private let thread = Mutex<pthread_t?>(nil)
    private let finished = Atomic<Bool>(false)

    /// Binds and listens on `path` (a stale socket file there is replaced).
    public init(store: XenStore, path: String) throws(XenStoreSocketError) {
        var address = try UnixSocket.address(path)
        let fd = UnixSocket.stream()
        guard fd >= 0 else { throw XenStoreSocketError(operation: "socket", errno: errno, path: path) }
        unlink(path)
        guard UnixSocket.withSockaddr(&address, { bind(fd, $0, $1) }) == 0 else {
            let e = errno
            close(fd)
            throw XenStoreSocketError(operation: "bind", errno: e, path: path)
        }
        guard listen(fd, 128) == 0 else {
            let e = errno
            close(fd)
            unlink(path)
            throw XenStoreSocketError(operation: "listen", errno: e, path: path)
        }
        UnixSocket.setNonBlocking(fd)
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else {
            let e = errno
            close(fd)
            unlink(path)
            throw XenStoreSocketError(operation: "pipe", errno: e, path: path)
        }
        for p in pipeFDs {
            UnixSocket.setNonBlocking(p)
            _ = fcntl(p, F_SETFD, FD_CLOEXEC)
        }
        self.store = store
        self.path = path
        self.listenFD = fd
        self.wakeFD = pipeFDs[0]
        self.kickFD = pipeFDs[1]
    }

    deinit {
        stop()
    }

    private final class Box: @unchecked Sendable {
        let server: XenStoreSocketServer
        init(_ s: XenStoreSocketServer) { server = s }
    }

    /// Runs the loop on a new thread.
    public func start() {
        let context = Unmanaged.passRetained(Box(self)).toOpaque()
        var t = pthread_t()
        let status = pthread_create(&t, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().server.run()
            return nil
        }, context)
        precondition(status == 0, "pthread_create failed: \(status)")
        thread.withLock { $0 = t }
    }

    /// Stops the loop, closes every client and the socket, and removes the socket file.
    public func stop() {
        if !stopping.exchange(true, ordering: .sequentiallyConsistent) {
            kick()
        }
        if let t = thread.withLock({ v -> pthread_t? in defer { v = nil }; return v }) {
            pthread_join(t, nil)
        }
        if !finished.exchange(true, ordering: .sequentiallyConsistent) {
            close(listenFD)
            close(wakeFD)
            close(kickFD)
            unlink(path)
        }
    }

    /// Asks the loop (from any thread, signal handlers included) to stop.
    public func requestStop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        kick()
    }

    private func kick() {
        var one: UInt8 = 1
        _ = write(kickFD, &one, 1)
    }

    private var onLoopThread: Bool { loopThread.load(ordering: .relaxed) == UInt(pthread_self()) }

    /// The loop, on the calling thread, until ``stop()`` or ``requestStop()``.
    public func run() {
        loopThread.store(UInt(pthread_self()), ordering: .relaxed)
        var clients: [SocketClient] = []
        var fds: [pollfd] = []
        let bufferSize = 65536
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 16)
        defer { buffer.deallocate() }
        let outstanding = store.quotas.outstandingRequests

        func drop(_ client: SocketClient) {
            store.disconnect(client.connection)
            close(client.fd)
            clients.removeAll { $0 === client }
        }

        /// Writes what the client has queued; false if the client is gone.
        func flush(_ client: SocketClient) -> Bool {
            client.flushRequested.store(false, ordering: .relaxed)
            var broken = false
            client.connection.drain { bytes in
                let n = send(client.fd, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno != EAGAIN && errno != EINTR { broken = true }
                    return 0
                }
                return n
            }
            return !broken
        }

        /// Handles the client's buffered requests while fewer than the quota of its replies wait
        /// unread, writing output as it goes; false if the client is to be dropped.
        func serve(_ client: SocketClient) -> Bool {
            while true {
                guard flush(client) else { return false }
                let room = outstanding - client.connection.pendingReplies
                var batch: [XenStoreMessage] = []
                var broken = false
                while batch.count < room {
                    do {
                        guard let m = try client.decoder.next() else { break }
                        batch.append(m)
                    } catch {
                        broken = true  // a length beyond the payload maximum: drop the client
                        break
                    }
                }
                if !batch.isEmpty { store.process(batch, from: client.connection) }
                guard flush(client), !broken else { return false }
                if batch.isEmpty || room <= 0 { return true }
            }
        }

        while !stopping.load(ordering: .relaxed) {
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0))
            fds.append(pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0))
            for c in clients {
                var events: Int16 = 0
                let box = c.connection.outbox.withLock { ($0.replies, !$0.isEmpty) }
                // Read more only while replies are being read and little input is buffered.
                if box.0 < outstanding && c.decoder.bufferedCount < bufferSize { events |= Int16(POLLIN) }
                if box.1 { events |= Int16(POLLOUT) }
                fds.append(pollfd(fd: c.fd, events: events, revents: 0))
            }
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 { if errno == EINTR { continue } else { break } }

            if fds[1].revents != 0 {
                var drained = [UInt8](repeating: 0, count: 256)
                while read(wakeFD, &drained, drained.count) > 0 {}
            }
            let polled = clients
            var gone: [SocketClient] = []
            for (i, client) in polled.enumerated() {
                let revents = fds[i + 2].revents
                guard revents != 0 else { continue }
                if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    let n = recv(client.fd, buffer.baseAddress, bufferSize, 0)
                    if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) {
                        gone.append(client)
                        continue
                    }
                    if n > 0 { client.decoder.append(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) }
                }
                if !serve(client) { gone.append(client) }
            }
            for client in gone { drop(client) }
            // Output other clients' requests (or other threads) queued.
            for client in clients where client.flushRequested.load(ordering: .relaxed) {
                if !serve(client) { drop(client) }
            }

            if fds[0].revents != 0 {
                while true {
                    let fd = accept(listenFD, nil, nil)
                    guard fd >= 0 else { break }
                    UnixSocket.setNonBlocking(fd)
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    let client = SocketClient(fd: fd)
                    client.connection = store.connect(domain: .zero, privileged: true) { [weak self, client] in
                        client.flushRequested.store(true, ordering: .relaxed)
                        if let self, !self.onLoopThread { self.kick() }
                    }
                    clients.append(client)
                }
            }
        }
        for client in clients {
            store.disconnect(client.connection)
            close(client.fd)
        }
    }
}

/// A blocking client of the store's socket (the bench's and the tests'; tools use Xen's own).
public final class XenStoreSocketClient {
    public let fd: Int32
    private var decoder = XenStoreDecoder()
    private var nextRequest: UInt32 = 1
    /// Watch events received while waiting for replies, oldest first.
    public private(set) var events: [XenStoreMessage] = []
    private var buffer = [UInt8](repeating: 0, count: 65536)

    public init(path: String) throws(XenStoreSocketError) {
        var address = try UnixSocket.address(path)
        let fd = UnixSocket.stream()
        guard fd >= 0 else { throw XenStoreSocketError(operation: "socket", errno: errno, path: path) }
        guard UnixSocket.withSockaddr(&address, { connect(fd, $0, $1) }) == 0 else {
            let e = errno
            close(fd)
            throw XenStoreSocketError(operation: "connect", errno: e, path: path)
        }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends raw bytes (hostile tests write malformed headers with this).
    public func sendRaw(_ bytes: [UInt8]) throws(XenStoreSocketError) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else {
                if n < 0 && errno == EINTR { continue }
                throw XenStoreSocketError(operation: "send", errno: n < 0 ? errno : EPIPE, path: "")
            }
            done += n
        }
    }

    /// Sends `message` with the next request ID (returned).
    @discardableResult
    public func send(_ message: XenStoreMessage) throws(XenStoreSocketError) -> UInt32 {
        var m = message
        m.requestID = nextRequest
        nextRequest &+= 1
        try sendRaw(m.encoded)
        return m.requestID
    }

    /// The next message from the store (reply or event); nil when the store closed the socket.
    public func receive() throws(XenStoreSocketError) -> XenStoreMessage? {
        while true {
            do {
                if let m = try decoder.next() { return m }
            } catch {
                throw XenStoreSocketError(operation: "decode", errno: EPROTO, path: "")
            }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { return nil }
            if n < 0 {
                if errno == EINTR { continue }
                throw XenStoreSocketError(operation: "recv", errno: errno, path: "")
            }
            decoder.append(Array(buffer[0..<n]))
        }
    }

    /// The next reply (events before it are kept in ``events``).
    public func receiveReply() throws(XenStoreSocketError) -> XenStoreMessage? {
        while let m = try receive() {
            if m.type == .watchEvent { events.append(m) } else { return m }
        }
        return nil
    }

    /// Sends a request and waits for its reply.
    public func request(_ message: XenStoreMessage) throws(XenStoreSocketError) -> XenStoreMessage? {
        try send(message)
        return try receiveReply()
    }

    /// The next watch event (one already received first).
    public func nextEvent() throws(XenStoreSocketError) -> XenStoreMessage? {
        if !events.isEmpty { return events.removeFirst() }
        while let m = try receive() {
            if m.type == .watchEvent { return m }
        }
        return nil
    }
}
