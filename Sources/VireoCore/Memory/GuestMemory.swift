import Glibc
import Synchronization
import VireoABI
import VireoLinux

/// Why a guest memory access was refused.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Some byte of the range is not guest memory (outside RAM, in a hole).
    case outOfRange(GuestPhysicalAddress, count: Int)
    /// address + count wraps around the address space.
    case overflow(GuestPhysicalAddress, count: Int)
    /// An atomic access not aligned to its width.
    case unaligned(GuestPhysicalAddress, width: Int)
    /// A size or index given when creating or arranging memory is impossible.
    case invalidLayout(String)
    /// The operating system refused (memfd_create, ftruncate, mmap).
    case system(call: String, errno: Int32)

    /// The error a hypercall reports for this failure.
    public var xenError: XenError {
        switch self {
        case .outOfRange, .overflow, .unaligned: .EFAULT
        case .invalidLayout: .EINVAL
        case .system: .ENOMEM
        }
    }

    public var description: String {
        switch self {
        case .outOfRange(let gpa, let count): "\(count) bytes at \(gpa) are not guest memory"
        case .overflow(let gpa, let count): "\(count) bytes at \(gpa) wrap around the address space"
        case .unaligned(let gpa, let width): "\(width)-byte atomic access at \(gpa) is not aligned"
        case .invalidLayout(let why): "invalid guest memory layout: \(why)"
        case .system(let call, let errno): "\(call) failed: \(String(cString: strerror(errno)))"
        }
    }
}

/// A guest's physical memory, backed by one memfd mapped MAP_SHARED (so an engine can hand
/// it to KVM and a backend in another process can map the same pages).
///
/// The memfd holds the guest's RAM followed by a pool of special frames (shared_info, grant
/// table frames) that belong to the hypervisor and appear in the guest's physical address
/// space only where the guest asks for them (`XENMEM_add_to_physmap`). RAM occupies guest
/// addresses [0, ramSize); a placed special frame hides the RAM page at its address.
///
/// Every access goes through ``translate(_:count:)``, which rejects overflow and any byte that
/// is not guest memory; callers get copies, checked ``SharedRegion``s, or scoped buffers,
/// never a raw host pointer.
public final class GuestMemory: @unchecked Sendable {
    public static let pageSize = guestPageSize

    /// Bytes of RAM, from guest-physical address 0.
    public let ramSize: UInt64
    /// Frames in the special pool.
    public let specialFrameCount: Int

    private let fd: Int32
    private let base: UnsafeMutableRawPointer
    private let backingSize: Int

    private struct Physmap {
        /// Guest frame -> special frame index, for placed special frames.
        var placed: [UInt64: Int] = [:]
        /// Special frame index -> guest frame where it is placed.
        var placement: [Int: UInt64] = [:]
    }
    private let physmap = Mutex(Physmap())
    /// One bit per RAM frame, set while a special frame hides it: RAM accesses check it with
    /// an atomic load and take the physmap lock only for hidden frames.
    private let hiddenRAM: SharedRegion
    private let hiddenRAMStorage: UnsafeMutableRawPointer
    /// Whether any special frame is placed outside RAM (in a hole above it).
    private let anyPlacedOutsideRAM = Atomic<Bool>(false)

    /// Creates zeroed guest memory. `ramBytes` must be a positive multiple of the page size.
    public init(ramBytes: UInt64, specialFrames: Int = 0, name: String = "vireo-guest") throws(GuestMemoryError) {
        let page = UInt64(Self.pageSize)
        guard ramBytes > 0, ramBytes % page == 0 else {
            throw .invalidLayout("RAM size \(ramBytes) is not a positive multiple of \(page)")
        }
        guard ramBytes <= 1 << 40 else { throw .invalidLayout("RAM size \(ramBytes) exceeds 1 TiB") }
        guard specialFrames >= 0, specialFrames <= 1 << 16 else {
            throw .invalidLayout("\(specialFrames) special frames (at most 65536)")
        }
        let total = Int(ramBytes) + specialFrames * Self.pageSize
        let fd = vireo_memfd_create(name, vireo_mfd_cloexec())
        guard fd >= 0 else { throw .system(call: "memfd_create", errno: errno) }
        guard ftruncate(fd, off_t(total)) == 0 else {
            let e = errno
            close(fd)
            throw .system(call: "ftruncate", errno: e)
        }
        let mapped = mmap(nil, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let e = errno
            close(fd)
            throw .system(call: "mmap", errno: e)
        }
        let words = (Int(ramBytes) / Self.pageSize + 63) / 64
        hiddenRAMStorage = UnsafeMutableRawPointer.allocate(byteCount: words * 8, alignment: 8)
        hiddenRAMStorage.initializeMemory(as: UInt64.self, repeating: 0, count: words)
        hiddenRAM = SharedRegion(base: hiddenRAMStorage, count: words * 8)
        self.fd = fd
        self.base = mapped
        self.backingSize = total
        self.ramSize = ramBytes
        self.specialFrameCount = specialFrames
    }

