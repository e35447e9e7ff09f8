import VireoHypercalls

/// The segments of a blkif request: Swift imports `seg[11]` as a tuple, so every reader and
/// writer goes through these two accessors instead of its own raw-memory code. The index is
/// checked against the array (a programming error traps); checking it against `nr_segments`,
/// a value the guest controls, is the caller's validation.
extension vireo_blkif_request {
    public static let maxSegments = Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)

    @inlinable
    public func segment(_ index: Int) -> vireo_blkif_request_segment {
        precondition(index >= 0 && index < Self.maxSegments, "blkif segment index out of range")
        return withUnsafeBytes(of: seg) {
            $0.loadUnaligned(fromByteOffset: index * MemoryLayout<vireo_blkif_request_segment>.stride,
                             as: vireo_blkif_request_segment.self)
        }
    }

    @inlinable
    public mutating func setSegment(_ index: Int, gref: UInt32, firstSector: UInt8, lastSector: UInt8) {
        precondition(index >= 0 && index < Self.maxSegments, "blkif segment index out of range")
        var segment = vireo_blkif_request_segment()
        segment.gref = gref
        segment.first_sect = firstSector
        segment.last_sect = lastSector
        withUnsafeMutableBytes(of: &seg) {
            $0.storeBytes(of: segment, toByteOffset: index * MemoryLayout<vireo_blkif_request_segment>.stride,
                          as: vireo_blkif_request_segment.self)
        }
    }
}
