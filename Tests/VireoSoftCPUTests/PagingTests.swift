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
