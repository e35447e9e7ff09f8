import Synchronization
import VireoABI

/// One side of a grant copy (GNTTABOP_copy).
public enum GrantCopyEndpoint: Sendable {
    /// A byte offset in the page granted by `domain` under `ref`.
    case grant(DomainID, GrantRef, offset: Int)
    /// A byte offset in memory of the caller's own: a host buffer for a backend, or the
    /// caller's own page for a guest's hypercall.
    case local(SharedRegion, offset: Int)
}

/// One segment of a grant copy.
public struct GrantCopySegment: Sendable {
    public var source: GrantCopyEndpoint
    public var dest: GrantCopyEndpoint
    public var length: Int

    public init(source: GrantCopyEndpoint, dest: GrantCopyEndpoint, length: Int) {
        self.source = source
        self.dest = dest
        self.length = length
    }
}

/// Every domain's grant table, by domain: the lookup grant copy and domain teardown need.
///
/// Tables sit in a fixed array indexed by domain ID (65 536 slots: no hashing, no growth); the
/// lock is held for the index and the reference count only.
public final class GrantTables: Sendable {
    private let tables = Mutex<ContiguousArray<GrantTable?>>(ContiguousArray(repeating: nil, count: 1 << 16))

    /// Segments one `copy` call processes at most; a longer request is continued by the caller
    /// (the hypercall layer re-enters, as Xen's preemptible continuation does).
    public static let copyBatchLimit = 512

    public init() {}

    public func add(_ table: GrantTable) throws(XenError) {
        try tables.withLock { (t: inout ContiguousArray<GrantTable?>) throws(XenError) in
            let slot = Int(table.domain.rawValue)
            guard t[slot] == nil else { throw .EEXIST }
            t[slot] = table
        }
    }

    public func table(for domain: DomainID) -> GrantTable? {
        tables.withLock { $0[Int(domain.rawValue)] }
    }

    /// `domain` died: its table is destroyed (mappings of its grants end) and every mapping it
    /// held of other domains' grants ends. Its ID may then be reused by a new table.
    public func remove(_ domain: DomainID) {
        let (own, others) = tables.withLock { t in
            let slot = Int(domain.rawValue)
            let own = t[slot]
            t[slot] = nil
            return (own, t.compactMap { $0 })
        }
        own?.destroy()
        for table in others { table.releaseMappings(of: domain) }
    }

    /// Copies each segment on behalf of `grantee`, writing one status per segment processed.
    /// Processes at most ``copyBatchLimit`` segments and returns how many it processed.
    ///
    /// Each grant is pinned (GTF_reading / GTF_writing set) while its bytes move. As Xen's
    /// `gnttab_copy` keeps the last source and destination buffers claimed, consecutive segments
    /// on the same grant (the same table, reference and direction) share one pin, released when
    /// a segment names another grant, at the first failure, and before this call returns: a
    /// grant is never held past the call, and never more than one batch long.
    public func copy<C: Collection<GrantCopySegment>>(
        _ segments: C, by grantee: DomainID, statuses: inout [GrantStatus]
    ) -> Int {
        // Arrays and slices (the usual callers) take the concrete loop, without generic
        // iteration per segment.
        if let done = segments.withContiguousStorageIfAvailable({ copy($0, by: grantee, statuses: &statuses) }) {
            return done
        }
        var processed = 0
        var cache = TableCache()
        var held = HeldPins()
        defer { held.release() }
        for segment in segments.prefix(Self.copyBatchLimit) {
            statuses.append(copy(segment, by: grantee, cache: &cache, held: &held))
            processed += 1
        }
        return processed
    }

    /// The batch over contiguous segments.
    private func copy(_ segments: UnsafeBufferPointer<GrantCopySegment>, by grantee: DomainID,
                      statuses: inout [GrantStatus]) -> Int {
        let count = min(segments.count, Self.copyBatchLimit)
        var cache = TableCache()
        var held = HeldPins()
        defer { held.release() }
        for i in 0..<count {
            statuses.append(copy(segments[i], by: grantee, cache: &cache, held: &held))
        }
        return count
    }

    /// Copies one segment; returns its status.
    public func copy(_ segment: GrantCopySegment, by grantee: DomainID) -> GrantStatus {
        var cache = TableCache()
        var held = HeldPins()
        defer { held.release() }
        return copy(segment, by: grantee, cache: &cache, held: &held)
    }

    /// The table last looked up in a batch: consecutive segments usually name the same domain,
    /// and the table object stays right for the whole batch even if the domain dies meanwhile
    /// (a destroyed table refuses pins).
    private struct TableCache {
        var domain: DomainID?
        var table: GrantTable?
    }

    /// One pin kept across consecutive segments of a batch.
    private struct HeldPin {
        var table: GrantTable
        var ref: GrantRef
        var writable: Bool
        var region: SharedRegion

        func release() { table.unpinAfterCopy(ref, writable: writable) }
    }

    /// The source and destination pins a batch holds (Xen's `src` and `dest` copy buffers).
    private struct HeldPins {
        var source: HeldPin?
        var dest: HeldPin?

        mutating func release() {
            source?.release()
            dest?.release()
            source = nil
            dest = nil
        }
    }

    private func copy(_ segment: GrantCopySegment, by grantee: DomainID, cache: inout TableCache,
                      held: inout HeldPins) -> GrantStatus {
        guard segment.length >= 0, segment.length <= guestPageSize else { return .badCopyArg }
        guard Self.fits(segment.source, segment.length), Self.fits(segment.dest, segment.length) else { return .badCopyArg }
        do throws(GrantStatus) {
            let source = try resolve(segment.source, grantee: grantee, writable: false, cache: &cache, held: &held.source)
            let dest = try resolve(segment.dest, grantee: grantee, writable: true, cache: &cache, held: &held.dest)
            dest.region.copyBytes(from: source.region, offset: source.offset, to: dest.offset, count: segment.length)
            return .okay
        } catch {
            // Whatever this segment pinned is released now, not at the end of the batch.
            held.release()
            return error
        }
    }

    private static func fits(_ endpoint: GrantCopyEndpoint, _ length: Int) -> Bool {
        switch endpoint {
        case .grant(_, _, let offset): offset >= 0 && offset <= guestPageSize - length
        case .local(let region, let offset): offset >= 0 && offset <= region.count - length
        }
    }

    /// The page and offset of one endpoint. A grant endpoint reuses `held` when it is the same
    /// grant of the same table and the granter is alive, and otherwise releases it and pins
    /// anew into it (so once a domain dies, no later segment of the batch touches its memory).
    private func resolve(
        _ endpoint: GrantCopyEndpoint, grantee: DomainID, writable: Bool, cache: inout TableCache, held: inout HeldPin?
    ) throws(GrantStatus) -> (region: SharedRegion, offset: Int) {
        switch endpoint {
        case .grant(let domain, let ref, let offset):
            if cache.domain != domain {
                cache = TableCache(domain: domain, table: table(for: domain))
            }
            guard let table = cache.table else { throw .badDomain }
            if let pin = held, pin.table === table, pin.ref == ref, !table.isDestroyed {
                return (pin.region, offset)
            }
            held?.release()
            held = nil
            let region = try table.pinForCopy(ref, grantee: grantee, writable: writable)
            held = HeldPin(table: table, ref: ref, writable: writable, region: region)
            return (region, offset)
        case .local(let region, let offset):
            return (region, offset)
        }
    }
}
