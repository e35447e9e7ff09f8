import VireoAtomics

/// A window of memory shared with a guest: a ring page, a grant-mapped page, shared_info.
///
/// The host pointer stays inside: callers address the region by byte offset, and every
/// accessor checks the offset and width against the region's size (and alignment for atomic
/// operations), trapping on a programming error. Values a guest controls must be validated by
/// the caller before they become offsets; the checks here are the last line, not the first.
///
/// A region does not keep its memory alive: whoever hands one out (``GuestMemory``, a grant
/// mapping) must outlive it, which the types that own regions arrange.
public struct SharedRegion: @unchecked Sendable {
    @usableFromInline let base: UnsafeMutableRawPointer
    public let count: Int

    @inlinable
    init(base: UnsafeMutableRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    /// A region over memory the caller allocated (host-only test doubles, the host's own
    /// shared_info). The caller keeps the memory alive for as long as the region is used.
    public static func unsafe(_ base: UnsafeMutableRawPointer, count: Int) -> SharedRegion {
        SharedRegion(base: base, count: count)
    }

    /// A sub-window of this region.
    @inlinable
    public func slice(offset: Int, count: Int) -> SharedRegion {
        precondition(offset >= 0 && count >= 0 && offset <= self.count - count, "slice outside the shared region")
        return SharedRegion(base: base + offset, count: count)
    }

    @inlinable @inline(__always)
    func check(_ offset: Int, _ width: Int) {
        precondition(offset >= 0 && offset <= count - width, "access outside the shared region")
    }

    @inlinable @inline(__always)
    func checkAligned(_ offset: Int, _ width: Int) {
        check(offset, width)
        precondition(Int(bitPattern: base + offset) & (width - 1) == 0, "unaligned atomic access")
    }

    // MARK: Plain copies (a guest may change the bytes at any time: copy once, then validate)

    /// Copies a value out of the region.
    @inlinable @inline(__always)
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at offset: Int) -> T {
        check(offset, MemoryLayout<T>.size)
        return (base + offset).loadUnaligned(as: T.self)
    }

    /// Copies a value into the region.
    @inlinable @inline(__always)
    public func store<T: BitwiseCopyable>(_ value: T, at offset: Int) {
        check(offset, MemoryLayout<T>.size)
        (base + offset).storeBytes(of: value, as: T.self)
    }

    /// Copies `buffer.count` bytes out of the region.
    @inlinable
    public func copyBytes(from offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        guard buffer.count > 0 else { return }
        check(offset, buffer.count)
        buffer.baseAddress!.copyMemory(from: base + offset, byteCount: buffer.count)
    }

    /// Copies `buffer` into the region.
    @inlinable
    public func copyBytes(from buffer: UnsafeRawBufferPointer, to offset: Int) {
        guard buffer.count > 0 else { return }
        check(offset, buffer.count)
        (base + offset).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
    }

    /// Copies between two regions (grant copy, page to page).
    @inlinable
    public func copyBytes(from source: SharedRegion, offset sourceOffset: Int, to offset: Int, count: Int) {
        guard count > 0 else { return }
        source.check(sourceOffset, count)
        check(offset, count)
        (base + offset).copyMemory(from: source.base + sourceOffset, byteCount: count)
    }

    /// Fills a range with a byte.
    @inlinable
    public func fill(_ byte: UInt8, at offset: Int, count: Int) {
        guard count > 0 else { return }
        check(offset, count)
        (base + offset).initializeMemory(as: UInt8.self, repeating: byte, count: count)
    }

    /// Scoped access to the bytes, for bulk I/O (a backend reading a file straight into a
    /// granted page). The pointer must not escape `body`.
    @inlinable
    public func withUnsafeMutableBytes<R, E: Error>(
        offset: Int, count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        check(offset, count)
        return try body(UnsafeMutableRawBufferPointer(start: base + offset, count: count))
    }

    /// Scoped read-only access to the bytes, for bulk I/O (a backend writing a granted page
    /// straight to a file). The pointer must not escape `body`.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(
        offset: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        check(offset, count)
        return try body(UnsafeRawBufferPointer(start: base + offset, count: count))
    }

    /// True when both regions are the same bytes (used to detect aliasing in grant copy).
    public func overlaps(_ other: SharedRegion) -> Bool {
        let a = UInt(bitPattern: base), b = UInt(bitPattern: other.base)
        return a < b + UInt(other.count) && b < a + UInt(count)
    }
}

// MARK: Atomics on shared words (ring indices, grant flags, event bits)

