import VireoABI
import VireoCore

/// A direct-mapped TLB of 4 KiB linear pages: for reads, writes and instruction fetches
/// separately, so one compare answers "may I do this here?". An entry holds the page's tag
/// and the addend that turns a linear address into a host address. A write entry exists only
/// once the page's dirty bit is set, an execute entry only for executable pages.
final class TLB {
    static let entries = 256
    static let invalid: UInt64 = 1  // never a page-aligned address
    /// The six arrays in one allocation, in this order, so that native code (see
    /// SoftCPUNative.swift) reaches any of them from one base pointer at fixed offsets.
    let base = UnsafeMutablePointer<UInt64>.allocate(capacity: 6 * entries)
    var readTag: UnsafeMutablePointer<UInt64> { base }
    var writeTag: UnsafeMutablePointer<UInt64> { base + Self.entries }
    var execTag: UnsafeMutablePointer<UInt64> { base + 2 * Self.entries }
    var readAddend: UnsafeMutablePointer<UInt64> { base + 3 * Self.entries }
    var writeAddend: UnsafeMutablePointer<UInt64> { base + 4 * Self.entries }
    var execAddend: UnsafeMutablePointer<UInt64> { base + 5 * Self.entries }
    /// Byte offsets of the arrays from ``base``.
    static let readTagOffset = 0, writeTagOffset = 8 * entries, readAddendOffset = 24 * entries, writeAddendOffset = 32 * entries

    init() {
        base.initialize(repeating: Self.invalid, count: 6 * Self.entries)
    }

    deinit {
        base.deallocate()
    }

    func flush() {
        readTag.update(repeating: Self.invalid, count: Self.entries)
        writeTag.update(repeating: Self.invalid, count: Self.entries)
        execTag.update(repeating: Self.invalid, count: Self.entries)
    }
}

enum Access { case read, write, execute }

enum PTE {
    static let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, accessed: UInt64 = 0x20
    static let dirty: UInt64 = 0x40, large: UInt64 = 0x80, noExecute: UInt64 = 1 << 63
    static let address: UInt64 = 0x000F_FFFF_FFFF_F000
}

extension SoftCPU {
    public func flushTLB() {
        tlb.flush()
        codePage = TLB.invalid
        codeFrameAddress = DecodeCache.invalid
    }

    @inline(__always) static func tlbIndex(_ la: UInt64) -> Int { Int(truncatingIfNeeded: (la >> 12) & UInt64(TLB.entries - 1)) }

