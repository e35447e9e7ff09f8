import Synchronization
import VireoABI

/// What the store calls when domains come and go, so that whoever owns guest memory can
/// attach (and detach) the domain's ring transport. Both run without the store's lock held.
public struct XenStoreDomainHooks: Sendable {
    /// A domain was introduced with its store page's frame and its event channel port.
    public var introduce: @Sendable (DomainID, GuestFrame, EventPort) throws -> Void
    /// A domain was released: its connection is already closed.
    public var release: @Sendable (DomainID) -> Void

    public init(introduce: @escaping @Sendable (DomainID, GuestFrame, EventPort) throws -> Void,
                release: @escaping @Sendable (DomainID) -> Void) {
        self.introduce = introduce
        self.release = release
    }
}

/// Counts the store keeps about itself.
public struct XenStoreStatistics: Sendable, Equatable {
    public var nodes: Int
    public var connections: Int
    public var watches: Int
    public var openTransactions: Int
    public var domains: Int
    public var droppedEvents: Int
}

/// A XenStore: the tree with Xen's permissions, transactions, watches, domains and quotas,
/// shared by every transport (the Unix socket for tools, a ring page per guest).
///
/// The engine is pure: a message in from a connection, replies and watch events out into
/// connections' outboxes; transports move the bytes. One lock covers the tree; every request
/// runs to completion under it, which is what makes transactions and watch order simple.
public final class XenStore: Sendable {
    public let quotas: XenStoreQuotas
    private let core: Mutex<StoreCore>
    private let hooks = Mutex<XenStoreDomainHooks?>(nil)

    public init(quotas: XenStoreQuotas = XenStoreQuotas()) {
        self.quotas = quotas
        self.core = Mutex(StoreCore(quotas: quotas))
    }

    /// Installs the hooks that attach and detach ring transports.
    public func setDomainHooks(_ hooks: XenStoreDomainHooks?) {
        self.hooks.withLock { $0 = hooks }
    }

    private func locked<R>(_ body: (StoreCore) throws(XenStoreError) -> R) throws(XenStoreError) -> R {
        let (result, wake) = core.withLock { core -> (Result<R, XenStoreError>, [XenStoreConnection]) in
            let r: Result<R, XenStoreError>
            do throws(XenStoreError) { r = .success(try body(core)) } catch { r = .failure(error) }
            return (r, core.takeWakeList())
        }
        for c in wake { c.wake() }
        return try result.get()
    }

    // MARK: Connections

    /// A new client. `privileged` defaults to true for domain 0 (the toolstack's tools).
    /// `wake` is called (without the store's lock) when the connection has new output.
    public func connect(domain: DomainID = .zero, privileged: Bool? = nil,
                        wake: @escaping @Sendable () -> Void = {}) -> XenStoreConnection {
        core.withLock { $0.connect(domain: domain, privileged: privileged ?? (domain == .zero), wake: wake) }
    }

    /// Ends a client: its watches and open transactions go.
    public func disconnect(_ connection: XenStoreConnection) {
        try? locked { core in core.disconnect(connection.id) }
    }

    /// Drops a connection's watches, open transactions and queued output, keeping it open
    /// (a guest's reconnection).
    public func reset(_ connection: XenStoreConnection) {
        try? locked { core in core.reset(connection.id) }
    }

    /// Handles one request from `connection`: its reply, and any watch events it causes, go
    /// to the outboxes of the connections concerned.
    public func process(_ message: XenStoreMessage, from connection: XenStoreConnection) {
        switch message.type {
        case .introduce: processIntroduce(message, from: connection)
        case .release: processRelease(message, from: connection)
        default: try? locked { core in core.handle(message, from: connection.id) }
        }
    }

    /// Handles several requests under one acquisition of the lock (a transport's batch).
    public func process(_ messages: [XenStoreMessage], from connection: XenStoreConnection) {
        var start = 0
        while start < messages.count {
            var end = start
            while end < messages.count && messages[end].type != .introduce && messages[end].type != .release { end += 1 }
            if end > start {
                try? locked { core in for m in messages[start..<end] { core.handle(m, from: connection.id) } }
            }
            if end < messages.count { process(messages[end], from: connection) }
            start = end + 1
        }
    }

