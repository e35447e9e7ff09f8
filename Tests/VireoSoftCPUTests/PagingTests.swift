import Testing
import VireoABI
@testable import VireoSoftCPU

/// The page walk: #PF error codes and CR2, accessed and dirty bits, NX, CR0.WP.
@Suite struct PagingTests {
    static let page: UInt64 = 0x50000

    @Test func aMissingPageFaultsWithCR2AndTheErrorCode() throws {
        let m = try TestMachine(Snippets.loadFromAddress)
        try m.setPTE(Self.page, 0)
        m.cpu[.rax] = Self.page + 8
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14)
        #expect(m.cpu.cr2 == Self.page + 8)
        #expect(try m.stackWord(0) == 0, "read, not present, supervisor")
        #expect(try m.stackWord(1) == TestMachine.code, "the faulting instruction")
    }

    @Test func writingAReadOnlyPageWithWPFaults() throws {
        let m = try TestMachine(Snippets.storeToAddress)
        try m.setPTE(Self.page, Self.page | 1)
        m.cpu[.rax] = Self.page
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14)
        #expect(try m.stackWord(0) == 3, "present, write")
    }

    @Test func aWriteSetsAccessedAndDirty() throws {
        let m = try TestMachine(Snippets.storeToAddress)
        try m.setPTE(Self.page, Self.page | 3)
        (m.cpu[.rax], m.cpu[.rbx]) = (Self.page + 16, 0x1234)
        #expect(m.run() == .halt && m.exceptionVector == nil)
        #expect(try m.pte(Self.page) & 0x60 == 0x60)
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(Self.page + 16)) == 0x1234)
        let r = try TestMachine(Snippets.loadFromAddress)
        try r.setPTE(Self.page, Self.page | 3)
        r.cpu[.rax] = Self.page
        #expect(r.run() == .halt)
        #expect(try r.pte(Self.page) & 0x60 == 0x20, "a read sets accessed only")
    }

    @Test func fetchingFromANoExecutePageFaults() throws {
        let m = try TestMachine(Snippets.jumpToAddress)
        try m.memory.write([0xF4], at: GuestPhysicalAddress(Self.page))
        try m.setPTE(Self.page, Self.page | 3 | 1 << 63)
        m.cpu[.rax] = Self.page
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14)
        #expect(m.cpu.cr2 == Self.page)
        #expect(try m.stackWord(0) == 0x11, "present, instruction fetch")
        let ok = try TestMachine(Snippets.jumpToAddress)
        try ok.memory.write([0xF4], at: GuestPhysicalAddress(Self.page))
        ok.cpu[.rax] = Self.page
        #expect(ok.run() == .halt && ok.cpu.rip == Self.page + 1, "executable when NX is clear")
    }

    @Test func codeWrittenAfterItRanIsSeen() throws {
        // mov $1, %eax; hlt — then the test rewrites the immediate and runs it again.
        let m = try TestMachine([0xB8, 1, 0, 0, 0, 0xF4])
        #expect(m.run() == .halt && m.cpu[.rax] == 1)
        try m.memory.write([7], at: GuestPhysicalAddress(TestMachine.code + 1))
        m.cpu.rip = TestMachine.code
        #expect(m.run() == .halt && m.cpu[.rax] == 7)
    }

    @Test func aFaultWithNoUsableIDTShutsTheCPUDown() throws {
        let m = try TestMachine(Snippets.loadFromAddress)
        try m.setPTE(Self.page, 0)
        m.cpu.setDescriptorTables(gdt: (0x5000, 23), idt: (0x6000, 0))
        m.cpu[.rax] = Self.page
        guard case .shutdown(let why) = m.run() else { Issue.record("expected a shutdown"); return }
        #expect(why.contains("triple fault"))
    }
}

