import Dispatch
import Synchronization
import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

/// A granting guest and the host's view of its table, over real guest memory.
struct GrantFixture {
    static let guestID = DomainID(1)
    static let backendID = DomainID.zero
    let memory: GuestMemory
    let table: GrantTable
    var guest: GuestGrantTable

    init(ramPages: UInt64 = 64, maxFrames: Int = 4, initialFrames: Int = 1) throws {
        let memory = try GuestMemory(ramBytes: ramPages * 4096, specialFrames: maxFrames)
        let table = try GrantTable(domain: Self.guestID, memory: memory, firstSpecialFrame: 0, maxFrames: maxFrames,
                                   initialFrames: initialFrames)
        // The guest maps its table frames just above RAM, as a PVH guest would in a hole.
        var frames: [SharedRegion] = []
        for i in 0..<initialFrames {
            try table.place(frame: i, at: GuestFrame(ramPages + UInt64(i)))
            frames.append(try memory.region(frame: GuestFrame(ramPages + UInt64(i))))
        }
        self.memory = memory
        self.table = table
        self.guest = GuestGrantTable(frames: frames)
    }

    /// Grants as the guest does; fails the test if the table is full.
    mutating func grant(to domain: DomainID, frame: UInt64, readOnly: Bool) throws -> GrantRef {
        guard let ref = guest.grantAccess(to: domain, frame: GuestFrame(frame), readOnly: readOnly) else {
            throw GrantStatus.noSpace
        }
        return ref
    }

    mutating func revoke(_ ref: GrantRef) -> Bool { guest.endAccess(ref) }

    func flags(_ ref: GrantRef) throws -> UInt16 {
        let region = try table.frameRegion(Int(ref.rawValue) / 512)
        return region.load(UInt16.self, at: Int(ref.rawValue % 512) * 8)
    }

    func writeEntry(_ ref: GrantRef, flags: UInt16, domid: UInt16, frame: UInt32) throws {
        let region = try table.frameRegion(Int(ref.rawValue) / 512)
        let offset = Int(ref.rawValue % 512) * 8
        region.store(frame, at: offset + 4)
        region.store(UInt32(flags) | UInt32(domid) << 16, at: offset)
    }
}

let reading = UInt16(VIREO_GTF_reading)
let writing = UInt16(VIREO_GTF_writing)