    /// Sends `message` and returns its reply (and drains any events queued before it), for
    /// in-process clients: the toolstack, tests, the benchmark's baseline.
    public func request(_ message: XenStoreMessage, from connection: XenStoreConnection) -> XenStoreMessage? {
        process(message, from: connection)
        return connection.takeMessages().last { $0.type != .watchEvent }
    }

    // MARK: Domains

    /// Introduces a domain (what INTRODUCE does for the toolstack): calls the introduce hook to
    /// attach its ring, records it, creates its home if missing and fires @introduceDomain.
    /// Introducing a domain again with the same page and port does nothing.
    /// - Throws: EINVAL for dom0 or a reserved ID, EEXIST for a different page or port, EIO
    ///   when the hook fails.
    public func introduceDomain(_ id: DomainID, frame: GuestFrame = GuestFrame(0), port: EventPort = EventPort(0)) throws(XenStoreError) {
        guard try locked({ core throws(XenStoreError) in try core.checkIntroduce(id, frame: frame, port: port) }) else { return }
        if let hook = hooks.withLock({ $0 }) {
            do { try hook.introduce(id, frame, port) } catch { throw .EIO }
        }
        try locked { core throws(XenStoreError) in try core.recordIntroduce(id, frame: frame, port: port) }
    }

    /// Releases a domain (what RELEASE does): see the store's cleanup in Docs/xenstore.md.
    /// Then calls the release hook. - Throws: ENOENT if it was not introduced.
    public func releaseDomain(_ id: DomainID) throws(XenStoreError) {
        try locked { core throws(XenStoreError) in try core.release(id) }
        hooks.withLock { $0 }?.release(id)
    }

    public func isIntroduced(_ id: DomainID) -> Bool {
        core.withLock { $0.isIntroduced(id) }
    }

    private func processIntroduce(_ m: XenStoreMessage, from connection: XenStoreConnection) {
        let result: XenStoreError?
        do throws(XenStoreError) {
            guard connection.isPrivileged else { throw .EACCES }
            let args = try StoreCore.strings(m.payload, atLeast: 3)
            let id = try XenStoreNumber.domain(Substring(StoreCore.text(args[0])))
            guard let frame = XenStoreNumber.parse(Substring(StoreCore.text(args[1])), as: UInt64.self),
                  let port = XenStoreNumber.parse(Substring(StoreCore.text(args[2])), as: UInt32.self) else { throw .EINVAL }
            try introduceDomain(id, frame: GuestFrame(frame), port: EventPort(port))
            result = nil
        } catch {
            result = error
        }
        finish(m, connection, result)
    }

    private func processRelease(_ m: XenStoreMessage, from connection: XenStoreConnection) {
        let result: XenStoreError?
        do throws(XenStoreError) {
            guard connection.isPrivileged else { throw .EACCES }
            let id = try XenStoreNumber.domain(Substring(StoreCore.text(try StoreCore.single(m.payload))))
            try releaseDomain(id)
            result = nil
        } catch {
            result = error
        }
        finish(m, connection, result)
    }

    private func finish(_ m: XenStoreMessage, _ connection: XenStoreConnection, _ error: XenStoreError?) {
        try? locked { core in
            guard let record = core.connections[connection.id] else { return }
            if let error { core.reply(record, to: m, error: error) } else { core.reply(record, to: m, StoreCore.ok) }
        }
    }

    // MARK: Inspection

    public var statistics: XenStoreStatistics {
        core.withLock { c in
            XenStoreStatistics(nodes: c.nodes.count, connections: c.connections.count,
                               watches: c.watchCounts.values.reduce(0, +), openTransactions: c.openTransactions,
                               domains: c.domains.count, droppedEvents: c.droppedEvents)
        }
    }

    /// Nodes owned by `domain` (what its node quota counts).
    public func ownedNodes(_ domain: DomainID) -> Int {
        core.withLock { $0.nodeCounts[domain.rawValue, default: 0] }
    }

    /// Every path whose permissions name `domain` (owner or listed); for tests and audits.
    public func paths(naming domain: DomainID) -> [String] {
        core.withLock { c in
            c.nodes.filter { $0.value.permissions.contains { $0.domain == domain } }.keys.sorted()
        }
    }

    /// Problems in the tree's invariants; empty when consistent.
    public func check() -> [String] { core.withLock { $0.checkTree() } }
}