extension SharedRegion {
    @inlinable @inline(__always)
    public func loadAcquire32(at offset: Int) -> UInt32 {
        checkAligned(offset, 4); return vireo_load_acquire_u32(base + offset)
    }
    @inlinable @inline(__always)
    public func loadRelaxed32(at offset: Int) -> UInt32 {
        checkAligned(offset, 4); return vireo_load_relaxed_u32(base + offset)
    }
    @inlinable @inline(__always)
    public func storeRelease32(_ value: UInt32, at offset: Int) {
        checkAligned(offset, 4); vireo_store_release_u32(base + offset, value)
    }
    @inlinable @inline(__always)
    public func storeRelaxed32(_ value: UInt32, at offset: Int) {
        checkAligned(offset, 4); vireo_store_relaxed_u32(base + offset, value)
    }
    @inlinable @inline(__always)
    public func loadAcquire16(at offset: Int) -> UInt16 {
        checkAligned(offset, 2); return vireo_load_acquire_u16(base + offset)
    }
    @inlinable @inline(__always)
    public func loadAcquire64(at offset: Int) -> UInt64 {
        checkAligned(offset, 8); return vireo_load_acquire_u64(base + offset)
    }
    @inlinable @inline(__always)
    public func loadAcquire8(at offset: Int) -> UInt8 {
        check(offset, 1); return vireo_load_acquire_u8(base + offset)
    }
    @inlinable @inline(__always)
    public func storeRelease8(_ value: UInt8, at offset: Int) {
        check(offset, 1); vireo_store_release_u8(base + offset, value)
    }
    @inlinable @inline(__always)
    public func storeRelease64(_ value: UInt64, at offset: Int) {
        checkAligned(offset, 8); vireo_store_release_u64(base + offset, value)
    }

    /// Compare-and-swap; returns the value seen (the swap happened iff it equals `expected`).
    @inlinable @inline(__always)
    public func compareExchange16(at offset: Int, expected: UInt16, desired: UInt16) -> UInt16 {
        checkAligned(offset, 2); return vireo_compare_exchange_u16(base + offset, expected, desired)
    }
    @inlinable @inline(__always)
    public func compareExchange32(at offset: Int, expected: UInt32, desired: UInt32) -> UInt32 {
        checkAligned(offset, 4); return vireo_compare_exchange_u32(base + offset, expected, desired)
    }
    @inlinable @inline(__always)
    public func compareExchange64(at offset: Int, expected: UInt64, desired: UInt64) -> UInt64 {
        checkAligned(offset, 8); return vireo_compare_exchange_u64(base + offset, expected, desired)
    }

    @inlinable @inline(__always)
    public func exchange8(_ value: UInt8, at offset: Int) -> UInt8 {
        check(offset, 1); return vireo_exchange_u8(base + offset, value)
    }
    @inlinable @inline(__always)
    public func exchange64(_ value: UInt64, at offset: Int) -> UInt64 {
        checkAligned(offset, 8); return vireo_exchange_u64(base + offset, value)
    }
    @inlinable @inline(__always)
    public func fetchOr64(_ bits: UInt64, at offset: Int) -> UInt64 {
        checkAligned(offset, 8); return vireo_fetch_or_u64(base + offset, bits)
    }
    @inlinable @inline(__always)
    public func fetchAnd64(_ bits: UInt64, at offset: Int) -> UInt64 {
        checkAligned(offset, 8); return vireo_fetch_and_u64(base + offset, bits)
    }
    @inlinable @inline(__always)
    public func fetchOr16(_ bits: UInt16, at offset: Int) -> UInt16 {
        checkAligned(offset, 2); return vireo_fetch_or_u16(base + offset, bits)
    }
    @inlinable @inline(__always)
    public func fetchAnd16(_ bits: UInt16, at offset: Int) -> UInt16 {
        checkAligned(offset, 2); return vireo_fetch_and_u16(base + offset, bits)
    }

    /// Atomically sets bit `bit` of the 64-bit word at `offset`; returns whether it was set.
    @inlinable @inline(__always)
    public func testAndSetBit(_ bit: Int, inWordAt offset: Int) -> Bool {
        fetchOr64(1 << UInt64(bit), at: offset) & (1 << UInt64(bit)) != 0
    }
    /// Atomically clears bit `bit` of the 64-bit word at `offset`; returns whether it was set.
    @inlinable @inline(__always)
    public func testAndClearBit(_ bit: Int, inWordAt offset: Int) -> Bool {
        fetchAnd64(~(1 << UInt64(bit)), at: offset) & (1 << UInt64(bit)) != 0
    }
    @inlinable @inline(__always)
    public func testBit(_ bit: Int, inWordAt offset: Int) -> Bool {
        loadAcquire64(at: offset) & (1 << UInt64(bit)) != 0
    }
}

/// Memory barriers, named as Xen's ring and event code names them.
public enum Barrier {
    /// Full barrier (mb): no load or store crosses it.
    @inlinable @inline(__always) public static func full() { vireo_fence_full() }
    /// Read barrier (rmb): later loads stay after earlier loads.
    @inlinable @inline(__always) public static func read() { vireo_fence_acquire() }
    /// Write barrier (wmb): earlier stores stay before later stores.
    @inlinable @inline(__always) public static func write() { vireo_fence_release() }
    /// A hint inside spin-wait loops.
    @inlinable @inline(__always) public static func relax() { vireo_cpu_relax() }
}
