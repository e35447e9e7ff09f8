import Synchronization
import Testing
import VireoABI
import VireoKVM
@testable import VireoSoftCPU

/// Single instructions and short sequences on the SoftCPU, checked against values worked out
/// from Intel's SDM (flags included).
@Suite struct InstructionTests {
    static let arithmetic: UInt64 = 0x8D5  // OF SF ZF AF PF CF

    func run(_ code: [UInt8], _ setup: (TestMachine) throws -> Void = { _ in }) throws -> TestMachine {
        let m = try TestMachine(code)
        try setup(m)
        #expect(m.run() == .halt)
        return m
    }

    @Test func addSetsEveryArithmeticFlag() throws {
        let m = try run(Snippets.addOverflow)
        #expect(m.cpu[.rax] == 0x8000_0000)
        #expect(m.cpu.rflags & Self.arithmetic == 0x894, "OF SF AF PF")
    }

    @Test func subtractingBelowZeroBorrows() throws {
        let m = try run(Snippets.subBorrow)
        #expect(m.cpu[.rax] == UInt64.max)
        #expect(m.cpu.rflags & Self.arithmetic == 0x95, "SF AF PF CF, no OF")
    }

    @Test func addWithCarryChainsA128BitSum() throws {
        let m = try run(Snippets.adcChain) { m in
            (m.cpu[.rax], m.cpu[.rcx], m.cpu[.rbx], m.cpu[.rdx]) = (UInt64.max, 1, 3, 2)
        }
        #expect(m.cpu[.rax] == 0 && m.cpu[.rbx] == 6)
        #expect(m.cpu.rflags & 1 == 0)
    }

    @Test func incrementKeepsTheCarryFlag() throws {
        let m = try run(Snippets.incKeepsCarry)
        #expect(m.cpu[.rax] == 0)
        #expect(m.cpu.rflags & (0x1 | 0x40 | 0x800) == 0x41, "CF kept, ZF set, no OF")
    }

    @Test func signedAndUnsignedBranchesDisagreeOnMinusOne() throws {
        let m = try run(Snippets.cmpBranches) { m in (m.cpu[.rax], m.cpu[.rdx]) = (UInt64.max, 1) }
        #expect(m.cpu[.rbx] == 6, "JL and JA taken, JB and JG not")
    }

    @Test func shiftsAndRotates() throws {
        let m = try run(Snippets.shifts)
        #expect(m.cpu[.rax] == 2)
        #expect(m.cpu[.rbx] == UInt64(bitPattern: -4))
        #expect(m.cpu[.rcx] == 0xF)
        #expect(m.cpu[.rdx] & 0xFF == 0x03)
        #expect(m.cpu.rflags & 0x801 == 0x801, "ROL: CF is the bit rotated in, OF = MSB ^ CF")
        let cl = try run(Snippets.shiftByCL)
        #expect(cl.cpu[.rax] == 2, "64-bit shift counts are masked to 6 bits")
        let shld = try run(Snippets.shld)
        #expect(shld.cpu[.rax] == 3)
    }

    @Test func multiplyAndDivide() throws {
        let mul = try run(Snippets.mul64) { m in (m.cpu[.rax], m.cpu[.rbx]) = (UInt64.max, 2) }
        #expect(mul.cpu[.rdx] == 1 && mul.cpu[.rax] == UInt64.max - 1)
        #expect(mul.cpu.rflags & 0x801 == 0x801)
        let over = try run(Snippets.imul2) { m in (m.cpu[.rax], m.cpu[.rbx]) = (1 << 62, 4) }
        #expect(over.cpu[.rax] == 0 && over.cpu.rflags & 0x801 == 0x801)
        let fits = try run(Snippets.imul2) { m in (m.cpu[.rax], m.cpu[.rbx]) = (UInt64(bitPattern: -3), 5) }
        #expect(fits.cpu[.rax] == UInt64(bitPattern: -15) && fits.cpu.rflags & 0x801 == 0)
        let three = try run(Snippets.imul3) { m in m.cpu[.rbx] = 7; m.cpu[.rcx] = UInt64.max }
        #expect(three.cpu[.rcx] == 0xFFFF_FFEB, "-21, zero-extended")
        let div = try run(Snippets.div64) { m in (m.cpu[.rdx], m.cpu[.rax], m.cpu[.rbx]) = (1, 0, 2) }
        #expect(div.cpu[.rax] == 1 << 63 && div.cpu[.rdx] == 0)
        let idiv = try run(Snippets.idiv32) { m in (m.cpu[.rax], m.cpu[.rbx]) = (0xFFFF_FFF9, 2) }
        #expect(idiv.cpu[.rax] == 0xFFFF_FFFD && idiv.cpu[.rdx] == 0xFFFF_FFFF, "-7 / 2 = -3 rem -1")
    }

