import VireoABI
import VireoCore

/// How a vCPU translates addresses, from its control registers.
public enum PagingMode: Sendable, Equatable {
    /// CR0.PG clear: virtual = physical (the PVH entry state).
    case off
    /// 32-bit PAE paging: 3 levels from CR3 (bits 5-31).
    case pae(cr3: UInt64)
    /// Long mode: 4 levels from CR3 (bits 12-51).
    case long(cr3: UInt64)

    static let cr0PG: UInt64 = 1 << 31
    static let cr4PAE: UInt64 = 1 << 5
    static let eferLMA: UInt64 = 1 << 10

    /// The mode the registers describe. 32-bit paging without PAE is not something a PVH
    /// guest uses; it reads as PAE-less and is refused by translation.
    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) {
        if cr0 & Self.cr0PG == 0 {
            self = .off
        } else if efer & Self.eferLMA != 0 {
            self = .long(cr3: cr3)
        } else {
            self = .pae(cr3: cr4 & Self.cr4PAE != 0 ? cr3 : UInt64.max)
        }
    }
}

/// A guest's virtual address space as its page tables describe it: hypercall pointer arguments
/// are guest-virtual, so the host walks the tables (read from guest memory through the one
/// checked translation) and checks presence and write permission page by page. Any failure is
/// `-EFAULT` for the guest, never a host fault.
public struct GuestAddressSpace: Sendable {
    public let memory: GuestMemory
    public let mode: PagingMode

    public init(memory: GuestMemory, mode: PagingMode) {
        self.memory = memory
        self.mode = mode
    }

    static let present: UInt64 = 1
    static let writable: UInt64 = 1 << 1
    static let largePage: UInt64 = 1 << 7
    static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    /// The guest-physical address behind `address`, checking that the page is present (and
    /// writable at every level, for a write).
    public func translate(_ address: GuestVirtualAddress, write: Bool) throws(XenError) -> GuestPhysicalAddress {
        let va = address.rawValue
        switch mode {
        case .off:
            return GuestPhysicalAddress(va & 0xFFFF_FFFF)
        case .long(let cr3):
            // Canonical: bits 63..47 all equal.
            let top = va >> 47
            guard top == 0 || top == 0x1_FFFF else { throw .EFAULT }
            return try walk(table: cr3 & Self.addressMask, va: va, levels: [39, 30, 21, 12], write: write)
        case .pae(let cr3):
            guard cr3 != UInt64.max, va <= 0xFFFF_FFFF else { throw .EFAULT }
            // The 4 PDPTEs: only P is meaningful there.
            let pdpte = try entry(at: (cr3 & 0xFFFF_FFE0) + ((va >> 30) & 3) * 8)
            guard pdpte & Self.present != 0 else { throw .EFAULT }
            return try walk(table: pdpte & Self.addressMask, va: va, levels: [21, 12], write: write)
        }
    }

    private func entry(at gpa: UInt64) throws(XenError) -> UInt64 {
        do { return try memory.load(UInt64.self, at: GuestPhysicalAddress(gpa)) } catch { throw .EFAULT }
    }

    private func walk(table: UInt64, va: UInt64, levels: [UInt64], write: Bool) throws(XenError) -> GuestPhysicalAddress {
        var table = table
        for (depth, shift) in levels.enumerated() {
            let e = try entry(at: table + ((va >> shift) & 0x1FF) * 8)
            guard e & Self.present != 0 else { throw .EFAULT }
            guard !write || e & Self.writable != 0 else { throw .EFAULT }
            let isLeaf = shift == 12 || (e & Self.largePage != 0 && (shift == 21 || shift == 30))
            if isLeaf {
                let pageMask: UInt64 = (1 << shift) - 1
                return GuestPhysicalAddress((e & Self.addressMask & ~pageMask) | (va & pageMask))
            }
            _ = depth
            table = e & Self.addressMask
        }
        throw .EFAULT
    }

    // MARK: Copies through the page tables

    /// Copies `count` bytes from guest-virtual `address`, page by page.
    public func read(_ address: GuestVirtualAddress, count: Int) throws(XenError) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(max(count, 0))
        try forEachPage(address, count: count, write: false) { (gpa: GuestPhysicalAddress, chunk: Int, _: Int) throws(XenError) in
            do { out += try memory.bytes(at: gpa, count: chunk) } catch { throw .EFAULT }
        }
        return out
    }

    /// Copies `bytes` to guest-virtual `address`, page by page. Every page is translated (and
    /// checked writable) before any byte is written.
    public func write(_ bytes: [UInt8], to address: GuestVirtualAddress) throws(XenError) {
        var pieces: [(GuestPhysicalAddress, Int, Int)] = []
        try forEachPage(address, count: bytes.count, write: true) { (gpa: GuestPhysicalAddress, chunk: Int, done: Int) throws(XenError) in
            pieces.append((gpa, chunk, done))
        }
        for (gpa, chunk, done) in pieces {
            do { try memory.write(Array(bytes[done..<(done + chunk)]), at: gpa) } catch { throw .EFAULT }
        }
    }

    /// A value copied from guest-virtual memory.
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at address: GuestVirtualAddress) throws(XenError) -> T {
        let bytes = try read(address, count: MemoryLayout<T>.size)
        return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }

    /// A value copied to guest-virtual memory.
    public func store<T: BitwiseCopyable>(_ value: T, at address: GuestVirtualAddress) throws(XenError) {
        let bytes = withUnsafeBytes(of: value) { Array($0) }
        try write(bytes, to: address)
    }

    /// An array of `count` values at `address`; `count` is bounded by the caller.
    public func loadArray<T: BitwiseCopyable>(_ type: T.Type, at address: GuestVirtualAddress, count: Int) throws(XenError) -> [T] {
        let size = MemoryLayout<T>.stride
        guard count >= 0, count <= Int.max / max(size, 1) else { throw .EINVAL }
        let bytes = try read(address, count: count * size)
        return (0..<count).map { i in bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: i * size, as: T.self) } }
    }

    private func forEachPage(
        _ address: GuestVirtualAddress, count: Int, write: Bool,
        _ body: (GuestPhysicalAddress, Int, Int) throws(XenError) -> Void
    ) throws(XenError) {
        guard count >= 0 else { throw .EINVAL }
        guard !address.rawValue.addingReportingOverflow(UInt64(count)).overflow else { throw .EFAULT }
        var done = 0
        while done < count {
            let va = address.rawValue + UInt64(done)
            let chunk = min(count - done, guestPageSize - Int(va & UInt64(guestPageSize - 1)))
            try body(try translate(GuestVirtualAddress(va), write: write), chunk, done)
            done += chunk
        }
    }
}
