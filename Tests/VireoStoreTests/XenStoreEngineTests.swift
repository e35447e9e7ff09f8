import Testing
import VireoABI
import VireoHypercalls
@testable import VireoStore

@Suite struct XenStoreEngineTests {
    @Test func errorNamesAreXensTable() {
        var names: [String] = []
        withUnsafeBytes(of: vireo_xsd_errors) { raw in
            for entry in raw.bindMemory(to: vireo_xsd_errors.self) { names.append(String(cString: entry.errstring)) }
        }
        #expect(names == XenStoreError.allCases.map(\.rawValue))
    }

    @Test func writeReadDirectoryRemove() {
        let store = XenStore()
        let c = TestClient(store)
        #expect(isOK(c.write("/a/b/c", "hello")))
        #expect(c.read("/a/b/c") == "hello")
        #expect(c.read("/a/b") == "")
        #expect(c.list("/a") == ["b"])
        #expect(c.list("/")?.contains("a") == true)
        #expect(c.send(.read, "/nope").error == .ENOENT)
        #expect(isOK(c.send(.mkdir, "/a/d")))
        #expect(isOK(c.send(.mkdir, "/a/d")), "mkdir of an existing node is fine")
        #expect(c.list("/a") == ["b", "d"])
        #expect(isOK(c.send(.rm, "/a/b")))
        #expect(c.read("/a/b/c") == nil)
        #expect(isOK(c.send(.rm, "/a/b")), "removing a missing node under an existing parent is fine")
        #expect(c.send(.rm, "/x/y").error == .ENOENT)
        #expect(c.send(.rm, "/").error == .EINVAL)
        #expect(c.write("/v", "").type == .write)
        #expect(store.check().isEmpty)
    }

    @Test(arguments: ["", "a//b", "/a//b", "/a/", "/a b", "/ä", "/a\\b", "@introduceDomain"])
    func invalidPathsAreEINVAL(_ path: String) {
        let c = TestClient(XenStore())
        #expect(c.write(path, "x").error == .EINVAL)
    }

    @Test func lengthLimits() {
        let c = TestClient(XenStore())
        let long = "/" + String(repeating: "a", count: XenStorePath.absoluteMax - 1)
        #expect(isOK(c.write(long, "x")))
        #expect(c.write(long + "b", "x").error == .EINVAL)
        let guest = TestClient(c.store, domain: DomainID(3))
        try? c.store.introduceDomain(DomainID(3))
        #expect(guest.write(String(repeating: "r", count: XenStorePath.relativeMax + 1), "x").error == .EINVAL)
    }

    @Test func relativePathsAndDomainPaths() throws {
        let store = XenStore()
        try store.introduceDomain(DomainID(7))
        let guest = TestClient(store, domain: DomainID(7))
        #expect(isOK(guest.write("data/x", "1")))
        let dom0 = TestClient(store)
        #expect(dom0.read("/local/domain/7/data/x") == "1")
        #expect(guest.send(.getDomainPath, "7").text == "/local/domain/7")
        #expect(guest.send(.isDomainIntroduced, "7").text == "T")
        #expect(guest.send(.isDomainIntroduced, "8").text == "F")
        #expect(guest.send(.isDomainIntroduced, "0").text == "T")
        #expect(guest.send(.getDomainPath, "-1").error == .EINVAL)
        #expect(guest.send(.getDomainPath, "65536").error == .EINVAL)
        #expect(guest.send(.getDomainPath, "7x").error == .EINVAL)
    }

