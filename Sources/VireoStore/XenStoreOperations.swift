import VireoABI

/// The requests, one method each. Each throws the error its reply carries.
extension StoreCore {
    // MARK: Arguments

    /// The payload's NUL-terminated strings; EINVAL unless the payload ends with a NUL and
    /// holds at least `count` strings.
    static func strings(_ payload: [UInt8], atLeast count: Int) throws(XenStoreError) -> [ArraySlice<UInt8>] {
        guard payload.last == 0 else { throw .EINVAL }
        let parts = payload.dropLast().split(separator: 0, omittingEmptySubsequences: false)
        guard parts.count >= count else { throw .EINVAL }
        return parts
    }

    /// Exactly one NUL-terminated string.
    static func single(_ payload: [UInt8]) throws(XenStoreError) -> ArraySlice<UInt8> {
        guard payload.last == 0, payload.firstIndex(of: 0) == payload.count - 1 else { throw .EINVAL }
        return payload.dropLast()
    }

    static func text(_ bytes: ArraySlice<UInt8>) -> String { String(decoding: bytes, as: UTF8.self) }

    func path(_ bytes: ArraySlice<UInt8>, _ record: ConnectionRecord) throws(XenStoreError) -> String {
        try XenStorePath.resolve(Substring(Self.text(bytes)), for: record.domain)
    }

    // MARK: Dispatch

    func handle(_ m: XenStoreMessage, from id: UInt64) {
        guard let record = connections[id] else { return }
        do {
            if let payload = try perform(m, record) { reply(record, to: m, payload) }
        } catch {
            reply(record, to: m, error: error)
        }
    }

    /// The reply payload, or nil when the operation has queued its reply itself.
    private func perform(_ m: XenStoreMessage, _ r: ConnectionRecord) throws(XenStoreError) -> [UInt8]? {
        switch m.type {
        case .read, .write, .mkdir, .rm, .directory, .directoryPart, .getPermissions, .setPermissions:
            var tx: Transaction? = nil
            if m.transactionID != 0 {
                // Taken out while in use, so changing it copies nothing.
                guard let t = r.transactions.removeValue(forKey: m.transactionID) else { throw .ENOENT }
                tx = t
            }
            defer { if let t = tx { r.transactions[m.transactionID] = t } }
            return try treeOperation(m, r, &tx)
        case .watch: return try watch(m, r)
        case .unwatch: return try unwatch(m, r)
        case .transactionStart: return try transactionStart(m, r)
        case .transactionEnd: return try transactionEnd(m, r)
        case .getDomainPath:
            let domain = try XenStoreNumber.domain(Substring(Self.text(try Self.single(m.payload))))
            return Array(XenStorePath.domainPath(domain).utf8) + [0]
        case .isDomainIntroduced:
            let domain = try XenStoreNumber.domain(Substring(Self.text(try Self.single(m.payload))))
            return Array((isIntroduced(domain) ? "T" : "F").utf8) + [0]
        case .resume:
            guard r.isPrivileged else { throw .EACCES }
            let domain = try XenStoreNumber.domain(Substring(Self.text(try Self.single(m.payload))))
            guard domains[domain.rawValue] != nil else { throw .ENOENT }
            return Self.ok
        case .setTarget:
            guard r.isPrivileged else { throw .EACCES }
            let args = try Self.strings(m.payload, atLeast: 2)
            let domain = try XenStoreNumber.domain(Substring(Self.text(args[0])))
            let target = try XenStoreNumber.domain(Substring(Self.text(args[1])))
            guard domains[domain.rawValue] != nil else { throw .ENOENT }
            domains[domain.rawValue]!.target = target
            return Self.ok
        case .resetWatches:
            for key in r.watches { removeWatch(key, of: r) }
            openTransactions -= r.transactions.count
            r.transactions.removeAll()
            return Self.ok
        case .control:
            guard r.isPrivileged else { throw .EACCES }
            return try control(Self.strings(m.payload, atLeast: 1).map(Self.text))
        case .introduce, .release:
            // Handled by XenStore (they call the transport hooks outside the lock).
            throw .EINVAL
        default:
            // WATCH_EVENT, ERROR and unknown types are not requests.
            throw .EINVAL
        }
    }

