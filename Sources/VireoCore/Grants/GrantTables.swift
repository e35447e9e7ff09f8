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
public final class GrantTables: Sendable {
    private let tables = Mutex<[DomainID: GrantTable]>([:])

    /// Segments one `copy` call processes at most; a longer request is continued by the caller
    /// (the hypercall layer re-enters, as Xen's preemptible continuation does).
    public static let copyBatchLimit = 512

    public init() {}

    public func add(_ table: GrantTable) throws(XenError) {
        try tables.withLock { (t: inout [DomainID: GrantTable]) throws(XenError) in
            guard t[table.domain] == nil else { throw .EEXIST }
            t[table.domain] = table
        }
    }

    public func table(for domain: DomainID) -> GrantTable? {
        tables.withLock { $0[domain] }
    }

    /// `domain` died: its table is destroyed (mappings of its grants end) and every mapping it
    /// held of other domains' grants ends. Its ID may then be reused by a new table.
    public func remove(_ domain: DomainID) {
        let (own, others) = tables.withLock { t in (t.removeValue(forKey: domain), Array(t.values)) }
        own?.destroy()
        for table in others { table.releaseMappings(of: domain) }
    }

    /// Copies each segment on behalf of `grantee`, writing one status per segment processed.
    /// Processes at most ``copyBatchLimit`` segments and returns how many it processed.
    /// Each grant is pinned (GTF_reading / GTF_writing set) only while its bytes move.
    public func copy<C: Collection<GrantCopySegment>>(
        _ segments: C, by grantee: DomainID, statuses: inout [GrantStatus]
    ) -> Int {
        var processed = 0
        var cache = TableCache()
        for segment in segments.prefix(Self.copyBatchLimit) {
            statuses.append(copy(segment, by: grantee, cache: &cache))
            processed += 1
        }
        return processed
    }

    /// Copies one segment; returns its status.
    public func copy(_ segment: GrantCopySegment, by grantee: DomainID) -> GrantStatus {
        var cache = TableCache()
        return copy(segment, by: grantee, cache: &cache)
    }

    /// The table last looked up in a batch: consecutive segments usually name the same domain,
    /// and the table object stays right for the whole batch even if the domain dies meanwhile
    /// (a destroyed table refuses pins).
    private struct TableCache {
        var domain: DomainID?
        var table: GrantTable?
    }

    private func copy(_ segment: GrantCopySegment, by grantee: DomainID, cache: inout TableCache) -> GrantStatus {
        guard segment.length >= 0, segment.length <= guestPageSize else { return .badCopyArg }
        guard Self.fits(segment.source, segment.length), Self.fits(segment.dest, segment.length) else { return .badCopyArg }
        do throws(GrantStatus) {
            let source = try resolve(segment.source, grantee: grantee, writable: false, cache: &cache)
            defer { source.table?.unpinAfterCopy(source.ref, writable: false) }
            let dest = try resolve(segment.dest, grantee: grantee, writable: true, cache: &cache)
            defer { dest.table?.unpinAfterCopy(dest.ref, writable: true) }
            dest.region.copyBytes(from: source.region, offset: source.offset, to: dest.offset, count: segment.length)
            return .okay
        } catch {
            return error
        }
    }

    /// A resolved endpoint; `table` is set when a pin must be released (on the very table that
    /// was pinned, even if the domain's ID is reused meanwhile).
    private struct Resolved {
        var region: SharedRegion
        var offset: Int
        var table: GrantTable?
        var ref: GrantRef
    }

    private static func fits(_ endpoint: GrantCopyEndpoint, _ length: Int) -> Bool {
        switch endpoint {
        case .grant(_, _, let offset): offset >= 0 && offset <= guestPageSize - length
        case .local(let region, let offset): offset >= 0 && offset <= region.count - length
        }
    }

    private func resolve(
        _ endpoint: GrantCopyEndpoint, grantee: DomainID, writable: Bool, cache: inout TableCache
    ) throws(GrantStatus) -> Resolved {
        switch endpoint {
        case .grant(let domain, let ref, let offset):
            if cache.domain != domain {
                cache = TableCache(domain: domain, table: table(for: domain))
            }
            guard let table = cache.table else { throw .badDomain }
            let region = try table.pinForCopy(ref, grantee: grantee, writable: writable)
            return Resolved(region: region, offset: offset, table: table, ref: ref)
        case .local(let region, let offset):
            return Resolved(region: region, offset: offset, table: nil, ref: GrantRef(0))
        }
    }
}
