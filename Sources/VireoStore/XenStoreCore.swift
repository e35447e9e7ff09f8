import VireoABI

/// One node of the tree.
struct StoreNode {
    var value: [UInt8]
    var permissions: [XenStorePermission]
    var children: [String]
    /// The store's generation when the node last changed (transactions compare it).
    var generation: UInt64 = 0

    var owner: UInt16 { permissions[0].domain.rawValue }
    /// What the node-size quota counts: the value and 4 bytes per permission entry.
    static func size(value: Int, permissions: Int) -> Int { value + 4 * permissions }
}

/// A registered watch.
struct Watch {
    let connection: UInt64
    /// Absolute node path, or a special "@..." path.
    let path: String
    let token: [UInt8]
    /// Bytes to strip from fired paths: the domain path and its "/", if the watch was relative.
    let relativePrefix: Int
}

struct WatchKey: Hashable {
    let path: String
    let token: [UInt8]
}

/// A change to report to watchers: the path and the permissions the node had (after a write,
/// before a removal), checked against each watcher's read access.
struct PendingEvent {
    let path: String
    let permissions: [XenStorePermission]
    /// Fire only watches on exactly this path (descendants of a removed node).
    let exact: Bool
}

/// An open transaction: a private overlay on the tree and the generation of every node it
/// touched, checked at commit.
struct Transaction {
    let startGeneration: UInt64
    var overlay: [String: StoreNode?] = [:]
    var reads: [String: UInt64] = [:]
    var events: [PendingEvent] = []
    var nodeDelta: [UInt16: Int] = [:]
    /// Set when the transaction saw a node changed after it began: commit will fail.
    var conflicted = false
}

final class ConnectionRecord: @unchecked Sendable {  // only ever used under XenStore's lock
    let connection: XenStoreConnection
    var transactions: [UInt32: Transaction] = [:]
    var watches: Set<WatchKey> = []

    init(_ connection: XenStoreConnection) { self.connection = connection }
    var domain: DomainID { connection.domain }
    var isPrivileged: Bool { connection.isPrivileged }
}

struct DomainRecord {
    var frame: GuestFrame
    var port: EventPort
    var target: DomainID?
}

/// The store's state and its message handling: no I/O, no locks (XenStore holds it under one).
final class StoreCore: @unchecked Sendable {  // only ever used under XenStore's lock
    let quotas: XenStoreQuotas
    var nodes: [String: StoreNode] = [:]
    var generation: UInt64 = 1
    var nodeCounts: [UInt16: Int] = [:]
    var connections: [UInt64: ConnectionRecord] = [:]
    var watchIndex: [String: [Watch]] = [:]
    var watchCounts: [UInt16: Int] = [:]
    var domains: [UInt16: DomainRecord] = [:]
    var specialPermissions: [String: [XenStorePermission]] = [:]
    var nextConnection: UInt64 = 1
    var nextTransaction: UInt32 = 1
    var openTransactions = 0
    /// Connections with new output since the last call to ``takeWakeList()``.
    private var toWake: [XenStoreConnection] = []
    var droppedEvents = 0

    init(quotas: XenStoreQuotas) {
        self.quotas = quotas
        let root = [XenStorePermission(.none, .zero)]
        for path in ["/", "/local", "/local/domain"] {
            var node = StoreNode(value: [], permissions: root, children: [])
            if path == "/" { node.children = ["local"] }
            if path == "/local" { node.children = ["domain"] }
            commitNode(path, node)
        }
        for special in XenStorePath.specials { specialPermissions[special] = root }
    }

    func takeWakeList() -> [XenStoreConnection] {
        defer { toWake.removeAll(keepingCapacity: true) }
        return toWake
    }

    private func markWake(_ c: XenStoreConnection) {
        if !toWake.contains(where: { $0 === c }) { toWake.append(c) }
    }

    // MARK: Connections

    func connect(domain: DomainID, privileged: Bool, wake: @escaping @Sendable () -> Void) -> XenStoreConnection {
        let c = XenStoreConnection(id: nextConnection, domain: domain, privileged: privileged, wake: wake)
        nextConnection += 1
        connections[c.id] = ConnectionRecord(c)
        return c
    }

    func disconnect(_ id: UInt64) {
        guard let record = connections.removeValue(forKey: id) else { return }
        dropWatchesAndTransactions(record)
        record.connection.outbox.withLock { $0.closed = true }
        markWake(record.connection)
    }

    func reset(_ id: UInt64) {
        guard let record = connections[id] else { return }
        dropWatchesAndTransactions(record)
        record.connection.outbox.withLock { box in
            let closed = box.closed
            box = Outbox()
            box.closed = closed
        }
    }

    func dropWatchesAndTransactions(_ record: ConnectionRecord) {
        for key in record.watches { removeWatch(key, of: record) }
        openTransactions -= record.transactions.count
        record.transactions.removeAll()
    }