    private func treeOperation(_ m: XenStoreMessage, _ r: ConnectionRecord, _ tx: inout Transaction?) throws(XenStoreError) -> [UInt8] {
        switch m.type {
        case .read:
            let path = try path(Self.single(m.payload), r)
            guard let node = get(path, &tx) else { throw .ENOENT }
            guard access(node.permissions, for: r).read else { throw .EACCES }
            return node.value
        case .write:
            guard let nul = m.payload.firstIndex(of: 0) else { throw .EINVAL }
            let path = try path(m.payload[..<nul], r)
            try write(path, value: Array(m.payload[(nul + 1)...]), r, &tx)
            return Self.ok
        case .mkdir:
            let path = try path(Self.single(m.payload), r)
            if let node = get(path, &tx) {
                guard access(node.permissions, for: r).write else { throw .EACCES }
                return Self.ok
            }
            let permissions = try create(path, value: [], r, &tx)
            fire(PendingEvent(path: path, permissions: permissions, exact: false), &tx)
            return Self.ok
        case .rm:
            let path = try path(Self.single(m.payload), r)
            try remove(path, r, &tx)
            return Self.ok
        case .directory:
            let path = try path(Self.single(m.payload), r)
            guard let node = get(path, &tx) else { throw .ENOENT }
            guard access(node.permissions, for: r).read else { throw .EACCES }
            var out: [UInt8] = []
            for name in node.children { out += name.utf8; out.append(0) }
            guard out.count <= XenStoreMessage.payloadMax else { throw .E2BIG }
            return out
        case .directoryPart:
            let args = try Self.strings(m.payload, atLeast: 2)
            let path = try path(args[0], r)
            guard let offset = XenStoreNumber.parse(Substring(Self.text(args[1])), as: UInt32.self) else { throw .EINVAL }
            guard let node = get(path, &tx) else { throw .ENOENT }
            guard access(node.permissions, for: r).read else { throw .EACCES }
            return directoryPart(node, from: Int(offset))
        case .getPermissions:
            let raw = Self.text(try Self.single(m.payload))
            let permissions: [XenStorePermission]
            if raw.hasPrefix("@") {
                guard let special = specialPermissions[raw] else { throw .EINVAL }
                guard access(special, for: r).read else { throw .EACCES }
                permissions = special
            } else {
                guard let node = get(try XenStorePath.resolve(Substring(raw), for: r.domain), &tx) else { throw .ENOENT }
                guard access(node.permissions, for: r).read else { throw .EACCES }
                permissions = node.permissions
            }
            var out: [UInt8] = []
            for p in permissions { out += p.description.utf8; out.append(0) }
            return out
        case .setPermissions:
            let args = try Self.strings(m.payload, atLeast: 2)
            var permissions: [XenStorePermission] = []
            for text in args.dropFirst() {
                guard let p = XenStorePermission(Substring(Self.text(text))) else { throw .EINVAL }
                permissions.append(p)
            }
            let raw = Self.text(args[0])
            if raw.hasPrefix("@") {
                guard specialPermissions[raw] != nil else { throw .EINVAL }
                guard r.isPrivileged else { throw .EACCES }
                specialPermissions[raw] = permissions
                return Self.ok
            }
            let path = try XenStorePath.resolve(Substring(raw), for: r.domain)
            guard var node = get(path, &tx) else { throw .ENOENT }
            guard access(node.permissions, for: r).owner else { throw .EACCES }
            if !r.isPrivileged {
                // A guest may share what it owns but not give it away (Xen's rule).
                guard permissions[0].domain == node.permissions[0].domain else { throw .EPERM }
                guard StoreNode.size(value: node.value.count, permissions: permissions.count) <= quotas.nodeSize else { throw .ENOSPC }
            }
            node.permissions = permissions
            put(path, node, &tx)
            fire(PendingEvent(path: path, permissions: permissions, exact: false), &tx)
            return Self.ok
        default:
            throw .EINVAL
        }
    }

    // MARK: The tree

    func write(_ path: String, value: [UInt8], _ r: ConnectionRecord, _ tx: inout Transaction?) throws(XenStoreError) {
        let permissions: [XenStorePermission]
        if var node = get(path, &tx) {
            guard access(node.permissions, for: r).write else { throw .EACCES }
            if !r.isPrivileged {
                guard StoreNode.size(value: value.count, permissions: node.permissions.count) <= quotas.nodeSize else { throw .ENOSPC }
            }
            node.value = value
            permissions = node.permissions
            put(path, node, &tx)
        } else {
            permissions = try create(path, value: value, r, &tx)
        }
        fire(PendingEvent(path: path, permissions: permissions, exact: false), &tx)
    }

