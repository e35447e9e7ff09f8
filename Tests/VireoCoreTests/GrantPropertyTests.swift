import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

/// The grant state machine against a model: random sequences of guest grants and revokes and
/// host maps, unmaps and copies; after every step the shared flags, the pin counts and every
/// operation's outcome match what the model predicts.
@Suite struct GrantPropertyTests {
    struct ModelGrant {
        var grantee: DomainID
        var readOnly: Bool
        var frame: UInt64
    }

    @Test(arguments: [1, 2, 3, 4, 5] as [UInt64])
    func randomOperationSequencesMatchTheModel(seed: UInt64) throws {
        var rng = SeededGenerator(seed: seed)
        var f = try GrantFixture(ramPages: 32, maxFrames: 1)
        let tables = GrantTables()
        try tables.add(f.table)
        var grants: [GrantRef: ModelGrant] = [:]
        var mappings: [(ref: GrantRef, writable: Bool, mapping: GrantMappingBox)] = []
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let local = SharedRegion.unsafe(buffer, count: 4096)

        func pins(_ ref: GrantRef) -> (UInt32, UInt32) {
            let held = mappings.filter { $0.ref == ref }
            return (UInt32(held.filter { !$0.writable }.count), UInt32(held.filter(\.writable).count))
        }

        for step in 0..<2_000 {
            switch rng.next() % 6 {
            case 0:  // guest grants a page to dom0 or to someone else
                let grantee = rng.next() % 4 == 0 ? DomainID(9) : DomainID.zero
                let grant = ModelGrant(grantee: grantee, readOnly: rng.next() % 2 == 0, frame: 1 + rng.next() % 31)
                if let ref = f.guest.grantAccess(to: grant.grantee, frame: GuestFrame(grant.frame), readOnly: grant.readOnly) {
                    grants[ref] = grant
                }
            case 1:  // guest revokes: succeeds exactly when nothing is pinned
                guard let ref = grants.keys.randomElement(using: &rng) else { continue }
                let inUse = pins(ref) != (0, 0)
                let revoked = f.revoke(ref)
                #expect(revoked == !inUse, "step \(step): revoke of \(ref) while in use: \(inUse)")
                if revoked { grants[ref] = nil }
            case 2, 3:  // host maps a granted (or random) reference
                let ref = rng.next() % 8 == 0 ? GrantRef(UInt32(8 + rng.next() % 600)) : (grants.keys.randomElement(using: &rng) ?? GrantRef(8))
                let writable = rng.next() % 2 == 0
                let expected: GrantStatus
                if Int(ref.rawValue) >= 512 {
                    expected = .badGntref
                } else if let grant = grants[ref] {
                    expected = grant.grantee != .zero || (writable && grant.readOnly) ? .permissionDenied : .okay
                } else {
                    expected = .badGntref
                }
                do {
                    let m = try f.table.map(ref, by: .zero, readOnly: !writable)
                    #expect(expected == .okay, "step \(step): map of \(ref) succeeded, model says \(expected)")
                    mappings.append((ref, writable, GrantMappingBox(m)))
                } catch {
                    #expect(error == expected, "step \(step): map of \(ref) gave \(error), model says \(expected)")
                }
            case 4:  // host unmaps one of its mappings
                guard !mappings.isEmpty else { continue }
                let index = Int(rng.next() % UInt64(mappings.count))
                mappings.remove(at: index).mapping.unmap()
            default:  // host copies from a granted page
                guard let ref = grants.keys.randomElement(using: &rng), let grant = grants[ref] else { continue }
                let status = tables.copy(GrantCopySegment(source: .grant(GrantFixture.guestID, ref, offset: 0),
                                                          dest: .local(local, offset: 0), length: 64), by: .zero)
                #expect(status == (grant.grantee == .zero ? .okay : .permissionDenied), "step \(step): copy gave \(status)")
            }
            // Invariants: the host's pins equal the model's, and the shared flags show exactly them.
            var held: [GrantRef: (UInt32, UInt32)] = [:]
            for m in mappings {
                let (r, w) = held[m.ref] ?? (0, 0)
                held[m.ref] = m.writable ? (r, w + 1) : (r + 1, w)
            }
            for ref in grants.keys {
                let (readers, writers) = held[ref] ?? (0, 0)
                #expect(f.table.pins(ref) == (readers, writers), "step \(step): pins of \(ref)")
                let flags = try f.flags(ref)
                #expect((flags & reading != 0) == (readers + writers > 0), "step \(step): GTF_reading of \(ref)")
                #expect((flags & writing != 0) == (writers > 0), "step \(step): GTF_writing of \(ref)")
            }
        }
        for entry in mappings { entry.mapping.unmap() }
        #expect(f.table.mappingCount == 0)
    }
}

/// Holds a noncopyable mapping in a collection.
final class GrantMappingBox {
    private var mapping: GrantMapping?
    init(_ mapping: consuming GrantMapping) { self.mapping = consume mapping }
    func unmap() { mapping = nil }
}
