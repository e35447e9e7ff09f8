#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// The guest's own grant table (v1), its frames placed in the guest's physical map with
/// XENMEM_add_to_physmap(XENMAPSPACE_grant_table) and used through ``GuestGrantTable``:
/// granting writes frame and domain before the flags; revoking refuses while the backend
/// still has the grant mapped or is copying (GTF_reading/GTF_writing set).
public struct GuestGrants<Platform: GuestPlatform> {
    public let guest: Guest<Platform>
    var table: GuestGrantTable

    /// Maps the table's current frames at `firstFrame` onwards (by default after shared_info,
    /// above RAM). References 0-7 stay reserved (the toolstack's console and store grants).
    public init(guest: Guest<Platform>, firstFrame: GuestFrame? = nil) throws(GuestError) {
        self.guest = guest
        let size = try guest.grantTableSize()
        var start = GuestFrame(0)
        if let firstFrame { start = firstFrame } else { start = try guest.frameAboveRAM(1) }
        var frames: [SharedRegion] = []
        for index in 0..<max(size.frames, 1) {
            let frame = GuestFrame(start.rawValue + UInt64(index))
            try guest.addToPhysmap(space: VIREO_XENMAPSPACE_grant_table, index: UInt64(index), at: frame)
            frames.append(guest.platform.memory(at: frame.rawValue << guestPageShift, count: guestPageSize))
        }
        table = GuestGrantTable(frames: frames)
    }

    /// References still free.
    public var freeCount: Int { table.freeCount }

    /// Lets `domain` map or copy `frame` of this guest's RAM; nil when the table is full.
    public mutating func grantAccess(to domain: DomainID, frame: GuestFrame, readOnly: Bool) -> GrantRef? {
        table.grantAccess(to: domain, frame: frame, readOnly: readOnly)
    }

    /// Whether the backend is using the grant now.
    public func isInUse(_ ref: GrantRef) -> Bool { table.isInUse(ref) }

    /// Revokes `ref`; false (nothing changed) while the backend still uses it.
    public mutating func endAccess(_ ref: GrantRef) -> Bool { table.endAccess(ref) }
}