    @inline(__always) func pointer(_ la: UInt64, _ addend: UnsafeMutablePointer<UInt64>, _ i: Int) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: la &+ addend[i])).unsafelyUnwrapped
    }

    /// The host address of linear `la` for reading (the page is translated on a TLB miss).
    @inline(__always) func readPointer(_ la: UInt64) throws(CPUFault) -> UnsafeMutableRawPointer {
        let i = Self.tlbIndex(la)
        if tlb.readTag[i] == la & ~0xFFF { return pointer(la, tlb.readAddend, i) }
        try fill(la, .read)
        return pointer(la, tlb.readAddend, i)
    }

    @inline(__always) func writePointer(_ la: UInt64) throws(CPUFault) -> UnsafeMutableRawPointer {
        let i = Self.tlbIndex(la)
        if tlb.writeTag[i] == la & ~0xFFF { return pointer(la, tlb.writeAddend, i) }
        try fill(la, .write)
        return pointer(la, tlb.writeAddend, i)
    }

    /// The host address of the code at `la` (checked executable).
    @inline(__always) func codePointer(_ la: UInt64) throws(CPUFault) -> UnsafeMutableRawPointer {
        let i = Self.tlbIndex(la)
        if tlb.execTag[i] == la & ~0xFFF { return pointer(la, tlb.execAddend, i) }
        try fill(la, .execute)
        return pointer(la, tlb.execAddend, i)
    }

    /// One code byte for diagnostics, through the translation but without touching the TLB's
    /// fault state (a failure is returned, not raised).
    func peekCode(_ la: UInt64) throws(CPUFault) -> UInt8 {
        try codePointer(la).load(as: UInt8.self)
    }

    // MARK: Sized accesses

    @inline(__always) func read(_ la: UInt64, _ size: Int) throws(CPUFault) -> UInt64 {
        if la & 0xFFF <= UInt64(4096 &- size) {
            let p = try readPointer(la)
            switch size {
            case 1: return UInt64(p.load(as: UInt8.self))
            case 2: return UInt64(p.loadUnaligned(as: UInt16.self))
            case 4: return UInt64(p.loadUnaligned(as: UInt32.self))
            default: return p.loadUnaligned(as: UInt64.self)
            }
        }
        return try readSplit(la, size)
    }

    func readSplit(_ la: UInt64, _ size: Int) throws(CPUFault) -> UInt64 {
        _ = try readPointer(la)
        _ = try readPointer(la &+ UInt64(size &- 1))
        var v: UInt64 = 0
        for i in 0..<size {
            v |= UInt64(try readPointer(la &+ UInt64(i)).load(as: UInt8.self)) << UInt64(8 * i)
        }
        return v
    }

    @inline(__always) func write(_ la: UInt64, _ size: Int, _ value: UInt64) throws(CPUFault) {
        if la & 0xFFF <= UInt64(4096 &- size) {
            let p = try writePointer(la)
            switch size {
            case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
            case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
            case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
            default: p.storeBytes(of: value, as: UInt64.self)
            }
            return
        }
        try writeSplit(la, size, value)
    }

    /// A write across two pages: both are translated (and may fault) before any byte lands.
    func writeSplit(_ la: UInt64, _ size: Int, _ value: UInt64) throws(CPUFault) {
        _ = try writePointer(la)
        _ = try writePointer(la &+ UInt64(size &- 1))
        for i in 0..<size {
            try writePointer(la &+ UInt64(i)).storeBytes(of: UInt8(truncatingIfNeeded: value >> UInt64(8 * i)), as: UInt8.self)
        }
    }

    /// Checks that `count` bytes at `la` may be written, without writing (for instructions
    /// that must not fault halfway, such as an interrupt frame).
    func probeWrite(_ la: UInt64, _ count: Int) throws(CPUFault) {
        _ = try writePointer(la)
        _ = try writePointer(la &+ UInt64(count &- 1))
    }

    // MARK: The page walk

    /// Translates `la` for `access`, setting accessed and dirty bits as the hardware does, and
    /// installs the TLB entry. Raises #PF (CR2 = `la`, Intel's error code) or #GP for a
    /// non-canonical address.
    func fill(_ la: UInt64, _ access: Access) throws(CPUFault) {
        let page = la & ~0xFFF
        let i = Self.tlbIndex(la)
        let gpaPage: UInt64
        var writable = true
        if cr0 & CR0.PG == 0 {
            gpaPage = page & 0xFFFF_F000
        } else {
            let (gpa, w) = try walk(la, access)
            gpaPage = gpa
            writable = w
        }
        let host = hostPage(gpaPage, write: access == .write)
        let addend = UInt64(UInt(bitPattern: host)) &- page
        switch access {
        case .read:
            tlb.readTag[i] = page
            tlb.readAddend[i] = addend
        case .execute:
            tlb.execTag[i] = page
            tlb.execAddend[i] = addend
        case .write:
            // A page with cached code gets no write entry (see ``markCode(frame:)``): this
            // write drops the page's decoded instructions first.
            if host == memory.hostBase + Int(gpaPage) { noteWrite(frame: gpaPage >> 12) }
            if writable {
                tlb.writeTag[i] = page
                tlb.writeAddend[i] = addend
            }
            if host != sinkPage {
                tlb.readTag[i] = page
                tlb.readAddend[i] = addend
            }
        }
    }

    /// The host page behind guest-physical page `gpaPage`: RAM, a placed special frame, or
    /// (for neither) the floating page for reads and the sink page for writes.
    func hostPage(_ gpaPage: UInt64, write: Bool) -> UnsafeMutableRawPointer {
        let frame = gpaPage >> 12
        if frame < memory.ramFrames, memory.isRAM(GuestFrame(frame)) { return memory.hostBase + Int(gpaPage) }
        if let region = try? memory.translate(GuestPhysicalAddress(gpaPage), count: 4096) {
            // The TLB keeps this pointer until the next flush: placements flush (physmapChanged).
            return region.withUnsafeMutableBytes(offset: 0, count: 4096) { $0.baseAddress.unsafelyUnwrapped }
        }
        return write ? sinkPage : floatingPage
    }

    /// Reads a paging-structure entry; a table outside guest memory reads as not present.
    private func entry(_ gpa: UInt64) -> (UInt64, SharedRegion?) {
        guard let region = try? memory.translate(GuestPhysicalAddress(gpa), count: 8) else { return (0, nil) }
        return (region.load(UInt64.self, at: 0), region)
    }

    /// The 4-level walk. Returns the guest-physical page and whether a write may go there
    /// without another walk (writable and dirty).
    private func walk(_ la: UInt64, _ access: Access) throws(CPUFault) -> (UInt64, Bool) {
        let top = la >> 47
        guard top == 0 || top == 0x1_FFFF else { throw .gp() }
        let user = cpl == 3
        let nxe = efer & EFER.NXE != 0
        var code: UInt32 = (access == .write ? 2 : 0) | (user ? 4 : 0) | (access == .execute && nxe ? 16 : 0)
        var table = cr3 & PTE.address
        var rw = true, us = true, nx = false
        var shift: UInt64 = 39
        while true {
            let (e, region) = entry(table + ((la >> shift) & 0x1FF) * 8)
            guard e & PTE.present != 0 else {
                cr2 = la
                throw CPUFault(14, code)
            }
            if !nxe && e & PTE.noExecute != 0 {
                cr2 = la
                throw CPUFault(14, code | 1 | 8)
            }
            rw = rw && e & PTE.writable != 0
            us = us && e & PTE.user != 0
            nx = nx || (nxe && e & PTE.noExecute != 0)
            let leaf = shift == 12 || (e & PTE.large != 0 && (shift == 21 || shift == 30))
            if leaf {
                code |= 1
                if access == .write && !rw && (user || cr0 & CR0.WP != 0) { cr2 = la; throw CPUFault(14, code) }
                if user && !us { cr2 = la; throw CPUFault(14, code) }
                if access == .execute && nx { cr2 = la; throw CPUFault(14, code) }
                var set = PTE.accessed
                if access == .write { set |= PTE.dirty }
                if e & set != set, let region { region.store(e | set, at: 0); noteWrite(frame: table >> 12) }
                let pageMask: UInt64 = (1 << shift) - 1
                let gpa = ((e & PTE.address & ~pageMask) | (la & pageMask)) & ~0xFFF
                let dirty = e & PTE.dirty != 0 || access == .write
                return (gpa, dirty && (rw || (!user && cr0 & CR0.WP == 0)))
            }
            if e & PTE.accessed == 0, let region { region.store(e | PTE.accessed, at: 0); noteWrite(frame: table >> 12) }
            table = e & PTE.address
            shift -= 9
        }
    }

    /// The guest-physical address behind linear `la`, for the runner (hypercall arguments go
    /// through the hypervisor's own walk; this is for tests and diagnostics).
    public func physicalAddress(of la: UInt64, write: Bool = false) -> UInt64? {
        if cr0 & CR0.PG == 0 { return la & 0xFFFF_FFFF }
        let saved = cr2
        defer { cr2 = saved }
        return try? walk(la, write ? .write : .read).0 | (la & 0xFFF)
    }
}
