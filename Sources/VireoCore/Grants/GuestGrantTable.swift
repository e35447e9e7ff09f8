import VireoABI
import VireoHypercalls

/// The granting side of a v1 grant table: what a guest (frontend) does with its own table.
///
/// Granting: write `frame` and `domid`, a write barrier (the host must see them before the
/// entry becomes valid), then `flags = permit_access [| readonly]`.
/// Revoking: only when neither GTF_reading nor GTF_writing is set, with a compare-exchange
/// that clears the flags, so the host cannot start using the grant between the check and the
/// clear; while the backend still has the page mapped or is copying, revoking refuses.
///
/// Written without Foundation so a bare-metal guest can compile the same code; the simulated
/// guest of the tests uses it against real guest memory.
public struct GuestGrantTable: Sendable {
    /// The table frames as the guest sees them, in order.
    let frames: [SharedRegion]
    private var free: [UInt32]

    /// A table over `frames`; references below `reserved` (Xen's reserved entries, 8) are not
    /// handed out.
    public init(frames: [SharedRegion], reserved: Int = Int(VIREO_GNTTAB_NR_RESERVED_ENTRIES)) {
        precondition(frames.allSatisfy { $0.count == guestPageSize }, "grant table frames are whole pages")
        self.frames = frames
        let total = frames.count * GrantTableLayout.entriesPerFrame
        self.free = total > reserved ? Array((UInt32(reserved)..<UInt32(total)).reversed()) : []
    }

    /// References still free.
    public var freeCount: Int { free.count }

    private func entry(_ ref: GrantRef) -> (SharedRegion, Int) {
        let index = Int(ref.rawValue) / GrantTableLayout.entriesPerFrame
        precondition(index < frames.count, "grant reference beyond the table")
        return (frames[index], (Int(ref.rawValue) % GrantTableLayout.entriesPerFrame) * GrantTableLayout.entrySize)
    }

    /// Grants `domain` access to `frame`; returns the reference, or nil if the table is full or
    /// the frame does not fit v1's 32-bit frame field.
    public mutating func grantAccess(to domain: DomainID, frame: GuestFrame, readOnly: Bool) -> GrantRef? {
        guard frame.rawValue <= UInt64(UInt32.max), let raw = free.popLast() else { return nil }
        let ref = GrantRef(raw)
        write(ref, to: domain, frame: frame, readOnly: readOnly)
        return ref
    }

    /// Writes one entry in the order the protocol requires.
    public func write(_ ref: GrantRef, to domain: DomainID, frame: GuestFrame, readOnly: Bool) {
        let (region, offset) = entry(ref)
        region.store(UInt32(truncatingIfNeeded: frame.rawValue), at: offset + GrantTableLayout.frameOffset)
        region.store(domain.rawValue, at: offset + 2)
        Barrier.write()
        let flags = GrantTableLayout.permitAccess | (readOnly ? GrantTableLayout.readonly : 0)
        region.storeRelease32(UInt32(flags) | UInt32(domain.rawValue) << 16, at: offset)
    }

    /// Whether the host is using the grant (mapped or copying).
    public func isInUse(_ ref: GrantRef) -> Bool {
        let (region, offset) = entry(ref)
        return region.loadAcquire16(at: offset) & (GrantTableLayout.reading | GrantTableLayout.writing) != 0
    }

    /// Revokes `ref` if the host is not using it, and frees the reference. Returns false (and
    /// changes nothing) while the grant is in use.
    public mutating func endAccess(_ ref: GrantRef) -> Bool {
        let (region, offset) = entry(ref)
        var flags = region.loadAcquire16(at: offset)
        while true {
            if flags & (GrantTableLayout.reading | GrantTableLayout.writing) != 0 { return false }
            let seen = region.compareExchange16(at: offset, expected: flags, desired: 0)
            if seen == flags { break }
            flags = seen
        }
        free.append(ref.rawValue)
        return true
    }
}
