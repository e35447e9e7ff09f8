import Testing
import VireoABI
import VireoCore
@testable import VireoHypervisor

@Suite struct GuestAddressSpaceTests {
    /// Long-mode tables: VA 0 .. 2 MiB identity via a 2 MiB page (writable); VA 0x4000_0000 via
    /// a 4 KiB table: page 0 -> PA 0x30_0000 writable, page 1 -> PA 0x30_1000 read-only, page 2
    /// not present.
    static func longMode() throws -> GuestAddressSpace {
        let memory = try GuestMemory(ramBytes: 4 << 20)
        let p: UInt64 = 1, w: UInt64 = 2, ps: UInt64 = 1 << 7
        try memory.store(UInt64(0x2000) | p | w, at: GuestPhysicalAddress(0x1000))           // PML4[0] -> PDPT
        try memory.store(UInt64(0x3000) | p | w, at: GuestPhysicalAddress(0x2000))           // PDPT[0] -> PD (VA 0..1 GiB)
        try memory.store(UInt64(0x0) | p | w | ps, at: GuestPhysicalAddress(0x3000))         // PD[0]: 2 MiB identity
        try memory.store(UInt64(0x5000) | p | w, at: GuestPhysicalAddress(0x2008))           // PDPT[1] -> PD (VA 1..2 GiB)
        try memory.store(UInt64(0x6000) | p | w, at: GuestPhysicalAddress(0x5000))           // PD[0] -> PT
        try memory.store(UInt64(0x30_0000) | p | w, at: GuestPhysicalAddress(0x6000))        // PT[0]
        try memory.store(UInt64(0x30_1000) | p, at: GuestPhysicalAddress(0x6008))            // PT[1] read-only
        return GuestAddressSpace(memory: memory, mode: PagingMode(cr0: 1 << 31 | 1, cr3: 0x1000, cr4: 1 << 5, efer: 1 << 10 | 1 << 8))
    }

    @Test func walksFourLevelsAndLargePages() throws {
        let space = try Self.longMode()
        #expect(space.mode == .long(cr3: 0x1000))
        #expect(try space.translate(GuestVirtualAddress(0x1234), write: true) == GuestPhysicalAddress(0x1234))
        #expect(try space.translate(GuestVirtualAddress(0x4000_0010), write: true) == GuestPhysicalAddress(0x30_0010))
        #expect(try space.translate(GuestVirtualAddress(0x4000_1010), write: false) == GuestPhysicalAddress(0x30_1010))
        try space.store(UInt64(0xabcd), at: GuestVirtualAddress(0x4000_0ff8))
        #expect(try space.memory.load(UInt64.self, at: GuestPhysicalAddress(0x30_0ff8)) == 0xabcd)
        #expect(try space.load(UInt64.self, at: GuestVirtualAddress(0x4000_0ff8)) == 0xabcd)
    }

    /// Bad pointers are -EFAULT: not present, read-only for a write, non-canonical, wrapping,
    /// outside guest memory. A write that would fault part-way writes nothing.
    @Test func badPointersAreEFAULT() throws {
        let space = try Self.longMode()
        #expect(throws: XenError.EFAULT) { try space.translate(GuestVirtualAddress(0x4000_2000), write: false) }
        #expect(throws: XenError.EFAULT) { try space.translate(GuestVirtualAddress(0x4000_1000), write: true) }
        #expect(throws: XenError.EFAULT) { try space.translate(GuestVirtualAddress(0x0000_8000_0000_0000), write: false) }
        #expect(throws: XenError.EFAULT) { try space.read(GuestVirtualAddress(UInt64.max - 2), count: 8) }
        #expect(throws: XenError.EFAULT) { try space.read(GuestVirtualAddress(0x8000_0000), count: 1) }  // PDPT[2] absent
        // 8 bytes across the writable page into the read-only one: refused, nothing written.
        #expect(throws: XenError.EFAULT) { try space.store(UInt64.max, at: GuestVirtualAddress(0x4000_0ffc)) }
        #expect(try space.memory.load(UInt32.self, at: GuestPhysicalAddress(0x30_0ffc)) == 0)
        // A page table entry pointing outside guest memory.
        try space.memory.store(UInt64(0x7fff_0000_0000) | 1, at: GuestPhysicalAddress(0x6010))
        #expect(throws: XenError.EFAULT) { try space.read(GuestVirtualAddress(0x4000_2000), count: 1) }
    }

    @Test func pagingOffIsIdentity() throws {
        let memory = try GuestMemory(ramBytes: 1 << 20)
        let space = GuestAddressSpace(memory: memory, mode: PagingMode(cr0: 1, cr3: 0, cr4: 0, efer: 0))
        #expect(space.mode == .off)
        try space.store(UInt32(7), at: GuestVirtualAddress(0x8000))
        #expect(try memory.load(UInt32.self, at: GuestPhysicalAddress(0x8000)) == 7)
        #expect(throws: XenError.EFAULT) { try space.read(GuestVirtualAddress(0x20_0000), count: 4) }
    }

    @Test func paeWalksThreeLevels() throws {
        let memory = try GuestMemory(ramBytes: 4 << 20)
        try memory.store(UInt64(0x2000) | 1, at: GuestPhysicalAddress(0x1000))                // PDPTE[0]
        try memory.store(UInt64(0x20_0000) | 1 | 2 | 1 << 7, at: GuestPhysicalAddress(0x2000))  // PDE[0]: 2 MiB
        let space = GuestAddressSpace(memory: memory, mode: PagingMode(cr0: 1 << 31 | 1, cr3: 0x1000, cr4: 1 << 5, efer: 0))
        #expect(try space.translate(GuestVirtualAddress(0x1_2345), write: true) == GuestPhysicalAddress(0x21_2345))
        #expect(throws: XenError.EFAULT) { try space.translate(GuestVirtualAddress(0x4000_0000), write: false) }
        let noPAE = GuestAddressSpace(memory: memory, mode: PagingMode(cr0: 1 << 31 | 1, cr3: 0x1000, cr4: 0, efer: 0))
        #expect(throws: XenError.EFAULT) { try noPAE.translate(GuestVirtualAddress(0x1000), write: false) }
    }
}