@Suite struct GrantTableTests {
    @Test func statusValuesMatchTheHeader() {
        for (status, value) in GrantStatus.headerValues { #expect(Int32(status.rawValue) == value) }
    }

    @Test func mapReadsTheGrantedPageAndMarksItInUse() throws {
        var f = try GrantFixture()
        try f.memory.store(UInt64(0xfeed), at: GuestPhysicalAddress(5 * 4096 + 16))
        let ref = try f.grant(to: GrantFixture.backendID, frame: 5, readOnly: false)
        #expect(ref.rawValue >= 8, "reserved entries are not handed out")
        #expect(try f.flags(ref) == UInt16(VIREO_GTF_permit_access))
        do {
            let mapping = try f.table.map(ref, by: GrantFixture.backendID, readOnly: false)
            #expect(try mapping.load(UInt64.self, at: 16) == 0xfeed)
            try mapping.store(UInt64(0xbeef), at: 24)
            #expect(try f.flags(ref) & (reading | writing) == reading | writing)
            #expect(f.guest.isInUse(ref))
            let revokedWhileMapped = f.revoke(ref)
            #expect(!revokedWhileMapped, "revoke refuses while mapped")
            mapping.unmap()
        }
        #expect(try f.memory.load(UInt64.self, at: GuestPhysicalAddress(5 * 4096 + 24)) == 0xbeef)
        #expect(try f.flags(ref) & (reading | writing) == 0)
        let revoked = f.revoke(ref)
        #expect(revoked)
        #expect(try f.flags(ref) == 0)
        #expect(f.table.mappingCount == 0)
    }

    /// One I/O's batch of grants: pinned all or none, marked in use during the body only.
    @Test func withMappedPagesPinsAllOrNoneForTheBodyOnly() throws {
        var f = try GrantFixture()
        try f.memory.store(UInt64(0xabcd), at: GuestPhysicalAddress(7 * 4096 + 8))
        let a = try f.grant(to: GrantFixture.backendID, frame: 7, readOnly: true)
        let b = try f.grant(to: GrantFixture.backendID, frame: 9, readOnly: false)
        let readOnly = try f.grant(to: GrantFixture.backendID, frame: 10, readOnly: true)
        let pages = UnsafeMutableBufferPointer<SharedRegion>.allocate(capacity: 4)
        defer { pages.deallocate() }
        let table = f.table
        let flags = { (ref: GrantRef) throws -> UInt16 in try f.flags(ref) }
        // Reading both: each page is in use while the body runs, its bytes reachable by vector.
        let seen = try [a, b].withUnsafeBufferPointer { refs in
            try table.withMappedPages(refs, by: GrantFixture.backendID, writable: false, pages: pages) { mapped in
                #expect(mapped.count == 2)
                #expect(table.pins(a) == (1, 0) && table.pins(b) == (1, 0))
                #expect((try? flags(a)).map { $0 & reading } == reading)
                let vector = mapped[0].ioVector(offset: 8, count: 8)
                return vector.iov_base!.loadUnaligned(as: UInt64.self)
            }
        }
        #expect(seen == 0xabcd)
        #expect(table.pins(a) == (0, 0) && table.pins(b) == (0, 0))
        #expect(try f.flags(a) & (reading | writing) == 0 && f.flags(b) & (reading | writing) == 0)
        // Writing into a read-only grant, after a good one: refused, and nothing stays pinned.
        #expect(throws: GrantStatus.permissionDenied) {
            try [b, readOnly].withUnsafeBufferPointer { refs in
                try table.withMappedPages(refs, by: GrantFixture.backendID, writable: true, pages: pages) { _ in
                    Issue.record("the body ran")
                }
            }
        }
        #expect(throws: GrantStatus.badGntref) {
            try [b, GrantRef(100_000)].withUnsafeBufferPointer { refs in
                try table.withMappedPages(refs, by: GrantFixture.backendID, writable: false, pages: pages) { _ in }
            }
        }
        #expect(table.pins(b) == (0, 0) && table.pins(readOnly) == (0, 0))
        #expect(f.revoke(a) && f.revoke(b) && f.revoke(readOnly))
    }

    /// The inlined pin path for one I/O: a grant named twice in one writable batch joins its
    /// own pin (two writers), the guest cannot end either grant while the body runs (SECURITY.md
    /// 8), and afterwards both counts are zero, the flags clear and the grants end.
    @Test func withMappedPagesHoldsGrantsInUseUntilTheBodyReturns() throws {
        var f = try GrantFixture()
        let a = try f.grant(to: GrantFixture.backendID, frame: 11, readOnly: false)
        let b = try f.grant(to: GrantFixture.backendID, frame: 12, readOnly: false)
        let pages = UnsafeMutableBufferPointer<SharedRegion>.allocate(capacity: 3)
        defer { pages.deallocate() }
        let table = f.table
        var endedWhilePinned = [Bool]()
        var flagsWhilePinned = [UInt16]()
        try [a, b, a].withUnsafeBufferPointer { refs in
            try table.withMappedPages(refs, by: GrantFixture.backendID, writable: true, pages: pages) { mapped in
                #expect(mapped.count == 3)
                #expect(table.pins(a) == (0, 2) && table.pins(b) == (0, 1))
                mapped[2].store(UInt32(0x5eed), at: 100)
                flagsWhilePinned = [(try? f.flags(a)) ?? 0, (try? f.flags(b)) ?? 0]
                endedWhilePinned = [f.revoke(a), f.revoke(b)]
            }
        }
        #expect(endedWhilePinned == [false, false])
        #expect(flagsWhilePinned.allSatisfy { $0 & (reading | writing) == reading | writing })
        #expect(try f.memory.load(UInt32.self, at: GuestPhysicalAddress(11 * 4096 + 100)) == 0x5eed)
        #expect(table.pins(a) == (0, 0) && table.pins(b) == (0, 0))
        #expect(try f.flags(a) & (reading | writing) == 0 && f.flags(b) & (reading | writing) == 0)
        #expect(f.revoke(a) && f.revoke(b))
    }

    @Test func droppingTheMappingUnmaps() throws {
        var f = try GrantFixture()
        let ref = try f.grant(to: GrantFixture.backendID, frame: 3, readOnly: true)
        do {
            let mapping = try f.table.map(ref, by: GrantFixture.backendID, readOnly: true)
            let valid = mapping.isValid
            #expect(valid)
            #expect(f.table.pins(ref) == (1, 0))
        }
        #expect(f.table.pins(ref) == (0, 0))
        #expect(try f.flags(ref) & reading == 0)
    }

    @Test func readOnlyGrantsRefuseWrites() throws {
        var f = try GrantFixture()
        let ref = try f.grant(to: GrantFixture.backendID, frame: 3, readOnly: true)
        #expect(throws: GrantStatus.permissionDenied) { _ = try f.table.map(ref, by: GrantFixture.backendID, readOnly: false) }
        #expect(try f.flags(ref) & (reading | writing) == 0, "a refused map leaves no trace")
        let mapping = try f.table.map(ref, by: GrantFixture.backendID, readOnly: true)
        #expect(throws: GrantStatus.permissionDenied) { try mapping.store(UInt8(1), at: 0) }
        #expect(throws: GrantStatus.permissionDenied) { _ = try mapping.sharedRegion() }
        #expect(try f.flags(ref) & writing == 0)
    }

    /// SECURITY.md 6: grant references are bounds-checked against the table's size.
    @Test func item6_referencesBeyondTheTableAreRefused() throws {
        let f = try GrantFixture(maxFrames: 4, initialFrames: 1)
        #expect(throws: GrantStatus.badGntref) { _ = try f.table.map(GrantRef(512), by: .zero, readOnly: true) }
        #expect(throws: GrantStatus.badGntref) { _ = try f.table.map(GrantRef(UInt32.max), by: .zero, readOnly: true) }
        #expect(throws: GrantStatus.badGntref) { _ = try f.table.map(GrantRef(9), by: .zero, readOnly: true) }  // never granted
        #expect(throws: XenError.EINVAL) { _ = try f.table.setUp(frames: 5) }
        #expect(try f.table.setUp(frames: 2).count == 2)
        #expect(f.table.size == (2, 4))
    }

    @Test func wrongGranteeAndBadFramesAreRefused() throws {
        var f = try GrantFixture(ramPages: 16)
        let ref = try f.grant(to: DomainID(7), frame: 3, readOnly: false)
        #expect(throws: GrantStatus.permissionDenied) { _ = try f.table.map(ref, by: .zero, readOnly: false) }
        // A frame outside the guest's RAM, and the table's own frame placed at 16: not grantable.
        let outside = try f.grant(to: .zero, frame: 1000, readOnly: false)
        #expect(throws: GrantStatus.badPage) { _ = try f.table.map(outside, by: .zero, readOnly: false) }
        #expect(try f.flags(outside) & (reading | writing) == 0, "flags set for the attempt are cleared again")
        let ownTable = try f.grant(to: .zero, frame: 16, readOnly: false)
        #expect(throws: GrantStatus.badPage) { _ = try f.table.map(ownTable, by: .zero, readOnly: false) }
    }

    /// SECURITY.md 9: v1 only. Entries using v2's sub-page flag, the transitive type or
    /// accept_transfer are not mappable.
    @Test func item9_onlyV1PermitAccessEntriesAreHonoured() throws {
        let f = try GrantFixture()
        let cases: [(UInt16, String)] = [
            (3, "GTF_transitive (v2)"), (UInt16(VIREO_GTF_permit_access) | 1 << 8, "GTF_sub_page (v2)"),
            (UInt16(VIREO_GTF_accept_transfer), "accept_transfer"), (0, "invalid"),
        ]
        for (i, (flags, name)) in cases.enumerated() {
            let ref = GrantRef(UInt32(20 + i))
            try f.writeEntry(ref, flags: flags, domid: 0, frame: 3)
            #expect(throws: GrantStatus.badGntref, "\(name)") { _ = try f.table.map(ref, by: .zero, readOnly: true) }
        }
    }

    @Test func theFrameIsReadOnceAtFirstPin() throws {
        var f = try GrantFixture()
        try f.memory.store(UInt32(0x1111), at: GuestPhysicalAddress(3 * 4096))
        try f.memory.store(UInt32(0x2222), at: GuestPhysicalAddress(4 * 4096))
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let first = try f.table.map(ref, by: .zero, readOnly: false)
        // A hostile granter rewrites the frame while the grant is in use.
        let region = try f.table.frameRegion(0)
        region.store(UInt32(4), at: Int(ref.rawValue) * 8 + 4)
        let second = try f.table.map(ref, by: .zero, readOnly: true)
        #expect(try first.load(UInt32.self, at: 0) == 0x1111)
        #expect(try second.load(UInt32.self, at: 0) == 0x1111)
        #expect(f.table.pins(ref) == (1, 1))
    }

    @Test func handlesAreNeverConfusedAfterReuse() throws {
        var f = try GrantFixture()
        let ref = try f.grant(to: .zero, frame: 3, readOnly: true)
        let a = try f.table.map(ref, by: .zero, readOnly: true)
        let (handle, generation) = (a.handle, a.generation)
        a.unmap()
        let b = try f.table.map(ref, by: .zero, readOnly: true)
        #expect(b.handle == handle, "the slot is reused")
        #expect(f.table.unmap(handle, generation: generation) == .badHandle, "a stale handle does not end the new mapping")
        let stillValid = b.isValid
        #expect(stillValid)
        #expect(f.table.unmap(GrantHandle(999)) == .badHandle)
    }

    @Test func mappingsAreBounded() throws {
        let memory = try GuestMemory(ramBytes: 16 * 4096, specialFrames: 1)
        let table = try GrantTable(domain: DomainID(1), memory: memory, firstSpecialFrame: 0, maxFrames: 1, maxMappings: 2)
        var guest = GuestGrantTable(frames: [try table.frameRegion(0)])
        let ref = try #require(guest.grantAccess(to: .zero, frame: GuestFrame(1), readOnly: true) as GrantRef?)
        let m1 = try table.map(ref, by: .zero, readOnly: true)
        let m2 = try table.map(ref, by: .zero, readOnly: true)
        #expect(throws: GrantStatus.noSpace) { _ = try table.map(ref, by: .zero, readOnly: true) }
        #expect(table.pins(ref) == (2, 0), "the refused map took no pin")
        _ = (m1.isValid, m2.isValid)
    }

    @Test func domainDeathEndsMappings() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        #expect(throws: XenError.EEXIST) { try tables.add(f.table) }
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let byBackend = try f.table.map(ref, by: .zero, readOnly: false)
        // The grantee (backend) dies: its mapping ends and the guest may revoke.
        tables.remove(DomainID(5))  // an unrelated domain: nothing happens
        let validBefore = byBackend.isValid
        #expect(validBefore)
        f.table.releaseMappings(of: .zero)
        let validAfter = byBackend.isValid
        #expect(!validAfter)
        #expect(throws: GrantStatus.badHandle) { _ = try byBackend.load(UInt8.self, at: 0) }
        let revoked = f.revoke(ref)
        #expect(revoked)
        // The granter dies: no more maps; existing mappings end.
        let ref2 = try f.grant(to: .zero, frame: 4, readOnly: false)
        let m = try f.table.map(ref2, by: .zero, readOnly: false)
        tables.remove(GrantFixture.guestID)
        let mValid = m.isValid
        #expect(!mValid)
        #expect(f.table.isDestroyed)
        #expect(throws: GrantStatus.badDomain) { _ = try f.table.map(ref2, by: .zero, readOnly: false) }
        #expect(tables.table(for: GrantFixture.guestID) == nil, "the ID is free for a new domain")
    }

    /// SECURITY.md 7: pin counts and flags stay right when many threads map and unmap one
    /// grant at once.
    @Test func item7_pinCountsSurviveConcurrentMapAndUnmap() throws {
        var f = try GrantFixture()
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let table = f.table
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            for i in 0..<5_000 {
                let readOnly = (i + worker) % 3 != 0
                if let m = try? table.map(ref, by: .zero, readOnly: readOnly) {
                    _ = try? m.load(UInt8.self, at: 0)
                    m.unmap()
                } else {
                    Issue.record("map failed on iteration \(i)")
                }
            }
        }
        #expect(table.pins(ref) == (0, 0))
        #expect(try f.flags(ref) & (reading | writing) == 0)
        #expect(table.mappingCount == 0)
        let revoked = f.revoke(ref)
        #expect(revoked)
    }

    /// SECURITY.md 8: a grant is never reported released while mapped, and revocation races
    /// with mapping cleanly: either the map wins (and revoke refuses) or the revoke wins (and
    /// the map fails); never both.
    @Test func item8_revocationRacesMappingCleanly() throws {
        var f = try GrantFixture()
        let table = f.table
        for round in 0..<2_000 {
            let ref = try f.grant(to: .zero, frame: UInt64(1 + round % 40), readOnly: false)
            let outcome = Mutex<(mapped: Bool, revoked: Bool)>((false, false))
            let guest = Mutex(f.guest)
            DispatchQueue.concurrentPerform(iterations: 2) { side in
                if side == 0 {
                    if let m = try? table.map(ref, by: .zero, readOnly: false) {
                        outcome.withLock { $0.mapped = true }
                        // While mapped, the grant must show as in use.
                        if try! table.frameRegion(0).load(UInt16.self, at: Int(ref.rawValue) * 8) & writing == 0 {
                            Issue.record("mapped but not marked in use")
                        }
                        m.unmap()
                    }
                } else {
                    let revoked = guest.withLock { $0.endAccess(ref) }
                    outcome.withLock { $0.revoked = revoked }
                }
            }
            let o = outcome.withLock { $0 }
            #expect(o.mapped || o.revoked, "one side wins")
            if !o.revoked {
                let revocable = f.revoke(ref)
                #expect(revocable, "revocable once unmapped")
            } else {
                f.guest = guest.withLock { $0 }
            }
        }
    }
}