    @Test func divideErrorsRaiseDEAtTheDivide() throws {
        let zero = try run(Snippets.divideByZero)
        #expect(zero.exceptionVector == 0)
        #expect(try zero.stackWord(0) == TestMachine.code + 2, "the frame's RIP is the DIV itself")
        let overflow = try run(Snippets.idiv32) { m in (m.cpu[.rax], m.cpu[.rbx]) = (0x8000_0000, 0xFFFF_FFFF) }
        #expect(overflow.exceptionVector == 0, "INT_MIN / -1 does not fit")
        let quotient = try run(Snippets.div64) { m in (m.cpu[.rdx], m.cpu[.rax], m.cpu[.rbx]) = (2, 0, 2) }
        #expect(quotient.exceptionVector == 0, "a quotient past 64 bits")
    }

    @Test func repStringInstructions() throws {
        let src = TestMachine.data, dst = TestMachine.data + 0x100, fill = TestMachine.data + 0x1000
        let m = try run(Snippets.string) { m in
            try m.memory.write(Array("hello".utf8), at: GuestPhysicalAddress(src))
            (m.cpu[.rsi], m.cpu[.rdi], m.cpu[.rcx], m.cpu[.rdx]) = (src, dst, 5, fill)
        }
        #expect(try m.memory.bytes(at: GuestPhysicalAddress(dst), count: 5) == Array("hello".utf8))
        #expect(m.cpu[.rsi] == src + 5)
        #expect(try m.memory.bytes(at: GuestPhysicalAddress(fill), count: 64) == [UInt8]((0..<8).flatMap { _ in [0x41, 0, 0, 0, 0, 0, 0, 0] }))
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(fill + 64)) == 0, "exactly RCX elements")
        #expect(m.cpu[.rcx] == 0 && m.cpu[.rdi] == fill + 64)
        let strlen = try run(Snippets.strlen) { m in
            try m.memory.write(Array("vireo\0".utf8), at: GuestPhysicalAddress(src))
            m.cpu[.rdi] = src
        }
        #expect(strlen.cpu[.rcx] == 5)
    }

    @Test func callPushPopReturn() throws {
        let m = try run(Snippets.callRet)
        #expect(m.cpu[.rax] == 10 && m.cpu[.rsp] == TestMachine.stackTop)
    }

    @Test func conditionalMovesAndSets() throws {
        let m = try run(Snippets.cmovSetcc) { m in m.cpu[.rax] = 5 }
        #expect(m.cpu[.rcx] == 7)
        #expect(m.cpu[.rbx] & 0xFFFF == 0x0001, "SETG 1 into BL, SETL 0 into BH")
        #expect(m.cpu[.rsi] == 0xFFFF_FFFF, "a 32-bit CMOV zero-extends even when not taken")
    }

    @Test func zeroAndSignExtension() throws {
        let m = try run(Snippets.movzxMovsx)
        #expect(m.cpu[.rbx] == 0x80)
        #expect(m.cpu[.rcx] == UInt64(bitPattern: -128))
        #expect(m.cpu[.rdx] == 0xFFFF_FF80)
        #expect(m.cpu[.rsi] == 0x1FF80)
    }

    @Test func bitTestsAndScans() throws {
        let m = try run(Snippets.bitOps)
        #expect(m.cpu[.rbx] & 0xFF == 1)
        #expect(m.cpu[.rax] == 0x100)
        #expect(m.cpu[.rsi] == 4 && m.cpu[.rdi] == 7)
    }

    @Test func exchangeCompareExchangeAndLockedAdd() throws {
        let m = try run(Snippets.xchgCmpxchg) { m in
            try m.memory.store(UInt64(10), at: GuestPhysicalAddress(TestMachine.data))
            m.cpu[.rsi] = TestMachine.data
        }
        #expect(m.cpu[.rbx] == 1)
        #expect(m.cpu[.rcx] == 9 && m.cpu[.r8] & 0xFF == 1)
        #expect(m.cpu[.rax] == 10)
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(TestMachine.data)) == 15)
    }

    @Test func loadEffectiveAddress() throws {
        let m = try run(Snippets.lea) { m in (m.cpu[.rax], m.cpu[.rbx]) = (0x100, 2) }
        #expect(m.cpu[.rcx] == 0x118 && m.cpu[.rdx] == 0xFF)
        #expect(m.cpu[.rsi] == TestMachine.code + UInt64(Snippets.lea.count) - 1, "RIP-relative")
    }

    @Test func flagsThroughTheStack() throws {
        let m = try run(Snippets.pushfPopf)
        #expect(m.cpu[.rax] == 1)
        #expect(m.cpu[.rcx] & 0xFF == 1 && m.cpu[.rdx] & 0xFF == 1)
    }

    @Test func sse2MovesAndLogic() throws {
        let pattern: [UInt8] = (0..<16).map { UInt8($0 * 17) }
        let m = try run(Snippets.sse) { m in
            try m.memory.write(pattern, at: GuestPhysicalAddress(TestMachine.data + 1))  // MOVDQU: unaligned
            (m.cpu[.rax], m.cpu[.rbx]) = (TestMachine.data + 1, TestMachine.data + 0x200)
        }
        #expect(try m.memory.bytes(at: GuestPhysicalAddress(TestMachine.data + 0x200), count: 16) == pattern)
        #expect(m.cpu[.rcx] == pattern.prefix(8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    }

    @Test func cpuidOffersXensLeaves() throws {
        let leaves = XenCPUID.leaves(vcpu: 0, domain: DomainID(1)).map {
            CPUIDLeaf(function: $0.function, index: $0.index, significantIndex: $0.flags & 1 != 0, eax: $0.eax, ebx: $0.ebx, ecx: $0.ecx, edx: $0.edx)
        }
        let m = try TestMachine(Snippets.cpuidLeaf)
        m.cpu.cpuidLeaves += leaves
        m.cpu[.rax] = 0x4000_0000
        #expect(m.run() == .halt)
        let signature = [m.cpu[.rbx], m.cpu[.rcx], m.cpu[.rdx]].flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        #expect(String(decoding: signature, as: UTF8.self) == "XenVMMXenVMM")
        let one = try TestMachine(Snippets.cpuidLeaf)
        one.cpu[.rax] = 1
        #expect(one.run() == .halt)
        #expect(one.cpu[.rcx] & (1 << 31) != 0, "the hypervisor bit")
        let ext = try TestMachine(Snippets.cpuidLeaf)
        ext.cpu[.rax] = 0x8000_0001
        #expect(ext.run() == .halt)
        #expect(ext.cpu[.rdx] & (1 << 29 | 1 << 20) == 1 << 29 | 1 << 20, "long mode and NX")
    }

    @Test func theHypercallPageMSRAndVMCALLExitToTheRunner() throws {
        let m = try TestMachine(Snippets.wrmsrHypercallPage)
        #expect(m.run() == .writeMSR(msr: 0x4000_0000, value: 0x3000))
        m.cpu.completeMSRWrite(accepted: true)
        #expect(m.run() == .hypercall(length: 3))
        #expect(m.cpu.rip == TestMachine.code + UInt64(Snippets.wrmsrHypercallPage.count) - 1)
        let refused = try TestMachine(Snippets.wrmsrHypercallPage)
        #expect(refused.run() == .writeMSR(msr: 0x4000_0000, value: 0x3000))
        refused.cpu.completeMSRWrite(accepted: false)
        #expect(refused.run() == .halt)
        #expect(refused.exceptionVector == 13, "a refused MSR write is #GP")
    }

    @Test func externalInterruptsWaitForIF() throws {
        let m = try TestMachine([0xF4], interruptsOn: false)
        #expect(!m.cpu.injectInterrupt(vector: 3))
        m.cpu.rflags = 0x202
        #expect(m.cpu.injectInterrupt(vector: 3))
        #expect(m.cpu.rip == TestMachine.handlers + 3 * 16)
        #expect(try m.stackWord(0) == TestMachine.code, "the frame returns to the interrupted instruction")
    }

    @Test func anOverlongInstructionIsGP() throws {
        let m = try TestMachine([UInt8](repeating: 0x66, count: 17) + [0x90, 0xF4])
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 13)
    }

    /// Code fetched from guest-physical addresses that are not memory reads all-ones (FF FF is
    /// an invalid FF /7): #UD for the guest, nothing for the host.
    @Test func codeOutsideMemoryIsUndefined() throws {
        let m = try TestMachine(Snippets.jumpToAddress)
        try m.memory.store(UInt64(0x4000_0000 | 0x83), at: GuestPhysicalAddress(0x3000 + 2 * 8))  // 4 MiB-6 MiB: beyond RAM
        m.cpu.flushTLB()
        m.cpu[.rax] = 0x40_0000
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 6)
    }

    @Test func unimplementedInstructionsRaiseUDAndAreReportedOnce() throws {
        let seen = Mutex<[[UInt8]]>([])
        let m = try TestMachine(Snippets.unknown)
        m.cpu.unimplemented = { _, bytes in seen.withLock { $0.append(bytes) } }
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 6)
        m.cpu.rip = TestMachine.code
        #expect(m.run() == .halt)
        let reports = seen.withLock { $0 }
        #expect(reports.count == 1)
        #expect(reports.first?.prefix(4) == [0x48, 0x0F, 0xC7, 0xF0])
    }
}