    @Test func permissionsAsXenDefinesThem() throws {
        let store = XenStore()
        try store.introduceDomain(DomainID(1))
        try store.introduceDomain(DomainID(2))
        let dom0 = TestClient(store), one = TestClient(store, domain: DomainID(1)), two = TestClient(store, domain: DomainID(2))
        dom0.write("/shared/k", "v")
        #expect(dom0.send(.getPermissions, "/shared/k").strings == ["n0"])
        #expect(one.read("/shared/k") == nil)
        #expect(one.send(.read, "/shared/k").error == .EACCES)
        #expect(isOK(dom0.send(.setPermissions, "/shared/k", "n0", "r1")))
        #expect(one.read("/shared/k") == "v")
        #expect(one.write("/shared/k", "w").error == .EACCES)
        #expect(two.send(.read, "/shared/k").error == .EACCES)
        #expect(isOK(dom0.send(.setPermissions, "/shared", "r0", "w2")))
        // Children inherit the parent's permissions; a domain owns what it creates.
        #expect(isOK(two.write("/shared/mine", "2")))
        #expect(dom0.send(.getPermissions, "/shared/mine").strings == ["r2", "w2"])
        #expect(one.read("/shared/mine") == "2", "others get the default access (r)")
        #expect(two.send(.setPermissions, "/shared/mine", "r2", "b1").type == .setPermissions)
        #expect(two.send(.setPermissions, "/shared/mine", "n1").error == .EPERM, "a guest cannot give a node away")
        #expect(one.send(.setPermissions, "/shared/mine", "n1").error == .EACCES, "only the owner sets permissions")
        #expect(dom0.send(.setPermissions, "/shared/mine", "x1").error == .EINVAL)
        #expect(dom0.send(.setPermissions, "/shared/mine", "r70000").error == .EINVAL, "no truncation to 16 bits")
        #expect(dom0.send(.getPermissions, "@releaseDomain").strings == ["n0"])
        #expect(one.send(.setPermissions, "@releaseDomain", "r1").error == .EACCES)
    }

    @Test func transactionsAreOptimistic() {
        let store = XenStore()
        let a = TestClient(store), b = TestClient(store)
        a.write("/t/x", "0")
        let tx = a.startTransaction()
        #expect(a.read("/t/x", tx: tx) == "0")
        #expect(isOK(a.write("/t/x", "1", tx: tx)))
        #expect(a.read("/t/x", tx: tx) == "1", "a transaction sees its own writes")
        #expect(b.read("/t/x") == "0", "others do not until it commits")
        #expect(isOK(a.send(.transactionEnd, "T", tx: tx)))
        #expect(b.read("/t/x") == "1")

        let t2 = a.startTransaction()
        #expect(a.read("/t/x", tx: t2) == "1")
        b.write("/t/x", "2")
        a.write("/t/y", "3", tx: t2)
        #expect(a.send(.transactionEnd, "T", tx: t2).error == .EAGAIN)
        #expect(b.read("/t/y") == nil, "a failed commit changes nothing")

        let t3 = a.startTransaction()
        a.write("/t/z", "4", tx: t3)
        #expect(isOK(a.send(.transactionEnd, "F", tx: t3)))
        #expect(b.read("/t/z") == nil)
        #expect(a.send(.read, "/t/x", tx: 999).error == .ENOENT)
        #expect(a.send(.transactionEnd, "T", tx: t3).error == .ENOENT)
        #expect(a.send(.transactionStart, "", tx: 5).error == .EBUSY)
        #expect(store.statistics.openTransactions == 0)
        #expect(store.check().isEmpty)
    }

    @Test func transactionRemoveAndCreateCommit() {
        let store = XenStore()
        let a = TestClient(store)
        a.write("/r/a/b", "1")
        a.send(.watch, "/r", "tok")
        _ = a.takeEvents()
        let tx = a.startTransaction()
        #expect(isOK(a.send(.rm, "/r/a", tx: tx)))
        #expect(isOK(a.write("/r/n", "x", tx: tx)))
        #expect(a.list("/r") == ["a"])
        #expect(a.takeEvents().isEmpty, "events wait for the commit")
        #expect(isOK(a.send(.transactionEnd, "T", tx: tx)))
        #expect(a.list("/r") == ["n"])
        #expect(a.takeEvents().map(\.path) == ["/r/a", "/r/n"])
        #expect(store.check().isEmpty)
    }