    /// Creates `path` and any missing ancestors; returns the new node's permissions. Needs
    /// write access to the nearest existing ancestor. New nodes inherit its permissions, and
    /// an unprivileged domain owns what it creates.
    @discardableResult
    func create(_ path: String, value: [UInt8], _ r: ConnectionRecord, _ tx: inout Transaction?) throws(XenStoreError) -> [XenStorePermission] {
        var missing = [path]
        var parentPath = XenStorePath.parent(of: path)!  // the root always exists
        var parent: StoreNode
        while true {
            if let node = get(parentPath, &tx) { parent = node; break }
            missing.append(parentPath)
            parentPath = XenStorePath.parent(of: parentPath)!
        }
        guard access(parent.permissions, for: r).write else { throw .EACCES }
        var permissions = parent.permissions
        if !r.isPrivileged {
            permissions[0].domain = r.domain
            let owned = nodeCounts[r.domain.rawValue, default: 0] + (tx?.nodeDelta[r.domain.rawValue] ?? 0)
            guard owned + missing.count <= quotas.nodesPerDomain else { throw .ENOSPC }
            guard StoreNode.size(value: value.count, permissions: permissions.count) <= quotas.nodeSize else { throw .ENOSPC }
        }
        for newPath in missing.reversed() {
            parent.children.append(XenStorePath.name(of: newPath))
            put(parentPath, parent, &tx)
            parent = StoreNode(value: newPath == path ? value : [], permissions: permissions, children: [])
            parentPath = newPath
        }
        put(parentPath, parent, &tx)
        return permissions
    }

    func remove(_ path: String, _ r: ConnectionRecord, _ tx: inout Transaction?) throws(XenStoreError) {
        guard path != "/" else { throw .EINVAL }
        let parentPath = XenStorePath.parent(of: path)!
        guard let node = get(path, &tx) else {
            // Already gone is fine as long as the parent is there (Xen's rule).
            guard get(parentPath, &tx) != nil else { throw .ENOENT }
            return
        }
        guard access(node.permissions, for: r).write else { throw .EACCES }
        removeSubtree(path, node, &tx)
    }

    /// Removes a node and everything below it and fires the watches: at or above `path` for
    /// the node itself, and exactly on each removed descendant.
    func removeSubtree(_ path: String, _ node: StoreNode, _ tx: inout Transaction?) {
        var stack = [(path, node)]
        var removed: [(String, StoreNode)] = []
        while let (p, n) = stack.popLast() {
            removed.append((p, n))
            for name in n.children {
                let childPath = XenStorePath.child(p, name)
                if let child = get(childPath, &tx) { stack.append((childPath, child)) }
            }
        }
        for (p, _) in removed { put(p, nil, &tx) }
        let parentPath = XenStorePath.parent(of: path)!
        if var parent = get(parentPath, &tx) {
            let name = XenStorePath.name(of: path)
            parent.children.removeAll { $0 == name }
            put(parentPath, parent, &tx)
        }
        fire(PendingEvent(path: path, permissions: node.permissions, exact: false), &tx)
        for (p, n) in removed.dropFirst() {
            fire(PendingEvent(path: p, permissions: n.permissions, exact: true), &tx)
        }
    }

    /// DIRECTORY_PART: the generation, then whole names from byte `offset` of the full list
    /// as fit; an empty string after the last name.
    private func directoryPart(_ node: StoreNode, from offset: Int) -> [UInt8] {
        var out = Array(String(node.generation).utf8) + [0]
        let room = XenStoreMessage.payloadMax - 1
        var position = 0
        var complete = true
        for name in node.children {
            let length = name.utf8.count + 1
            defer { position += length }
            if position < offset { continue }
            if out.count + length > room { complete = false; break }
            out += name.utf8
            out.append(0)
        }
        if complete { out.append(0) }
        return out
    }

    // MARK: Watches