    func removeWatch(_ key: WatchKey, of record: ConnectionRecord) {
        record.watches.remove(key)
        watchCounts[record.domain.rawValue, default: 0] -= 1
        if var list = watchIndex[key.path] {
            list.removeAll { $0.connection == record.connection.id && $0.token == key.token }
            watchIndex[key.path] = list.isEmpty ? nil : list
        }
    }

    // MARK: Tree access (through a transaction when there is one)

    func get(_ path: String, _ tx: inout Transaction?) -> StoreNode? {
        guard tx != nil else { return nodes[path] }
        if let entry = tx!.overlay[path] { return entry }
        let node = nodes[path]
        if tx!.reads[path] == nil {
            tx!.reads[path] = node?.generation ?? 0
            if let node, node.generation > tx!.startGeneration { tx!.conflicted = true }
        }
        return node
    }

    func put(_ path: String, _ node: StoreNode?, _ tx: inout Transaction?) {
        guard tx != nil else { return commitNode(path, node) }
        let old = get(path, &tx)
        if let old { tx!.nodeDelta[old.owner, default: 0] -= 1 }
        if let node { tx!.nodeDelta[node.owner, default: 0] += 1 }
        tx!.overlay.updateValue(node, forKey: path)
    }

    func commitNode(_ path: String, _ node: StoreNode?) {
        generation += 1
        if let old = nodes[path] { nodeCounts[old.owner, default: 0] -= 1 }
        if var node {
            node.generation = generation
            nodeCounts[node.owner, default: 0] += 1
            nodes[path] = node
        } else {
            nodes[path] = nil
        }
    }

    // MARK: Permissions

    struct Access {
        var read: Bool, write: Bool, owner: Bool
        static let all = Access(read: true, write: true, owner: true)
    }

    func access(_ permissions: [XenStorePermission], for record: ConnectionRecord) -> Access {
        if record.isPrivileged { return .all }
        let me = record.domain
        let owner = permissions[0].domain
        if owner == me || (domains[me.rawValue]?.target == owner) { return .all }
        var access = permissions[0].access
        for p in permissions.dropFirst() where p.domain == me {
            access = p.access
            break
        }
        return Access(read: access.canRead, write: access.canWrite, owner: false)
    }

    // MARK: Watches

    func fire(_ event: PendingEvent, _ tx: inout Transaction?) {
        if tx != nil { tx!.events.append(event) } else { deliver(event) }
    }

    func deliver(_ event: PendingEvent) {
        guard !watchIndex.isEmpty else { return }
        if event.exact || event.path.utf8.first == UInt8(ascii: "@") {
            if let list = watchIndex[event.path] { send(event, to: list) }
            return
        }
        var path: String? = event.path
        while let p = path {
            if let list = watchIndex[p] { send(event, to: list) }
            path = XenStorePath.parent(of: p)
        }
    }

    private func send(_ event: PendingEvent, to watches: [Watch]) {
        for w in watches {
            guard let record = connections[w.connection] else { continue }
            guard access(event.permissions, for: record).read else { continue }
            let utf8 = event.path.utf8
            let reported = w.relativePrefix > 0 && utf8.count > w.relativePrefix
                ? Array(utf8.dropFirst(w.relativePrefix)) : Array(utf8)
            queueEvent(path: reported, token: w.token, to: record.connection)
        }
    }

    func queueEvent(path: [UInt8], token: [UInt8], to c: XenStoreConnection) {
        var payload = path
        payload.append(0)
        payload += token
        payload.append(0)
        let message = XenStoreMessage(type: .watchEvent, payload: payload)
        let limit = quotas.queuedWatchEvents
        let queued = c.outbox.withLock { box -> Bool in
            guard !box.closed else { return false }
            guard box.events < limit else {
                box.droppedEvents += 1
                return false
            }
            box.append(message, isEvent: true)
            return true
        }
        if queued { markWake(c) } else { droppedEvents += 1 }
    }

    // MARK: Replies

    func reply(_ record: ConnectionRecord, to request: XenStoreMessage, _ payload: [UInt8]) {
        let message = XenStoreMessage(type: request.type, requestID: request.requestID,
                                      transactionID: request.transactionID, payload: payload)
        record.connection.outbox.withLock { if !$0.closed { $0.append(message, isEvent: false) } }
        markWake(record.connection)
    }

    func reply(_ record: ConnectionRecord, to request: XenStoreMessage, error: XenStoreError) {
        let message = XenStoreMessage(type: .error, requestID: request.requestID,
                                      transactionID: request.transactionID, payload: error.payload)
        record.connection.outbox.withLock { if !$0.closed { $0.append(message, isEvent: false) } }
        markWake(record.connection)
    }

    static let ok: [UInt8] = Array("OK".utf8) + [0]
}
