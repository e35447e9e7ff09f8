import Dispatch
import Synchronization
import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

/// The lock-free pin records (SECURITY.md 7, 8, 6, 10): copies, maps and batches racing each
/// other, the granter's revocation and its death.
@Suite struct GrantPinTests {
    /// A zeroed host page, freed when the value goes.
    final class HostPage {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        var region: SharedRegion { SharedRegion.unsafe(memory, count: 4096) }
        init() { memory.initializeMemory(as: UInt8.self, repeating: 0, count: 4096) }
        deinit { memory.deallocate() }
    }

    /// SECURITY.md 8: revocation races copies cleanly. The guest revokes, scribbles a second
    /// pattern over the page (as it may once the grant is gone), restores the first and grants
    /// again, over and over, while two host threads copy the whole page out. Every copy that
    /// reports success must have held the grant for its whole length, so it sees only the
    /// first pattern; a copy whose pin did not stop the revocation would see the second.
    @Test func item8_revocationNeverSucceedsWhileACopyHoldsThePin() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let frame: UInt64 = 5
        let page = try f.memory.region(frame: GuestFrame(frame))
        page.fill(0x11, at: 0, count: 4096)
        let ref = try f.grant(to: .zero, frame: frame, readOnly: false)
        let guest = Mutex(f.guest)
        let stop = Atomic<Bool>(false)
        let copied = Atomic<Int>(0), torn = Atomic<Int>(0), revocations = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 3) { worker in
            if worker == 0 {
                // Until both sides have had plenty of turns (bounded, should a side starve).
                var tries = 0
                while tries < 5_000_000 && (revocations.load(ordering: .relaxed) < 2_000 || copied.load(ordering: .relaxed) < 2_000) {
                    tries += 1
                    guard guest.withLock({ $0.endAccess(ref) }) else { continue }
                    revocations.add(1, ordering: .relaxed)
                    page.fill(0x22, at: 0, count: 4096)
                    page.fill(0x11, at: 0, count: 4096)
                    guest.withLock { $0.write(ref, to: .zero, frame: GuestFrame(frame), readOnly: false) }
                    for _ in 0..<500 { Barrier.relax() }  // leave the copiers a window on the live grant
                }
                stop.store(true, ordering: .releasing)
                return
            }
            let host = HostPage(), local = host.region
            defer { withExtendedLifetime(host) {} }
            var statuses: [GrantStatus] = []
            while !stop.load(ordering: .acquiring) {
                let segment = GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0),
                                               dest: .local(local, offset: 0), length: 4096)
                let ok: Bool
                if worker == 1 {
                    ok = tables.copy(segment, by: .zero) == .okay
                } else {
                    statuses.removeAll(keepingCapacity: true)
                    _ = tables.copy([segment, segment], by: .zero, statuses: &statuses)
                    ok = statuses.allSatisfy { $0 == .okay }
                }
                guard ok else { continue }
                copied.add(1, ordering: .relaxed)
                let clean = local.withUnsafeBytes(offset: 0, count: 4096) { $0.allSatisfy { $0 == 0x11 } }
                if !clean { torn.add(1, ordering: .relaxed) }
            }
        }
        #expect(torn.load(ordering: .relaxed) == 0, "a copy saw the page after the guest revoked it")
        #expect(copied.load(ordering: .relaxed) > 0 && revocations.load(ordering: .relaxed) > 0, "both sides ran")
        #expect(f.table.pins(ref) == (0, 0))
        f.guest = guest.withLock { $0 }
        let revoked = f.revoke(ref)
        #expect(revoked, "revocable once the copies are done")
    }

    /// SECURITY.md 7: pin counts and flags stay right when copies (both directions, single and
    /// batched) and maps of one grant race on several threads; while a thread holds a pin the
    /// flags it needs are set.
    @Test func item7_copiesAndMapsRaceOnOneGrant() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let table = f.table
        let entry = try table.frameRegion(0)
        let offset = Int(ref.rawValue) * 8
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            let host = HostPage(), local = host.region
            defer { withExtendedLifetime(host) {} }
            var statuses: [GrantStatus] = []
            for i in 0..<4_000 {
                switch (i + worker) % 4 {
                case 0:
                    if tables.copy(GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0),
                                                    dest: .local(local, offset: 0), length: 64), by: .zero) != .okay {
                        failures.add(1, ordering: .relaxed)
                    }
                case 1:
                    statuses.removeAll(keepingCapacity: true)
                    let write = GrantCopySegment(source: .local(local, offset: 0),
                                                 dest: .grant(GrantFixture.guestID, ref, offset: 128), length: 64)
                    _ = tables.copy([write, write, write], by: .zero, statuses: &statuses)
                    if statuses != [.okay, .okay, .okay] { failures.add(1, ordering: .relaxed) }
                default:
                    let readOnly = (i / 4 + worker) % 2 == 0
                    guard let m = try? table.map(ref, by: .zero, readOnly: readOnly) else {
                        failures.add(1, ordering: .relaxed)
                        continue
                    }
                    let flags = entry.loadAcquire16(at: offset)
                    if flags & reading == 0 || (!readOnly && flags & writing == 0) { failures.add(1, ordering: .relaxed) }
                    m.unmap()
                }
            }
        }
        #expect(failures.load(ordering: .relaxed) == 0)
        #expect(table.pins(ref) == (0, 0))
        #expect(try f.flags(ref) & (reading | writing) == 0)
        let revoked = f.revoke(ref)
        #expect(revoked)
    }

    /// Consecutive segments on one grant share one pin, which the batch holds (so the guest
    /// cannot revoke) until a segment names another grant or the call returns.
    @Test func aBatchHoldsOnePinPerGrantUntilItMovesOn() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let a = try f.grant(to: .zero, frame: 3, readOnly: true)
        let b = try f.grant(to: .zero, frame: 4, readOnly: true)
        let host = HostPage(), local = host.region
        defer { withExtendedLifetime(host) {} }
        let table = f.table
        var observed: [(Int, (UInt32, UInt32), (UInt32, UInt32))] = []
        let order = [a, a, a, b, b]
        let segments = order.indices.lazy.map { i -> GrantCopySegment in
            // Runs as the batch reaches segment i: what do the earlier segments still hold?
            observed.append((i, table.pins(a), table.pins(b)))
            return GrantCopySegment(source: .grant(GrantFixture.guestID, order[i], offset: i * 8),
                                    dest: .local(local, offset: i * 8), length: 8)
        }
        var statuses: [GrantStatus] = []
        #expect(tables.copy(segments, by: .zero, statuses: &statuses) == 5)
        #expect(statuses == Array(repeating: .okay, count: 5))
        #expect(observed.map { $0.1.0 } == [0, 1, 1, 1, 0], "one reader pin on a while segments 0-2 use it")
        #expect(observed.map { $0.2.0 } == [0, 0, 0, 0, 1])
        #expect(table.pins(a) == (0, 0) && table.pins(b) == (0, 0), "nothing held after the call")
        let revokedBoth = f.revoke(a) && f.revoke(b)
        #expect(revokedBoth)
    }

    /// The granter dies in the middle of a batch: the segments after its death fail with
    /// bad_domain even on a grant the batch already holds, and every pin is released.
    @Test func theGranterDyingDuringABatchEndsIt() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let host = HostPage(), local = host.region
        defer { withExtendedLifetime(host) {} }
        let segments = (0..<4).lazy.map { i -> GrantCopySegment in
            if i == 2 { tables.remove(GrantFixture.guestID) }
            return GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0), dest: .local(local, offset: 0), length: 16)
        }
        var statuses: [GrantStatus] = []
        _ = tables.copy(segments, by: .zero, statuses: &statuses)
        #expect(statuses == [.okay, .okay, .badDomain, .badDomain])
        #expect(f.table.isDestroyed)
        #expect(f.table.pins(ref) == (0, 0))
        #expect(try f.flags(ref) & (reading | writing) == 0, "the dead domain's entry is left unpinned")
    }

    /// The granter dies while other threads copy from and map its grants: no crash, every copy
    /// after the death is refused, and no pin is left behind.
    @Test func theGranterDyingUnderConcurrentCopiesLeavesNoPin() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let refs = try (0..<8).map { try f.grant(to: .zero, frame: UInt64(1 + $0), readOnly: false) }
        let table = f.table
        let dead = Atomic<Bool>(false)
        let lateSuccesses = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 3) { worker in
            if worker == 0 {
                for _ in 0..<20_000 { Barrier.relax() }
                tables.remove(GrantFixture.guestID)
                dead.store(true, ordering: .releasing)
                return
            }
            let host = HostPage(), local = host.region
            defer { withExtendedLifetime(host) {} }
            var statuses: [GrantStatus] = []
            var i = 0
            while true {
                let wasDead = dead.load(ordering: .acquiring)
                let ref = refs[i % refs.count]
                i += 1
                statuses.removeAll(keepingCapacity: true)
                _ = tables.copy([
                    GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0), dest: .local(local, offset: 0), length: 256),
                    GrantCopySegment(source: .local(local, offset: 0), dest: .grant(GrantFixture.guestID, ref, offset: 256), length: 256),
                ], by: .zero, statuses: &statuses)
                let mapped = (try? table.map(ref, by: .zero, readOnly: worker == 1)) != nil
                if wasDead && (statuses.contains(.okay) || mapped) { lateSuccesses.add(1, ordering: .relaxed) }
                if wasDead { break }
            }
        }
        #expect(lateSuccesses.load(ordering: .relaxed) == 0)
        for ref in refs {
            #expect(table.pins(ref) == (0, 0))
            #expect(try f.flags(ref) & (reading | writing) == 0)
        }
        #expect(table.mappingCount == 0)
    }

    /// SECURITY.md 6: hostile references (past the table's current size, past its maximum,
    /// UInt32.max) are refused by every path and leave no trace; after the table grows, a
    /// reference in the new frame is checked like any other.
    @Test func item6_hostileReferencesAreRefusedOnEveryPath() throws {
        var f = try GrantFixture(maxFrames: 4, initialFrames: 1)
        let tables = GrantTables()
        try tables.add(f.table)
        let table = f.table
        let host = HostPage(), local = host.region
        defer { withExtendedLifetime(host) {} }
        let pages = UnsafeMutableBufferPointer<SharedRegion>.allocate(capacity: 1)
        defer { pages.deallocate() }
        let good = try f.grant(to: .zero, frame: 3, readOnly: false)
        for raw in [512, 4 * 512 - 1, 4 * 512, 1 << 31, UInt32.max] as [UInt32] {
            let ref = GrantRef(raw)
            #expect(throws: GrantStatus.badGntref) { _ = try table.map(ref, by: .zero, readOnly: true) }
            #expect(throws: GrantStatus.badGntref) {
                try [ref].withUnsafeBufferPointer { refs in
                    try table.withMappedPages(refs, by: .zero, writable: true, pages: pages) { _ in Issue.record("body ran") }
                }
            }
            var statuses: [GrantStatus] = []
            _ = tables.copy([
                GrantCopySegment(source: .grant(GrantFixture.guestID, good, offset: 0), dest: .local(local, offset: 0), length: 8),
                GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0), dest: .local(local, offset: 0), length: 8),
                GrantCopySegment(source: .local(local, offset: 0), dest: .grant(GrantFixture.guestID, ref, offset: 0), length: 8),
            ], by: .zero, statuses: &statuses)
            #expect(statuses == [.okay, .badGntref, .badGntref], "ref \(raw)")
            #expect(table.pins(ref) == (0, 0))
        }
        #expect(table.pins(good) == (0, 0))
        // Grow the table: a reference in frame 1 is now in range, and an empty entry is refused.
        _ = try table.setUp(frames: 2)
        #expect(throws: GrantStatus.badGntref) { _ = try table.map(GrantRef(600), by: .zero, readOnly: true) }
        try f.writeEntry(GrantRef(600), flags: UInt16(VIREO_GTF_permit_access), domid: 0, frame: 6)
        let m = try table.map(GrantRef(600), by: .zero, readOnly: true)
        #expect(table.pins(GrantRef(600)) == (1, 0))
        m.unmap()
        #expect(table.pins(GrantRef(600)) == (0, 0))
    }

    /// A grantee other than the one the grant names cannot join a pin another grantee holds.
    @Test func anotherGranteeCannotJoinAHeldPin() throws {
        var f = try GrantFixture()
        let tables = GrantTables()
        try tables.add(f.table)
        let ref = try f.grant(to: .zero, frame: 3, readOnly: false)
        let host = HostPage(), local = host.region
        defer { withExtendedLifetime(host) {} }
        let m = try f.table.map(ref, by: .zero, readOnly: false)
        #expect(throws: GrantStatus.permissionDenied) { _ = try f.table.map(ref, by: DomainID(4), readOnly: true) }
        #expect(throws: GrantStatus.permissionDenied) { _ = try f.table.map(ref, by: DomainID(4), readOnly: false) }
        #expect(tables.copy(GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0), dest: .local(local, offset: 0),
                                             length: 8), by: DomainID(4)) == .permissionDenied)
        #expect(f.table.pins(ref) == (0, 1), "the refused pins left the count as it was")
        m.unmap()
        let revoked = f.revoke(ref)
        #expect(revoked)
    }
}
