import VireoABI
import VireoCore
@testable import VireoSoftCPU

/// A SoftCPU in long mode over 4 MiB of guest memory, for instruction tests:
/// - page tables at 0x1000-0x4FFF: the first 2 MiB in 4 KiB pages (so a test can change one
///   page), the next 2 MiB as one large page; all present and writable, identity-mapped;
/// - a GDT at 0x5000 (0x08 64-bit code, 0x10 data), an IDT at 0x6000 whose 32 exception
///   vectors are trap gates to `hlt` at 0x7000 + 16 × vector;
/// - code at 0x10000, the stack below 0x30000, data from 0x40000.
final class TestMachine {
    let memory: GuestMemory
    let cpu: SoftCPU
    static let code: UInt64 = 0x10000, stackTop: UInt64 = 0x30000, data: UInt64 = 0x40000
    static let pageTable: UInt64 = 0x4000, handlers: UInt64 = 0x7000

    /// `native`: whether the native tier runs (where the host can), translating every block
    /// on its first run so that every test goes through it; false runs the interpreter alone.
    init(_ code: [UInt8], interruptsOn: Bool = true, native: Bool = true) throws {
        let memory = try GuestMemory(ramBytes: 4 << 20, specialFrames: 1)
        self.memory = memory
        func store(_ v: UInt64, _ at: UInt64) throws { try memory.store(v, at: GuestPhysicalAddress(at)) }
        try store(0x2000 | 3, 0x1000)
        try store(0x3000 | 3, 0x2000)
        try store(Self.pageTable | 3, 0x3000)
        try store(0x20_0000 | 0x83, 0x3008)
        for page in 0..<512 { try store(UInt64(page) << 12 | 3, Self.pageTable + UInt64(page) * 8) }
        try store(0, 0x5000)
        try store(0x00AF_9A00_0000_FFFF, 0x5008)
        try store(0x00CF_9200_0000_FFFF, 0x5010)
        for vector in 0..<32 {
            let handler = Self.handlers + UInt64(vector) * 16
            try memory.write([0xF4], at: GuestPhysicalAddress(handler))
            let low = (handler & 0xFFFF) | 0x08 << 16 | UInt64(0x8F00) << 32 | (handler & 0xFFFF_0000) << 32
            try store(low, 0x6000 + UInt64(vector) * 16)
            try store(handler >> 32, 0x6000 + UInt64(vector) * 16 + 8)
        }
        try memory.write(code, at: GuestPhysicalAddress(Self.code))
        let cpu = SoftCPU(memory: memory)
        self.cpu = cpu
        cpu.nativeTier = native && SoftCPU.nativeTierAvailable
        cpu.nativeThreshold = 1
        cpu.nativeMinimumEntries = 1
        cpu.setStartState(long: true, cr0: 0x8001_0011, cr3: 0x1000, cr4: 0x20, efer: 0xD00)
        cpu.setDescriptorTables(gdt: (0x5000, 23), idt: (0x6000, 32 * 16 - 1))
        cpu.rip = Self.code
        cpu[.rsp] = Self.stackTop
        cpu.rflags = interruptsOn ? 0x202 : 0x2
    }

    /// Runs until an exit other than the budget (at most `limit` instructions).
    @discardableResult
    func run(limit: Int = 100_000) -> SoftCPUExit {
        var left = limit
        while left > 0 {
            let exit = cpu.run(budget: min(left, 10_000))
            if exit != .budget { return exit }
            left -= 10_000
        }
        return .budget
    }

    /// The exception vector whose handler the CPU halted in, if any.
    var exceptionVector: Int? {
        let at = cpu.rip &- 1
        guard at >= Self.handlers, at < Self.handlers + 32 * 16, (at - Self.handlers) % 16 == 0 else { return nil }
        return Int((at - Self.handlers) / 16)
    }

    /// Whether the CPU halted at the end of the code (`hlt` as its last byte).
    func haltedAtEnd(_ code: [UInt8]) -> Bool { cpu.rip == Self.code + UInt64(code.count) }

    /// The page-table entry for the 4 KiB page at `address` (below 2 MiB).
    func pte(_ address: UInt64) throws -> UInt64 {
        try memory.load(UInt64.self, at: GuestPhysicalAddress(Self.pageTable + (address >> 12) * 8))
    }

    func setPTE(_ address: UInt64, _ value: UInt64) throws {
        try memory.store(value, at: GuestPhysicalAddress(Self.pageTable + (address >> 12) * 8))
        cpu.flushTLB()
    }

    func stackWord(_ index: Int) throws -> UInt64 {
        try memory.load(UInt64.self, at: GuestPhysicalAddress(cpu[.rsp] + UInt64(index * 8)))
    }
}