@Suite struct GrantCopyTests {
    static func fixture() throws -> (GrantFixture, GrantTables) {
        let f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        return (f, tables)
    }

    @Test func copiesBetweenGrantsAndLocalBuffers() throws {
        var (f, tables) = try Self.fixture()
        try f.memory.write(Array(repeating: 0x5a, count: 100), at: GuestPhysicalAddress(3 * 4096 + 10))
        let src = try f.grant(to: .zero, frame: 3, readOnly: true)
        let dst = try f.grant(to: .zero, frame: 4, readOnly: false)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let local = SharedRegion.unsafe(buffer, count: 4096)
        local.fill(0, at: 0, count: 4096)
        var statuses: [GrantStatus] = []
        let done = tables.copy([
            GrantCopySegment(source: .grant(GrantFixture.guestID, src, offset: 10), dest: .local(local, offset: 0), length: 100),
            GrantCopySegment(source: .local(local, offset: 0), dest: .grant(GrantFixture.guestID, dst, offset: 4000), length: 96),
            GrantCopySegment(source: .grant(GrantFixture.guestID, src, offset: 10), dest: .grant(GrantFixture.guestID, dst, offset: 0), length: 4),
        ], by: .zero, statuses: &statuses)
        #expect(done == 3)
        #expect(statuses == [.okay, .okay, .okay])
        #expect(local.load(UInt8.self, at: 99) == 0x5a)
        #expect(try f.memory.bytes(at: GuestPhysicalAddress(4 * 4096 + 4000), count: 96) == Array(repeating: 0x5a, count: 96))
        #expect(try f.memory.load(UInt32.self, at: GuestPhysicalAddress(4 * 4096)) == 0x5a5a_5a5a)
        #expect(f.table.pins(src) == (0, 0) && f.table.pins(dst) == (0, 0), "copies hold no pin afterwards")
    }