    private func watchPath(_ raw: String, _ r: ConnectionRecord) throws(XenStoreError) -> (String, Int) {
        if raw.hasPrefix("@") {
            guard XenStorePath.specials.contains(raw) else { throw .EINVAL }
            return (raw, 0)
        }
        let path = try XenStorePath.resolve(Substring(raw), for: r.domain)
        return (path, raw.hasPrefix("/") ? 0 : XenStorePath.domainPath(r.domain).utf8.count + 1)
    }

    private func watch(_ m: XenStoreMessage, _ r: ConnectionRecord) throws(XenStoreError) -> [UInt8]? {
        let args = try Self.strings(m.payload, atLeast: 2)
        let raw = Self.text(args[0])
        let (path, prefix) = try watchPath(raw, r)
        let key = WatchKey(path: path, token: Array(args[1]))
        guard !r.watches.contains(key) else { throw .EEXIST }
        if !r.isPrivileged {
            guard watchCounts[r.domain.rawValue, default: 0] < quotas.watchesPerDomain else { throw .E2BIG }
        }
        r.watches.insert(key)
        watchCounts[r.domain.rawValue, default: 0] += 1
        watchIndex[path, default: []].append(Watch(connection: r.connection.id, path: path, token: key.token, relativePrefix: prefix))
        reply(r, to: m, Self.ok)
        // A watch fires once at once, with the path as the client gave it.
        queueEvent(path: Array(args[0]), token: key.token, to: r.connection)
        return nil
    }

    private func unwatch(_ m: XenStoreMessage, _ r: ConnectionRecord) throws(XenStoreError) -> [UInt8] {
        let args = try Self.strings(m.payload, atLeast: 2)
        let (path, _) = try watchPath(Self.text(args[0]), r)
        let key = WatchKey(path: path, token: Array(args[1]))
        guard r.watches.contains(key) else { throw .ENOENT }
        removeWatch(key, of: r)
        return Self.ok
    }

    // MARK: Transactions

    private func transactionStart(_ m: XenStoreMessage, _ r: ConnectionRecord) throws(XenStoreError) -> [UInt8] {
        guard m.transactionID == 0 else { throw .EBUSY }
        guard r.transactions.count < quotas.transactionsPerConnection else { throw .ENOSPC }
        var id = nextTransaction
        while id == 0 || r.transactions[id] != nil { id &+= 1 }
        nextTransaction = id &+ 1
        r.transactions[id] = Transaction(startGeneration: generation)
        openTransactions += 1
        return Array(String(id).utf8) + [0]
    }

    private func transactionEnd(_ m: XenStoreMessage, _ r: ConnectionRecord) throws(XenStoreError) -> [UInt8] {
        guard r.transactions[m.transactionID] != nil else { throw .ENOENT }
        let verb = Self.text(try Self.single(m.payload))
        guard verb == "T" || verb == "F" else { throw .EINVAL }
        let tx = r.transactions.removeValue(forKey: m.transactionID)!
        openTransactions -= 1
        guard verb == "T" else { return Self.ok }
        guard !tx.conflicted else { throw .EAGAIN }
        for (path, seen) in tx.reads where (nodes[path]?.generation ?? 0) != seen { throw .EAGAIN }
        for (path, node) in tx.overlay { commitNode(path, node) }
        for event in tx.events { deliver(event) }
        return Self.ok
    }

    // MARK: Domains

    func isIntroduced(_ domain: DomainID) -> Bool {
        domain == .zero || domains[domain.rawValue] != nil
    }

    /// Checks an introduction; false if the domain is already there with the same page and
    /// port (Xen accepts that as a no-op).
    func checkIntroduce(_ id: DomainID, frame: GuestFrame, port: EventPort) throws(XenStoreError) -> Bool {
        guard id.isOrdinary, id != .zero else { throw .EINVAL }
        if let existing = domains[id.rawValue] {
            guard existing.frame == frame && existing.port == port else { throw .EEXIST }
            return false
        }
        return true
    }

