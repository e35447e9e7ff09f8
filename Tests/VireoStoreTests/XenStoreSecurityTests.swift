import Glibc
import Testing
import VireoABI
@testable import VireoStore

/// ../shared/SECURITY.md items 13–17: what a hostile guest or a broken tool can do to the store.
@Suite struct XenStoreSecurityTests {
    static func guestStore(_ quotas: XenStoreQuotas = XenStoreQuotas(), domains: [UInt16] = [1, 2]) throws -> XenStore {
        let store = XenStore(quotas: quotas)
        for d in domains { try store.introduceDomain(DomainID(d)) }
        return store
    }

    // MARK: 13. Per-domain quotas

    @Test func item13_quotasOnNodesAndNodeSize() throws {
        let store = try Self.guestStore(XenStoreQuotas(nodesPerDomain: 10, nodeSize: 64))
        let guest = TestClient(store, domain: DomainID(1)), other = TestClient(store, domain: DomainID(2))
        // The home counts as one node of the domain's.
        for i in 0..<9 { #expect(isOK(guest.write("n\(i)", "x")), "node \(i)") }
        #expect(guest.write("one-too-many", "x").error == .ENOSPC)
        #expect(guest.write("deep/a/b", "x").error == .ENOSPC, "implicit parents count too")
        #expect(isOK(other.write("fine", "x")), "other domains carry on")
        #expect(isOK(TestClient(store).write("/dom0/unbounded", "x")))
        #expect(isOK(guest.write("n0", String(repeating: "v", count: 60))))
        #expect(guest.write("n0", String(repeating: "v", count: 61)).error == .ENOSPC, "60 + 4 bytes for one permission")
        #expect(guest.send(.setPermissions, "n1", "n1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10",
                           "r11", "r12", "r13", "r14", "r15", "r16").error == .ENOSPC)
        #expect(isOK(guest.send(.rm, "n1")))
        #expect(isOK(guest.write("again", "x")), "removing frees quota")
        #expect(store.ownedNodes(DomainID(1)) == 10)
        // Transactions count their own creations.
        let tx = guest.startTransaction()
        #expect(guest.write("tx-node", "x", tx: tx).error == .ENOSPC)
        #expect(store.check().isEmpty)
    }

    @Test func item13_quotasOnWatchesAndTransactions() throws {
        let store = try Self.guestStore(XenStoreQuotas(watchesPerDomain: 5, transactionsPerConnection: 3))
        let guest = TestClient(store, domain: DomainID(1))
        let second = TestClient(store, domain: DomainID(1))
        for i in 0..<3 { #expect(isOK(guest.send(.watch, "w", "t\(i)"))) }
        for i in 0..<2 { #expect(isOK(second.send(.watch, "w", "s\(i)"))) }
        #expect(guest.send(.watch, "w", "over").error == .E2BIG, "the watch quota is per domain")
        #expect(isOK(guest.send(.unwatch, "w", "t0")))
        #expect(isOK(guest.send(.watch, "w", "again")))
        for _ in 0..<3 { #expect(guest.send(.transactionStart, "").type == .transactionStart) }
        #expect(guest.send(.transactionStart, "").error == .ENOSPC)
        #expect(second.send(.transactionStart, "").type == .transactionStart, "transactions are per connection")
    }

    @Test func item13_outstandingRequestsOverTheSocketAreBounded() throws {
        let quota = 8
        let s = try ServedStore(quotas: XenStoreQuotas(outstandingRequests: quota))
        let filler = try XenStoreSocketClient(path: s.path)
        _ = try filler.request(XenStoreMessage(type: .write, payload: Array("/big\0".utf8) + [UInt8](repeating: 65, count: 4000)))
        // A client that sends and never reads: the store stops taking its requests.
        let greedy = try XenStoreSocketClient(path: s.path)
        var batch: [UInt8] = []
        for i in 0..<2000 { batch += XenStoreMessage(.read, "/big", requestID: UInt32(i)).encoded }
        try greedy.sendRaw(batch)
        let polite = try XenStoreSocketClient(path: s.path)
        #expect(try polite.request(XenStoreMessage(.write, "/ok", ""))?.type == .write, "others carry on")
        // The greedy client's replies fill its socket buffer, then at most the quota waits.
        usleep(100_000)
        #expect(s.store.statistics.connections == 3)
        // Reading everything gets every reply.
        var got = 0
        while got < 2000, let m = try greedy.receive() {
            #expect(m.type == .read && m.payload.count == 4000)
            got += 1
        }
        #expect(got == 2000)
    }

    // MARK: 14. Permissions on watch events and ownership changes

    @Test func item14_watchEventsRespectPermissions() throws {
        let store = try Self.guestStore()
        let dom0 = TestClient(store), guest = TestClient(store, domain: DomainID(1))
        dom0.write("/secret/key", "s")
        #expect(isOK(guest.send(.watch, "/secret", "spy")))
        #expect(isOK(guest.send(.watch, "@releaseDomain", "rel")))
        _ = guest.takeEvents()  // the initial firings, which reveal nothing
        dom0.write("/secret/key", "changed")
        dom0.write("/secret/other", "new")
        dom0.send(.rm, "/secret/key")
        try store.introduceDomain(DomainID(9))
        try store.releaseDomain(DomainID(9))
        #expect(guest.takeEvents().isEmpty, "no event about nodes the guest cannot read, nor about other domains")
        dom0.send(.setPermissions, "/secret/other", "n0", "r1")
        #expect(guest.takeEvents().map(\.path) == ["/secret/other"])
        dom0.write("/secret/other", "v2")
        #expect(guest.takeEvents().map(\.path) == ["/secret/other"])
        // Ownership: only the owner (or dom0) changes permissions, and a guest cannot give a
        // node to another domain (which would charge that domain's quota).
        guest.write("mine", "x")
        #expect(guest.send(.setPermissions, "mine", "b2").error == .EPERM)
        #expect(TestClient(store, domain: DomainID(2)).send(.setPermissions, "/local/domain/1/mine", "b2").error == .EACCES)
        #expect(dom0.send(.getPermissions, "/local/domain/1/mine").strings == ["n1"])
    }

    // MARK: 15. A dead domain's ID reused

    @Test func item15_releasedDomainLeavesNothingForAReusedID() throws {
        let store = try Self.guestStore(domains: [5])
        let dom0 = TestClient(store), old = TestClient(store, domain: DomainID(5))
        dom0.write("/shared/doc", "for five")
        dom0.send(.setPermissions, "/shared/doc", "n0", "b5")
        dom0.write("/vm/owned-by-5", "x")
        dom0.send(.setPermissions, "/vm/owned-by-5", "n5")
        #expect(isOK(old.write("data/secret", "old")))
        #expect(isOK(old.send(.watch, "/shared", "old-watch")))
        let tx = old.startTransaction()
        old.write("data/pending", "x", tx: tx)
        _ = old.takeEvents()
        #expect(!store.paths(naming: DomainID(5)).isEmpty)

        try store.releaseDomain(DomainID(5))
        #expect(store.paths(naming: DomainID(5)).isEmpty, "no permission names the dead domain")
        #expect(store.ownedNodes(DomainID(5)) == 0)
        #expect(dom0.send(.getPermissions, "/vm/owned-by-5").strings == ["n0"], "what it owned passes to dom0")
        #expect(dom0.send(.getPermissions, "/shared/doc").strings == ["n0"])
        #expect(dom0.read("/local/domain/5/data/secret") == nil, "its home is gone")
        #expect(store.statistics.watches == 0 && store.statistics.openTransactions == 0)
        #expect(old.connection.isClosed)

        try store.introduceDomain(DomainID(5))
        let reborn = TestClient(store, domain: DomainID(5))
        #expect(reborn.send(.read, "/shared/doc").error == .EACCES)
        #expect(reborn.write("/vm/owned-by-5", "y").error == .EACCES)
        #expect(reborn.list("/local/domain/5") == [], "a fresh, empty home")
        #expect(reborn.read("data/secret") == nil)
        dom0.write("/shared/doc", "new")
        #expect(old.takeEvents().isEmpty && reborn.takeEvents().isEmpty, "the old watch is gone")
        #expect(store.ownedNodes(DomainID(5)) == 1)
        #expect(store.check().isEmpty)
    }

    // MARK: 16. Deep paths, huge lengths, malformed headers, integers

    @Test func item16_deepPathsHugeLengthsAndMalformedHeaders() throws {
        let store = try Self.guestStore()
        let dom0 = TestClient(store)
        // 10 000 nested components: rejected by length, not by recursion.
        let tooDeep = String(repeating: "/a", count: 10_000)
        #expect(dom0.write(tooDeep, "x").error == .EINVAL)
        // As deep as the length allows: created, listed, removed without recursion.
        let deep = String(repeating: "/a", count: XenStorePath.absoluteMax / 2)
        #expect(isOK(dom0.write(deep, "bottom")))
        #expect(dom0.read(deep) == "bottom")
        #expect(isOK(dom0.send(.rm, "/a")))
        #expect(store.statistics.nodes == 5, "/, /local, /local/domain and the two homes are left")
        // Strings must be NUL-terminated.
        #expect(dom0.send(XenStoreMessage(type: .read, payload: Array("/local".utf8))).error == .EINVAL)
        #expect(dom0.send(XenStoreMessage(type: .read, payload: Array("/local\0/x\0".utf8))).error == .EINVAL)
        #expect(dom0.send(XenStoreMessage(type: .watch, payload: Array("/local\0tok".utf8))).error == .EINVAL)
        #expect(dom0.send(XenStoreMessage(type: .write, payload: Array("/nonul".utf8))).error == .EINVAL)
        #expect(dom0.send(XenStoreMessage(type: .read, payload: [])).error == .EINVAL)
        // Integers: no sign, no overflow, no truncation.
        for bad in ["-1", "+1", "4294967297", "65536", "32752", "1e3", "", " 1", "99999999999999999999999"] {
            #expect(dom0.send(.getDomainPath, bad).error == .EINVAL, "\(bad)")
            #expect(dom0.send(.introduce, bad, "1", "1").error == .EINVAL, "\(bad)")
        }
        #expect(dom0.send(.introduce, "3", "18446744073709551616", "1").error == .EINVAL)
        #expect(dom0.send(.introduce, "3", "1", "4294967296").error == .EINVAL)
        #expect(dom0.send(.directoryPart, "/local", "-1").error == .EINVAL)
        #expect(dom0.send(.read, "/local", tx: 0xFFFF_FFFF).error == .ENOENT)
        #expect(store.check().isEmpty)
    }

    @Test func item16_randomMessagesNeverBreakTheStore() throws {
        let store = try Self.guestStore()
        var rng = SystemRandomNumberGenerator()
        let clients = [TestClient(store), TestClient(store, domain: DomainID(1)), TestClient(store, domain: DomainID(2))]
        let words = ["/", "/a", "a", "/a/b", "@releaseDomain", "@introduceDomain", "T", "F", "1", "0", "n0", "r1", "b2",
                     "/local/domain/1", "x", "", "help", "//", "/a/"]
        for _ in 0..<20_000 {
            let c = clients.randomElement(using: &rng)!
            var payload: [UInt8] = []
            for _ in 0..<Int.random(in: 0...3, using: &rng) { payload += Array(words.randomElement(using: &rng)!.utf8); payload.append(0) }
            if Bool.random(using: &rng) { payload += [UInt8](repeating: UInt8.random(in: 0...255, using: &rng), count: Int.random(in: 0...3, using: &rng)) }
            c.send(XenStoreMessage(type: XenStoreMessageType(rawValue: UInt32.random(in: 0...24, using: &rng)),
                                   transactionID: UInt32.random(in: 0...3, using: &rng), payload: payload))
            _ = c.takeEvents()
        }
        #expect(store.check().isEmpty)
    }

    @Test func item16_malformedHeadersOverTheSocket() throws {
        let s = try ServedStore()
        let bad = try XenStoreSocketClient(path: s.path)
        var header = XenStoreMessage(.read, "/").encoded
        header[12] = 0xFF; header[13] = 0xFF; header[14] = 0xFF; header[15] = 0xFF  // len 4 GiB
        try bad.sendRaw(Array(header[0..<16]))
        #expect(try bad.receive() == nil, "the store drops the connection")
        // A header split over many writes is reassembled.
        let slow = try XenStoreSocketClient(path: s.path)
        for byte in XenStoreMessage(type: .write, requestID: 7, payload: Array("/split\0".utf8)).encoded {
            try slow.sendRaw([byte])
            usleep(200)
        }
        let reply = try #require(try slow.receive())
        #expect(reply.type == .write && reply.requestID == 7)
        // Unknown types get EINVAL; the store carries on.
        #expect(try slow.request(XenStoreMessage(type: XenStoreMessageType(rawValue: 77), payload: [0]))?.error == .EINVAL)
        #expect(try XenStoreSocketClient(path: s.path).request(XenStoreMessage(.read, "/split"))?.type == .read)
    }

    // MARK: 17. Watch floods

    @Test func item17_watchFloodIsBounded() throws {
        let limit = 100
        let store = try Self.guestStore(XenStoreQuotas(queuedWatchEvents: limit))
        let backend = store.connect()  // a dom0 backend that never reads its events
        store.process(XenStoreMessage(.watch, "/flood", "t"), from: backend)
        let writer = TestClient(store)
        for i in 0..<5_000 { writer.write("/flood/k", "\(i)") }
        #expect(backend.pendingEvents == limit)
        #expect(backend.droppedEvents == 5_000 + 1 - limit)
        #expect(store.statistics.droppedEvents == 5_000 + 1 - limit)
        // Draining makes room again.
        _ = backend.takeMessages()
        writer.write("/flood/k", "after")
        #expect(backend.pendingEvents == 1)
    }

    @Test func transactionLeaksAreBoundedAndFreedOnClose() throws {
        let s = try ServedStore(quotas: XenStoreQuotas(transactionsPerConnection: 10))
        let leaky = try XenStoreSocketClient(path: s.path)
        for _ in 0..<10 {
            let r = try #require(try leaky.request(XenStoreMessage(.transactionStart, "")))
            #expect(r.type == .transactionStart)
        }
        #expect(try leaky.request(XenStoreMessage(.transactionStart, ""))?.error == .ENOSPC)
        #expect(s.store.statistics.openTransactions == 10)
        // Another connection is not affected.
        let other = try XenStoreSocketClient(path: s.path)
        #expect(try other.request(XenStoreMessage(.transactionStart, ""))?.type == .transactionStart)
        _ = consume leaky
        let deadline = ContinuousClock.now + .seconds(5)
        while s.store.statistics.openTransactions != 1 && ContinuousClock.now < deadline { usleep(1000) }
        #expect(s.store.statistics.openTransactions == 1, "closing the connection freed its transactions")
    }
}