    deinit {
        hiddenRAMStorage.deallocate()
        munmap(base, backingSize)
        close(fd)
    }

    /// Guest frames of RAM.
    public var ramFrames: UInt64 { ramSize / UInt64(Self.pageSize) }

    // MARK: The one checked translation

    /// The host bytes behind `count` guest-physical bytes at `gpa`, as one checked region.
    /// Throws unless every byte is guest memory and the range is contiguous in the backing
    /// (a range crossing into or out of a placed special frame is refused: split it).
    public func translate(_ gpa: GuestPhysicalAddress, count: Int) throws(GuestMemoryError) -> SharedRegion {
        guard count >= 0 else { throw .outOfRange(gpa, count: count) }
        let (end, overflow) = gpa.rawValue.addingReportingOverflow(UInt64(count))
        guard !overflow else { throw .overflow(gpa, count: count) }
        let page = UInt64(Self.pageSize)
        let firstFrame = gpa.rawValue / page
        let lastFrame = count == 0 ? firstFrame : (end - 1) / page
        if end <= ramSize {
            var hidden = false
            var frame = firstFrame
            while frame <= lastFrame {
                if isHidden(frame) { hidden = true; break }
                frame += 1
            }
            if !hidden { return SharedRegion(base: base + Int(gpa.rawValue), count: count) }
        } else if !anyPlacedOutsideRAM.load(ordering: .acquiring) {
            throw .outOfRange(gpa, count: count)
        }
        enum Lookup { case ram, special(Int), straddles }
        let lookup: Lookup = physmap.withLock { map in
            if firstFrame == lastFrame { return map.placed[firstFrame].map(Lookup.special) ?? .ram }
            for frame in firstFrame...lastFrame where map.placed[frame] != nil { return .straddles }
            return .ram
        }
        switch lookup {
        case .special(let index):
            let offset = Int(ramSize) + index * Self.pageSize + Int(gpa.rawValue % page)
            return SharedRegion(base: base + offset, count: count)
        case .straddles:
            throw .outOfRange(gpa, count: count)  // a range may not run into or out of a special frame
        case .ram:
            guard end <= ramSize else { throw .outOfRange(gpa, count: count) }
            return SharedRegion(base: base + Int(gpa.rawValue), count: count)
        }
    }

    @inline(__always)
    private func isHidden(_ frame: UInt64) -> Bool {
        hiddenRAM.loadAcquire64(at: Int(frame / 64) * 8) & (1 << (frame % 64)) != 0
    }

    private func setHidden(_ frame: UInt64, _ hidden: Bool) {
        guard frame < ramFrames else { return }
        let bit: UInt64 = 1 << (frame % 64)
        if hidden {
            _ = hiddenRAM.fetchOr64(bit, at: Int(frame / 64) * 8)
        } else {
            _ = hiddenRAM.fetchAnd64(~bit, at: Int(frame / 64) * 8)
        }
    }

    /// The page at `frame`, as a region.
    public func region(frame: GuestFrame) throws(GuestMemoryError) -> SharedRegion {
        guard let gpa = frame.address else { throw .overflow(GuestPhysicalAddress(UInt64.max), count: Self.pageSize) }
        return try translate(gpa, count: Self.pageSize)
    }

    /// Whether `frame` is a RAM page the guest owns (not hidden by a placed special frame):
    /// the only pages a guest may grant.
    @inline(__always)
    public func isRAM(_ frame: GuestFrame) -> Bool {
        frame.rawValue < ramFrames && !isHidden(frame.rawValue)
    }

    /// The RAM page `frame` itself, whatever the guest has placed over it since: the page a
    /// grant pinned after ``isRAM(_:)`` said it was the guest's own (Xen keeps a reference on
    /// the page, not on the address).
    @inline(__always)
    func ramPage(_ frame: UInt64) -> SharedRegion {
        precondition(frame < ramFrames, "RAM frame beyond RAM")
        return SharedRegion(base: base + Int(frame) * Self.pageSize, count: Self.pageSize)
    }