    /// Records a domain, gives it its home `/local/domain/<id>` (owned by it) if the toolstack
    /// has not made one, and fires @introduceDomain.
    func recordIntroduce(_ id: DomainID, frame: GuestFrame, port: EventPort) throws(XenStoreError) {
        guard try checkIntroduce(id, frame: frame, port: port) else { return }
        domains[id.rawValue] = DomainRecord(frame: frame, port: port, target: nil)
        let home = XenStorePath.domainPath(id)
        if nodes[home] == nil, var parent = nodes["/local/domain"] {
            parent.children.append(String(id.rawValue))
            commitNode("/local/domain", parent)
            commitNode(home, StoreNode(value: [], permissions: [XenStorePermission(.none, id)], children: []))
        }
        deliver(PendingEvent(path: XenStorePath.introduceDomain, permissions: specialPermissions[XenStorePath.introduceDomain]!, exact: true))
    }

    /// Forgets a domain so that nothing of it is left for a domain that reuses its ID: its
    /// connections (watches, transactions, queued output) close, its home goes, every
    /// permission entry naming it is dropped and what it owned passes to dom0. Fires
    /// @releaseDomain.
    func release(_ id: DomainID) throws(XenStoreError) {
        guard id.isOrdinary, id != .zero else { throw .EINVAL }
        guard domains.removeValue(forKey: id.rawValue) != nil else { throw .ENOENT }
        for key in domains.keys where domains[key]!.target == id { domains[key]!.target = nil }
        for (cid, record) in connections where record.domain == id && !record.isPrivileged { disconnect(cid) }
        var none: Transaction? = nil
        let home = XenStorePath.domainPath(id)
        if let node = nodes[home] { removeSubtree(home, node, &none) }
        var named: [String] = []
        for (path, node) in nodes where node.permissions.contains(where: { $0.domain == id }) { named.append(path) }
        for path in named {
            var node = nodes[path]!
            node.permissions = Self.scrub(node.permissions, of: id)
            commitNode(path, node)
        }
        for (special, permissions) in specialPermissions { specialPermissions[special] = Self.scrub(permissions, of: id) }
        watchCounts[id.rawValue] = nil
        deliver(PendingEvent(path: XenStorePath.releaseDomain, permissions: specialPermissions[XenStorePath.releaseDomain]!, exact: true))
    }

    private static func scrub(_ permissions: [XenStorePermission], of id: DomainID) -> [XenStorePermission] {
        var out = [permissions[0]]
        if out[0].domain == id { out[0].domain = .zero }
        out += permissions.dropFirst().filter { $0.domain != id }
        return out
    }

    // MARK: Control

    private func control(_ args: [String]) throws(XenStoreError) -> [UInt8] {
        func text(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }
        switch args[0] {
        case "help":
            return text("check\nhelp\nprint <string>\nquota\nstatistics\n")
        case "check":
            return text(checkTree().isEmpty ? "OK" : checkTree().joined(separator: "\n"))
        case "print":
            return Self.ok
        case "quota":
            return text("""
                nodes-per-domain: \(quotas.nodesPerDomain)
                node-size: \(quotas.nodeSize)
                watches-per-domain: \(quotas.watchesPerDomain)
                transactions-per-connection: \(quotas.transactionsPerConnection)
                outstanding-requests: \(quotas.outstandingRequests)
                queued-watch-events: \(quotas.queuedWatchEvents)

                """)
        case "statistics":
            return text("nodes: \(nodes.count)\nconnections: \(connections.count)\nwatches: \(watchCounts.values.reduce(0, +))\n"
                        + "transactions: \(openTransactions)\ndomains: \(domains.count)\ndropped-events: \(droppedEvents)\n")
        default:
            throw .EINVAL
        }
    }

    /// Consistency of the tree: every child listed exists, every node but the root is listed
    /// by its parent, and the per-owner counts match. Empty when all is well.
    func checkTree() -> [String] {
        var problems: [String] = []
        var counts: [UInt16: Int] = [:]
        for (path, node) in nodes {
            counts[node.owner, default: 0] += 1
            for name in node.children where nodes[XenStorePath.child(path, name)] == nil {
                problems.append("\(path) lists missing child \(name)")
            }
            if let parent = XenStorePath.parent(of: path) {
                if !(nodes[parent]?.children.contains(XenStorePath.name(of: path)) ?? false) {
                    problems.append("\(path) is not listed by its parent")
                }
            }
        }
        for (owner, count) in nodeCounts where count != counts[owner, default: 0] {
            problems.append("dom\(owner) is counted \(count) nodes but owns \(counts[owner, default: 0])")
        }
        return problems
    }
}