    @Test func badSegmentsGetTheirOwnStatusAndOthersProceed() throws {
        var (f, tables) = try Self.fixture()
        let ro = try f.grant(to: .zero, frame: 3, readOnly: true)
        let rw = try f.grant(to: .zero, frame: 4, readOnly: false)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let local = SharedRegion.unsafe(buffer, count: 4096)
        let g = GrantFixture.guestID
        var statuses: [GrantStatus] = []
        _ = tables.copy([
            GrantCopySegment(source: .local(local, offset: 0), dest: .grant(g, ro, offset: 0), length: 8),      // write to r/o
            GrantCopySegment(source: .grant(g, rw, offset: 4090), dest: .local(local, offset: 0), length: 8),  // crosses the page
            GrantCopySegment(source: .grant(DomainID(42), rw, offset: 0), dest: .local(local, offset: 0), length: 8),
            GrantCopySegment(source: .grant(g, GrantRef(100_000), offset: 0), dest: .local(local, offset: 0), length: 8),
            GrantCopySegment(source: .grant(g, rw, offset: 0), dest: .local(local, offset: 0), length: -1),
            GrantCopySegment(source: .grant(g, rw, offset: 0), dest: .local(local, offset: 4095), length: 8),
            GrantCopySegment(source: .grant(g, rw, offset: 0), dest: .local(local, offset: 0), length: 8),      // fine
        ], by: .zero, statuses: &statuses)
        #expect(statuses == [.permissionDenied, .badCopyArg, .badDomain, .badGntref, .badCopyArg, .badCopyArg, .okay])
        #expect(f.table.pins(ro) == (0, 0) && f.table.pins(rw) == (0, 0), "failed segments leave no pin behind")
        let revokedBoth = f.revoke(ro) && f.revoke(rw)
        #expect(revokedBoth)
    }

    /// SECURITY.md 10: a long grant operation is bounded: one call does at most a batch, and
    /// the caller continues (as Xen's hypercall continuations do).
    @Test func item10_longCopiesAreProcessedInBoundedBatches() throws {
        var (f, tables) = try Self.fixture()
        let rw = try f.grant(to: .zero, frame: 4, readOnly: false)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let local = SharedRegion.unsafe(buffer, count: 4096)
        let segment = GrantCopySegment(source: .grant(GrantFixture.guestID, rw, offset: 0), dest: .local(local, offset: 0), length: 64)
        let huge = repeatElement(segment, count: 10_000_000)
        var statuses: [GrantStatus] = []
        let done = tables.copy(huge, by: .zero, statuses: &statuses)
        #expect(done == GrantTables.copyBatchLimit)
        #expect(statuses.count == done)
    }
}