    @Test func watchesFireAtOnceAndOnChangesBelow() throws {
        let store = XenStore()
        try store.introduceDomain(DomainID(4))
        let dom0 = TestClient(store)
        #expect(isOK(dom0.send(.watch, "/w", "t1")))
        #expect(dom0.takeEvents().map(\.path) == ["/w"])
        dom0.write("/w/a/b", "1")
        dom0.write("/other", "1")
        #expect(dom0.takeEvents().map { "\($0.path) \($0.token)" } == ["/w/a/b t1"])
        #expect(dom0.send(.watch, "/w", "t1").error == .EEXIST)
        #expect(isOK(dom0.send(.watch, "/w/a/b", "t2")))
        _ = dom0.takeEvents()
        // Removing a subtree fires at and above the removed node, and exactly on each removed descendant.
        dom0.send(.rm, "/w/a")
        #expect(dom0.takeEvents().map { "\($0.path) \($0.token)" } == ["/w/a t1", "/w/a/b t2"])
        #expect(isOK(dom0.send(.unwatch, "/w", "t1")))
        #expect(dom0.send(.unwatch, "/w", "t1").error == .ENOENT)
        dom0.write("/w/c", "1")
        #expect(dom0.takeEvents().isEmpty)

        // A relative watch reports relative paths.
        let guest = TestClient(store, domain: DomainID(4))
        #expect(isOK(guest.send(.watch, "device", "g")))
        #expect(guest.takeEvents().map(\.path) == ["device"])
        dom0.write("/local/domain/4/device/vbd/768", "x")
        #expect(guest.takeEvents().map(\.path) == ["device/vbd/768"])

        // Domain introduction and release.
        #expect(isOK(dom0.send(.watch, "@introduceDomain", "i")))
        #expect(isOK(dom0.send(.watch, "@releaseDomain", "r")))
        _ = dom0.takeEvents()
        try store.introduceDomain(DomainID(5))
        try store.releaseDomain(DomainID(5))
        #expect(dom0.takeEvents().map(\.path) == ["@introduceDomain", "@releaseDomain"])
        #expect(dom0.send(.watch, "@bogus", "x").error == .EINVAL)
    }

    @Test func directoryPartServesLongListings() {
        let c = TestClient(XenStore())
        let names = (0..<600).map { "entry-with-a-long-name-\($0)" }
        for n in names { c.send(.mkdir, "/big/" + n) }
        #expect(c.send(.directory, "/big").error == .E2BIG)
        var got: [String] = []
        var offset = 0
        while true {
            let r = c.send(.directoryPart, "/big", String(offset))
            #expect(r.type == .directoryPart)
            var parts = r.payload.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            parts.removeFirst()  // generation
            parts.removeLast()   // after the final NUL
            if parts.last == "" { got += parts.dropLast(); break }
            got += parts
            offset += parts.reduce(0) { $0 + $1.utf8.count + 1 }
        }
        #expect(got == names)
    }

    @Test func introduceAndReleaseOverTheWire() {
        let store = XenStore()
        let dom0 = TestClient(store)
        #expect(isOK(dom0.send(.introduce, "9", "1234", "3")))
        #expect(isOK(dom0.send(.introduce, "9", "1234", "3")), "the same introduction again is a no-op")
        #expect(dom0.send(.introduce, "9", "99", "3").error == .EEXIST)
        #expect(dom0.send(.introduce, "0", "1", "1").error == .EINVAL)
        #expect(dom0.send(.introduce, "9", "1234").error == .EINVAL)
        #expect(dom0.send(.isDomainIntroduced, "9").text == "T")
        #expect(dom0.list("/local/domain") == ["9"])
        let guest = TestClient(store, domain: DomainID(9))
        #expect(guest.send(.introduce, "10", "1", "1").error == .EACCES)
        #expect(guest.send(.release, "9").error == .EACCES)
        #expect(isOK(dom0.send(.release, "9")))
        #expect(dom0.send(.release, "9").error == .ENOENT)
        #expect(dom0.send(.isDomainIntroduced, "9").text == "F")
        #expect(guest.connection.isClosed)
    }

    @Test func controlAndUnknownTypes() {
        let c = TestClient(XenStore())
        #expect(c.send(.control, "help").text.contains("quota"))
        #expect(c.send(.control, "check").text == "OK")
        #expect(c.send(.control, "quota").text.contains("nodes-per-domain: 1000"))
        #expect(c.send(.control, "nonsense").error == .EINVAL)
        #expect(c.send(XenStoreMessage(type: XenStoreMessageType(rawValue: 999), payload: [0])).error == .EINVAL)
        #expect(c.send(XenStoreMessage(type: .watchEvent, payload: [0])).error == .EINVAL)
        #expect(isOK(c.send(.resetWatches, "")))
    }
}