    /// Whether `frame` is guest memory (RAM or a placed special frame).
    public func contains(frame: GuestFrame) -> Bool {
        (try? region(frame: frame)) != nil
    }

    // MARK: Copies

    /// Copies a value out of guest memory.
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at gpa: GuestPhysicalAddress) throws(GuestMemoryError) -> T {
        try translate(gpa, count: MemoryLayout<T>.size).load(T.self, at: 0)
    }

    /// Copies a value into guest memory.
    public func store<T: BitwiseCopyable>(_ value: T, at gpa: GuestPhysicalAddress) throws(GuestMemoryError) {
        try translate(gpa, count: MemoryLayout<T>.size).store(value, at: 0)
    }

    /// Copies bytes out of guest memory, page by page, so a range may span special frames.
    /// Either every byte is copied or the call throws.
    public func read(at gpa: GuestPhysicalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        try forEachPage(gpa, count: buffer.count) { (region: SharedRegion, done: Int) throws(GuestMemoryError) in
            region.copyBytes(from: 0, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + region.count)]))
        }
    }

    /// Copies bytes into guest memory, page by page. All ranges are checked before any byte is
    /// written, so a refused write changes nothing.
    public func write(at gpa: GuestPhysicalAddress, from buffer: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        _ = try pieces(gpa, count: buffer.count)
        try forEachPage(gpa, count: buffer.count) { (region: SharedRegion, done: Int) throws(GuestMemoryError) in
            region.copyBytes(from: UnsafeRawBufferPointer(rebasing: buffer[done..<(done + region.count)]), to: 0)
        }
    }

    /// Convenience: `count` bytes at `gpa` as an array.
    public func bytes(at gpa: GuestPhysicalAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(max(count, 0))
        try forEachPage(gpa, count: count) { (region: SharedRegion, _: Int) throws(GuestMemoryError) in
            region.withUnsafeMutableBytes(offset: 0, count: region.count) { out.append(contentsOf: $0) }
        }
        return out
    }

    /// Convenience: writes `bytes` at `gpa`.
    public func write(_ bytes: [UInt8], at gpa: GuestPhysicalAddress) throws(GuestMemoryError) {
        _ = try pieces(gpa, count: bytes.count)
        try forEachPage(gpa, count: bytes.count) { (region: SharedRegion, done: Int) throws(GuestMemoryError) in
            region.withUnsafeMutableBytes(offset: 0, count: region.count) {
                $0.copyBytes(from: bytes[done..<(done + region.count)])
            }
        }
    }

    /// Fills `count` bytes at `gpa` with `byte`, page by page; checked whole before any write.
    public func fill(_ byte: UInt8, at gpa: GuestPhysicalAddress, count: Int) throws(GuestMemoryError) {
        _ = try pieces(gpa, count: count)
        try forEachPage(gpa, count: count) { (region: SharedRegion, _: Int) throws(GuestMemoryError) in
            region.fill(byte, at: 0, count: region.count)
        }
    }

    /// The page-bounded pieces of a range, each translated: the range is all guest memory or
    /// this throws.
    private func pieces(_ gpa: GuestPhysicalAddress, count: Int) throws(GuestMemoryError) -> [SharedRegion] {
        var result: [SharedRegion] = []
        try forEachPage(gpa, count: count) { (region: SharedRegion, _: Int) throws(GuestMemoryError) in result.append(region) }
        return result
    }

    private func forEachPage(
        _ gpa: GuestPhysicalAddress, count: Int, _ body: (SharedRegion, Int) throws(GuestMemoryError) -> Void
    ) throws(GuestMemoryError) {
        guard count >= 0 else { throw .outOfRange(gpa, count: count) }
        guard !gpa.rawValue.addingReportingOverflow(UInt64(count)).overflow else { throw .overflow(gpa, count: count) }
        var done = 0
        while done < count {
            let address = GuestPhysicalAddress(gpa.rawValue + UInt64(done))
            let chunk = min(count - done, Self.pageSize - address.offsetInPage)
            try body(try translate(address, count: chunk), done)
            done += chunk
        }
    }

    // MARK: Atomics on guest words (grant flags, ring indices, event bits)

    private func aligned(_ gpa: GuestPhysicalAddress, _ width: Int) throws(GuestMemoryError) -> SharedRegion {
        guard gpa.rawValue % UInt64(width) == 0 else { throw .unaligned(gpa, width: width) }
        return try translate(gpa, count: width)
    }

    public func loadAcquire32(at gpa: GuestPhysicalAddress) throws(GuestMemoryError) -> UInt32 {
        try aligned(gpa, 4).loadAcquire32(at: 0)
    }
    public func storeRelease32(_ value: UInt32, at gpa: GuestPhysicalAddress) throws(GuestMemoryError) {
        try aligned(gpa, 4).storeRelease32(value, at: 0)
    }
    public func compareExchange16(at gpa: GuestPhysicalAddress, expected: UInt16, desired: UInt16) throws(GuestMemoryError) -> UInt16 {
        try aligned(gpa, 2).compareExchange16(at: 0, expected: expected, desired: desired)
    }
    public func compareExchange32(at gpa: GuestPhysicalAddress, expected: UInt32, desired: UInt32) throws(GuestMemoryError) -> UInt32 {
        try aligned(gpa, 4).compareExchange32(at: 0, expected: expected, desired: desired)
    }
    public func fetchOr64(_ bits: UInt64, at gpa: GuestPhysicalAddress) throws(GuestMemoryError) -> UInt64 {
        try aligned(gpa, 8).fetchOr64(bits, at: 0)
    }
    public func fetchAnd64(_ bits: UInt64, at gpa: GuestPhysicalAddress) throws(GuestMemoryError) -> UInt64 {
        try aligned(gpa, 8).fetchAnd64(bits, at: 0)
    }

    // MARK: Special frames

    /// A special frame's page, whether or not the guest has placed it (the host writes
    /// shared_info and grant entries through this).
    public func specialRegion(_ index: Int) throws(GuestMemoryError) -> SharedRegion {
        guard index >= 0, index < specialFrameCount else {
            throw .invalidLayout("special frame \(index) of \(specialFrameCount)")
        }
        return SharedRegion(base: base + Int(ramSize) + index * Self.pageSize, count: Self.pageSize)
    }

    /// ``specialRegion(_:)`` for an index the caller has checked (a grant table's own frames).
    @inline(__always)
    func specialPage(_ index: Int) -> SharedRegion {
        precondition(index >= 0 && index < specialFrameCount, "special frame beyond the pool")
        return SharedRegion(base: base + Int(ramSize) + index * Self.pageSize, count: Self.pageSize)
    }

    /// Makes special frame `index` appear at guest frame `frame` (XENMEM_add_to_physmap). The
    /// frame moves if it was placed elsewhere; whatever was at `frame` is hidden. Only frames
    /// inside the guest-physical space Vireo models (below 2^52) are accepted.
    public func placeSpecialFrame(_ index: Int, at frame: GuestFrame) throws(GuestMemoryError) {
        guard index >= 0, index < specialFrameCount else {
            throw .invalidLayout("special frame \(index) of \(specialFrameCount)")
        }
        guard frame.rawValue < 1 << 40 else { throw .invalidLayout("guest frame \(frame) beyond the physical address width") }
        physmap.withLock { map in
            if let old = map.placement[index] {
                map.placed[old] = nil
                setHidden(old, false)
            }
            if let displaced = map.placed[frame.rawValue] { map.placement[displaced] = nil }
            map.placed[frame.rawValue] = index
            map.placement[index] = frame.rawValue
            setHidden(frame.rawValue, true)
            if frame.rawValue >= ramFrames { anyPlacedOutsideRAM.store(true, ordering: .releasing) }
        }
    }

    /// Where special frame `index` is placed, if anywhere.
    public func placement(ofSpecialFrame index: Int) -> GuestFrame? {
        physmap.withLock { map in map.placement[index].map { GuestFrame($0) } }
    }

    /// Removes a special frame from the guest's view (the RAM page under it shows again).
    public func unplaceSpecialFrame(_ index: Int) {
        physmap.withLock { map in
            if let old = map.placement.removeValue(forKey: index) {
                map.placed[old] = nil
                setHidden(old, false)
            }
        }
    }

    // MARK: For engines and backends in this package

    /// The memfd, for mapping the same pages into KVM or another process.
    package var fileDescriptor: Int32 { fd }
    /// The host address of guest-physical 0, for KVM memory slots.
    package var hostBase: UnsafeMutableRawPointer { base }
}