/// A guest's page tables may point anywhere; the host stays safe.
@Suite struct HostilePagingTests {
    /// A page mapped to a guest-physical address beyond RAM: writes vanish, reads float high,
    /// and no byte of host memory outside the guest changes.
    @Test func pagesBeyondRAMReadAllOnesAndDropWrites() throws {
        // mov %rbx, (%rax); mov (%rax), %rcx; hlt
        let m = try TestMachine([0x48, 0x89, 0x18, 0x48, 0x8B, 0x08, 0xF4])
        try m.setPTE(0x50000, 0xFFFF_F000 | 3)  // 4 GiB - 4 KiB: far beyond the 4 MiB of RAM
        (m.cpu[.rax], m.cpu[.rbx]) = (0x50008, 0x1122_3344_5566_7788)
        let before = try m.memory.bytes(at: GuestPhysicalAddress(0), count: 4 << 20)
        #expect(m.run() == .halt && m.exceptionVector == nil)
        #expect(m.cpu[.rcx] == UInt64.max)
        let after = try m.memory.bytes(at: GuestPhysicalAddress(0), count: 4 << 20)
        let changed = zip(before, after).enumerated().filter { $0.element.0 != $0.element.1 }.map { $0.offset }
        #expect(changed.allSatisfy { $0 >= 0x4000 && $0 < 0x5000 || $0 >= 0x1000 && $0 < 0x4000 },
                "only paging structures (accessed/dirty bits) and the stack may change: \(changed.prefix(8))")
    }

    /// A page table that is not guest memory reads as not present: #PF, not a host fault.
    @Test func aTableOutsideMemoryIsNotPresent() throws {
        let m = try TestMachine(Snippets.loadFromAddress)
        try m.memory.store(UInt64(0x7_0000_0000 | 3), at: GuestPhysicalAddress(0x3000 + 2 * 8))  // PD entry 2 → a table at 28 GiB
        m.cpu.flushTLB()
        m.cpu[.rax] = 0x40_0000
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14)
        #expect(try m.stackWord(0) == 0, "not present")
    }

    /// REP STOS running into an unmapped page faults there, with RCX and RDI showing progress.
    @Test func aRepStoreStopsAtTheFirstMissingPage() throws {
        // rep stosq; hlt
        let m = try TestMachine([0xF3, 0x48, 0xAB, 0xF4])
        try m.setPTE(0x51000, 0)
        (m.cpu[.rdi], m.cpu[.rcx], m.cpu[.rax]) = (0x50000, 1024, 0xAB)
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14 && m.cpu.cr2 == 0x51000)
        #expect(m.cpu[.rdi] == 0x51000 && m.cpu[.rcx] == 512, "the first page was filled, the rest restarts")
        #expect(try m.stackWord(1) == TestMachine.code, "the REP instruction restarts")
    }
}

extension HostilePagingTests {
    /// An instruction whose last byte is on a missing page faults for that page (CR2 at its
    /// start, an instruction fetch), even for the shapes the fast path decodes.
    @Test func anInstructionCrossingIntoAMissingPageFaults() throws {
        let m = try TestMachine([0xF4])
        let page: UInt64 = 0x50000
        // xor %rax, %rax (48 31 c0) with its ModRM on the next page.
        try m.memory.write([0x48, 0x31], at: GuestPhysicalAddress(page + 0xFFE))
        try m.memory.write([0xC0, 0xF4], at: GuestPhysicalAddress(page + 0x1000))
        m.cpu.rip = page + 0xFFE
        m.cpu[.rax] = 5
        #expect(m.run() == .halt && m.cpu[.rax] == 0 && m.cpu.rip == page + 0x1002, "it runs while both pages are there")
        // Now without the second page (the fetcher's scratch copy still holds the old bytes).
        try m.setPTE(page + 0x1000, 0)
        m.cpu.rip = page + 0xFFE
        m.cpu[.rax] = 5
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14 && m.cpu.cr2 == page + 0x1000)
        #expect(try m.stackWord(0) == 0x10, "not present, instruction fetch")
        #expect(m.cpu[.rax] == 5, "the instruction did not run")
    }
}
