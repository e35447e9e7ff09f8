import VireoABI
import VireoHypercalls

/// Facts of the v1 grant table layout (vireo/grant_table.h).
public enum GrantTableLayout {
    /// Bytes per `grant_entry_v1`: flags (u16) at 0, domid (u16) at 2, frame (u32) at 4.
    public static let entrySize = 8
    public static let entriesPerFrame = guestPageSize / entrySize
    static let flagsOffset = 0
    static let frameOffset = 4

    static let typeMask = UInt16(VIREO_GTF_type_mask)
    static let permitAccess = UInt16(VIREO_GTF_permit_access)
    static let readonly = UInt16(VIREO_GTF_readonly)
    static let reading = UInt16(VIREO_GTF_reading)
    static let writing = UInt16(VIREO_GTF_writing)
    /// The flag bits a v1 entry may carry; anything above (v2's sub-page, transitive types
    /// use the type field) makes the entry invalid for Vireo.
    static let v1Bits: UInt16 = 0xFF
}
