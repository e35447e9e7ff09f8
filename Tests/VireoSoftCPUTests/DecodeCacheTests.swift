import Testing
import VireoABI
import VireoCore
@testable import VireoSoftCPU

/// The decode cache (SoftCPUDecodeCache.swift): instructions decoded once per guest-physical
/// address, dropped when a write reaches their page, at every run and on serializing
/// instructions. These tests change code under a running CPU and expect the new code to run.
@Suite struct DecodeCacheTests {
    /// The entry of the instruction at guest-physical `gpa`, if a live block holds it decoded.
    static func cached(_ cpu: SoftCPU, _ gpa: UInt64) -> DecodedInstruction? {
        cpu.decodeCache.entry(at: gpa)
    }

    @Test func aLoopRunsFromTheCache() throws {
        // mov $40, %ecx; 1: add $3, %eax; dec %ecx; jnz 1b; hlt
        let code: [UInt8] = [0xB9, 40, 0, 0, 0, 0x83, 0xC0, 0x03, 0xFF, 0xC9, 0x75, 0xF9, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt)
        #expect(m.cpu[.rax] == 120 && m.cpu[.rcx] == 0)
        // Read before the next run's flush: the loop's three instructions are decoded entries.
        #expect(Self.cached(m.cpu, TestMachine.code + 5)?.kind == .addRI)
        #expect(Self.cached(m.cpu, TestMachine.code + 8)?.kind == .incDec)
        #expect(Self.cached(m.cpu, TestMachine.code + 10)?.kind == .jcc)
    }

    @Test func codeTheLoopRewritesOnItsOwnPageRunsRewritten() throws {
        // mov $40, %ecx; 1: mov $1, %eax; incb 1b+1(%rip); dec %ecx; jnz 1b; hlt
        // Each pass runs the MOV with the immediate the previous pass wrote: 40 passes leave
        // EAX = 40. Past 16 rewrites the page is no longer cached (code and data share it).
        let code: [UInt8] = [0xB9, 0x28, 0, 0, 0, 0xB8, 0x01, 0, 0, 0, 0xFE, 0x05, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xC9, 0x75, 0xF1, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt)
        #expect(m.cpu[.rax] == 40)
        #expect(try m.memory.load(UInt8.self, at: GuestPhysicalAddress(TestMachine.code + 6)) == 41)
        #expect(m.cpu.decodeCache.frameState[Int(TestMachine.code >> 12)] == DecodeCache.uncacheable)
    }

    @Test func codeRewrittenOnAnotherPageRunsRewritten() throws {
        // call 0x11000; movb $9, 0x11002; call 0x11000; hlt — and at 0x11000: nop; mov $1, %eax;
        // ret (the first instruction on a page takes the full decoder; the MOV is cached).
        let code: [UInt8] = [0xE8, 0xFB, 0x0F, 0, 0, 0xC6, 0x04, 0x25, 0x02, 0x10, 0x01, 0x00, 0x09, 0xE8, 0xEE, 0x0F, 0, 0, 0xF4]
        let m = try TestMachine(code)
        try m.memory.write([0x90, 0xB8, 1, 0, 0, 0, 0xC3], at: GuestPhysicalAddress(0x11000))
        #expect(m.run() == .halt)
        #expect(m.cpu[.rax] == 9)
        #expect(m.cpu.rip == TestMachine.code + UInt64(code.count))
    }

    @Test func codeTheHostWritesBetweenRunsIsSeen() throws {
        // 1: mov $1, %eax; jmp 1b — the host rewrites the immediate between two runs.
        let m = try TestMachine([0xB8, 1, 0, 0, 0, 0xEB, 0xF9])
        #expect(m.cpu.run(budget: 100) == .budget && m.cpu[.rax] == 1)
        #expect(Self.cached(m.cpu, TestMachine.code)?.kind == .movRI)
        try m.memory.write([5], at: GuestPhysicalAddress(TestMachine.code + 1))
        #expect(m.cpu.run(budget: 100) == .budget && m.cpu[.rax] == 5)
    }

    @Test func aCachedLoadFaultsAtItsOwnAddress() throws {
        // nop; mov (%rax), %rcx; hlt — the MOV runs from the cache and meets a missing page.
        let m = try TestMachine([0x90, 0x48, 0x8B, 0x08, 0xF4])
        try m.setPTE(0x50000, 0)
        m.cpu[.rax] = 0x50008
        m.cpu[.rcx] = 0x1234
        #expect(m.run() == .halt)
        #expect(m.exceptionVector == 14)
        #expect(m.cpu.cr2 == 0x50008 && m.cpu[.rcx] == 0x1234)
        #expect(try m.stackWord(1) == TestMachine.code + 1)  // the frame's RIP, above the error code
    }

    @Test func memoryOperandsFromTheCacheAgreeWithTheSDM() throws {
        // leaq 0x40000, %rbx; movq $5, (%rbx); addq $3, (%rbx); imulq $7, (%rbx), %rcx;
        // movq (%rbx), %rdx; subq %rdx, 8(%rbx,%rax,8); testq %rcx, (%rbx); hlt
        let code: [UInt8] = [0x48, 0x8D, 0x1C, 0x25, 0x00, 0x00, 0x04, 0x00, 0x48, 0xC7, 0x03, 0x05, 0, 0, 0,
                             0x48, 0x83, 0x03, 0x03, 0x48, 0x6B, 0x0B, 0x07, 0x48, 0x8B, 0x13,
                             0x48, 0x29, 0x54, 0xC3, 0x08, 0x48, 0x85, 0x0B, 0xF4]
        let m = try TestMachine(code)
        m.cpu[.rax] = 1
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40000)) == 8)
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40010)) == UInt64(bitPattern: -8))
        #expect(m.cpu[.rcx] == 56 && m.cpu[.rdx] == 8)
        #expect(m.cpu.rflags & 0x40 == 0)  // 56 & 8 != 0: ZF clear
        #expect(Self.cached(m.cpu, TestMachine.code + 26)?.kind == .aluMR)
    }

    @Test func aRegisterMoveFusedWithTheNextOperationRetiresBoth() throws {
        // movl $0x80000001, %ecx; movq %rcx, %rdi; shlq $13, %rdi; movl %ecx, %esi; sarl $4, %esi;
        // movq %rdi, %rax; cmpq %rcx, %rax; jbe 2f; movl $1, %edx; 2: hlt
        let code: [UInt8] = [0xB9, 0x01, 0x00, 0x00, 0x80, 0x48, 0x89, 0xCF, 0x48, 0xC1, 0xE7, 0x0D,
                             0x89, 0xCE, 0xC1, 0xFE, 0x04, 0x48, 0x89, 0xF8, 0x48, 0x39, 0xC8, 0x76,
                             0x05, 0xBA, 0x01, 0x00, 0x00, 0x00, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        #expect(m.cpu[.rdi] == 0x8000_0001 << 13 && m.cpu[.rax] == 0x8000_0001 << 13)
        #expect(m.cpu[.rsi] == 0xF800_0000)  // SAR of the 32-bit value, zero-extended
        #expect(m.cpu[.rdx] == 1)  // CMP's flags from the fused pair: above
        #expect(m.cpu.instructions == 10)  // each fused pair counts as its two instructions
        let pair = Self.cached(m.cpu, TestMachine.code + 5)
        #expect(pair?.kind == .movRR && pair?.second == .shlRI && pair?.retired == 2)
    }

    @Test func aStoreIntoItsOwnBlockStopsTheBlock() throws {
        // nop; movl $7, 1f+1(%rip); 1: mov $1, %eax; hlt — the store and the MOV are one block,
        // decoded before the store rewrites the MOV's immediate: the block stops after the
        // store and the MOV runs as rewritten.
        let code: [UInt8] = [0x90, 0xC7, 0x05, 0x01, 0, 0, 0, 0x07, 0, 0, 0, 0xB8, 0x01, 0, 0, 0, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        #expect(m.cpu[.rax] == 7)
        #expect(m.cpu.instructions == 4)
    }

    @Test func aBudgetEndingInsideABlockStopsThere() throws {
        // mov $40, %ecx; 1: add $3, %eax; dec %ecx; jnz 1b; hlt — run one instruction at a time
        // and in slices of 5, against one long run: the same state at every stop.
        let code: [UInt8] = [0xB9, 40, 0, 0, 0, 0x83, 0xC0, 0x03, 0xFF, 0xC9, 0x75, 0xF9, 0xF4]
        let single = try TestMachine(code), sliced = try TestMachine(code)
        for n in 1...60 {
            #expect(single.cpu.run(budget: 1) == .budget)
            #expect(single.cpu.instructions == UInt64(n))
            if n % 5 == 0 {
                #expect(sliced.cpu.run(budget: 5) == .budget)
                #expect(sliced.cpu.instructions == UInt64(n))
                #expect(sliced.cpu.rip == single.cpu.rip && sliced.cpu[.rax] == single.cpu[.rax])
                #expect(sliced.cpu[.rcx] == single.cpu[.rcx])
            }
        }
        #expect(single.cpu[.rax] == 3 * 20 && single.cpu[.rcx] == 20)
    }

    @Test func theCacheCommitsMemoryForTheCodeThatRan() throws {
        // A small loop: the cache's mappings (1.5 MiB of pool and 16 KiB of block heads
        // reserved) commit a few pages, not the reservation.
        let code: [UInt8] = [0xB9, 0x10, 0x27, 0, 0, 0x83, 0xC0, 0x03, 0xFF, 0xC9, 0x75, 0xF9, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt)
        let resident = m.cpu.decodeCache.residentBytes
        #expect(resident > 0 && resident <= 8 * 4096)
        #expect(DecodeCache.entryBytes + DecodeCache.blockBytes > 1 << 20)
    }

    @Test func byteAndWordFormsRunFromTheCache() throws {
        // nop; mov $0x11223344, %eax; mov $0xF0, %ah; add %ah, %al; movw $0x8001, %cx;
        // addw %cx, %ax; movzbl %ah, %edx; movsbq %al, %rsi; movb %al, 0x40000; incb 0x40000;
        // testb $0x80, 0x40000; setnz %bl (INC of memory and SETcc: the full decoder); movzwl 0x40000, %edi; hlt
        let code: [UInt8] = [0x90, 0xB8, 0x44, 0x33, 0x22, 0x11, 0xB4, 0xF0, 0x00, 0xE0, 0x66, 0xB9, 0x01, 0x80,
                             0x66, 0x01, 0xC8, 0x0F, 0xB6, 0xD4, 0x48, 0x0F, 0xBE, 0xF0, 0x88, 0x04, 0x25, 0x00, 0x00, 0x04, 0x00,
                             0xFE, 0x04, 0x25, 0x00, 0x00, 0x04, 0x00, 0xF6, 0x04, 0x25, 0x00, 0x00, 0x04, 0x00, 0x80,
                             0x0F, 0x95, 0xC3, 0x0F, 0xB7, 0x3C, 0x25, 0x00, 0x00, 0x04, 0x00, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        // AL = 0x44 + 0xF0 = 0x34; AX = 0xF034 + 0x8001 = 0x7035 (carry out of 16 bits dropped).
        #expect(m.cpu[.rax] == 0x1122_7035)
        #expect(m.cpu[.rcx] & 0xFFFF == 0x8001)
        #expect(m.cpu[.rdx] == 0x70)
        #expect(m.cpu[.rsi] == 0x35)
        #expect(try m.memory.load(UInt8.self, at: GuestPhysicalAddress(0x40000)) == 0x36)
        #expect(m.cpu[.rbx] & 0xFF == 0)  // 0x36 & 0x80 == 0: SETNZ gives 0
        #expect(m.cpu[.rdi] == 0x36)
        #expect(Self.cached(m.cpu, TestMachine.code + 6)?.kind == .movRIn)
        #expect(Self.cached(m.cpu, TestMachine.code + 8)?.kind == .aluRRn)
        #expect(Self.cached(m.cpu, TestMachine.code + 14)?.kind == .aluRRn)
        #expect(Self.cached(m.cpu, TestMachine.code + 17)?.kind == .movzxR)
        #expect(Self.cached(m.cpu, TestMachine.code + 24)?.kind == .storeN)
        #expect(Self.cached(m.cpu, TestMachine.code + 38)?.kind == .aluMIn)
    }

    @Test func aForwardJumpContinuesTheBlockAtItsTarget() throws {
        // nop; mov $40, %ecx; 1: add $3, %eax; jmp 2f; mov $1, %edx; 2: dec %ecx; jnz 1b; hlt —
        // the MOV skipped never runs; the loop is one block (ADD, JMP, DEC, JNZ) run again
        // without a lookup, and counts every instruction.
        let code: [UInt8] = [0x90, 0xB9, 40, 0, 0, 0, 0x83, 0xC0, 0x03, 0xEB, 0x05, 0xBA, 0x01, 0, 0, 0, 0xFF, 0xC9, 0x75, 0xF2, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        #expect(m.cpu[.rax] == 120 && m.cpu[.rcx] == 0 && m.cpu[.rdx] == 0)
        #expect(m.cpu.instructions == 2 + 40 * 4 + 1)
        #expect(Self.cached(m.cpu, TestMachine.code + 11) == nil)
        let head = m.cpu.decodeCache.blocks[DecodeCache.blockSlot(TestMachine.code + 6)]
        #expect(head.tag == (TestMachine.code + 6) | m.cpu.decodeCache.generation && head.count == 4)
        #expect(Self.cached(m.cpu, TestMachine.code + 16)?.kind == .incDec)
    }

    @Test func repeatedStringInstructionsRunFromTheCache() throws {
        // nop; mov $0x40000, %edi; mov $4, %ecx; movabs $0x1122334455667788, %rax; rep stosq;
        // mov $0x40000, %esi; mov $0x40100, %edi; mov $32, %ecx; rep movsb; hlt
        let code: [UInt8] = [0x90, 0xBF, 0x00, 0x00, 0x04, 0x00, 0xB9, 0x04, 0, 0, 0,
                             0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xF3, 0x48, 0xAB,
                             0xBE, 0x00, 0x00, 0x04, 0x00, 0xBF, 0x00, 0x01, 0x04, 0x00, 0xB9, 0x20, 0, 0, 0,
                             0xF3, 0xA4, 0xF4]
        let m = try TestMachine(code)
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        for i in 0..<4 {
            #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40100 + UInt64(i) * 8)) == 0x1122_3344_5566_7788)
        }
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40120)) == 0)
        #expect(m.cpu[.rcx] == 0 && m.cpu[.rdi] == 0x40120 && m.cpu[.rsi] == 0x40020)
        #expect(m.cpu.instructions == 9 + 4 + 32 + 1)  // each iteration counts, and the HLT
        #expect(Self.cached(m.cpu, TestMachine.code + 21)?.kind == .string)
        #expect(Self.cached(m.cpu, TestMachine.code + 39)?.kind == .string)
    }

    @Test func poolPagesABurstOfCodeUsedGoBack() throws {
        // 2000 × add $1, %eax (two pages of straight-line code: some 2000 entries), then
        // 1: jmp 1b. The burst commits pool pages; a few dozen slices of the small loop later
        // the pool has given them back.
        let code: [UInt8] = (0..<2000).flatMap { _ in [0x83, 0xC0, 0x01] as [UInt8] } + [0xEB, 0xFE]
        let m = try TestMachine(code)
        #expect(m.cpu.run(budget: 3000) == .budget)
        #expect(m.cpu[.rax] == 2000)
        let burst = m.cpu.decodeCache.residentBytes
        #expect(burst >= 80 << 10)
        for _ in 0..<(2 * DecodeCache.trimInterval) { #expect(m.cpu.run(budget: 1000) == .budget) }
        let idle = m.cpu.decodeCache.residentBytes
        #expect(idle <= 6 * 4096)
    }

    @Test func callsToAnotherPageRunFromTheCache() throws {
        // nop; mov $100, %ecx; 1: call 0x11000; dec %ecx; jnz 1b; hlt — and at 0x11000:
        // add $1, %eax; ret. Each call and return changes page; the blocks there are found
        // without the full decoder, which runs the HLT alone.
        let code: [UInt8] = [0x90, 0xB9, 100, 0, 0, 0, 0xE8, 0xF5, 0x0F, 0, 0, 0xFF, 0xC9, 0x75, 0xF7, 0xF4]
        let m = try TestMachine(code)
        try m.memory.write([0x83, 0xC0, 0x01, 0xC3], at: GuestPhysicalAddress(0x11000))
        #expect(m.run() == .halt && m.haltedAtEnd(code))
        #expect(m.cpu[.rax] == 100 && m.cpu[.rcx] == 0)
        #expect(m.cpu.instructions == 2 + 100 * 5 + 1)
        #expect(m.cpu.fullDecodes <= 2)
    }

    @Test func flagsAnotherEntryOverwritesAreNotRecordedYetExactAtEveryStop() throws {
        // mov $40, %ecx; 1: add $3, %eax; sub $1, %ecx; jnz 1b; hlt — ADD's flags are dead
        // (SUB overwrites them before the Jcc reads any), yet slices that end after the ADD
        // must see its flags: run one at a time (the ADD's flags checked against the SDM's)
        // and in slices of 2 and 5, the same RFLAGS at every stop.
        let code: [UInt8] = [0xB9, 40, 0, 0, 0, 0x83, 0xC0, 0x03, 0x83, 0xE9, 0x01, 0x75, 0xF8, 0xF4]
        let single = try TestMachine(code), two = try TestMachine(code), five = try TestMachine(code)
        for n in 1...100 {
            let before = single.cpu[.rax]
            #expect(single.cpu.run(budget: 1) == .budget)
            if single.cpu.rip == TestMachine.code + 8 {
                // Just after the ADD: its flags (CF, ZF, SF, OF clear here), as the SDM gives.
                let sum = single.cpu[.rax]
                let parity: UInt64 = UInt8(truncatingIfNeeded: sum).nonzeroBitCount % 2 == 0 ? 0x4 : 0
                #expect(single.cpu.rflags & 0x8D5 == parity | (before ^ 3 ^ sum) & 0x10)
            }
            for (m, slice) in [(two, 2), (five, 5)] where n % slice == 0 {
                #expect(m.cpu.run(budget: slice) == .budget)
                #expect(m.cpu.instructions == UInt64(n))
                #expect(m.cpu.rip == single.cpu.rip && m.cpu.rflags == single.cpu.rflags)
                #expect(m.cpu[.rax] == single.cpu[.rax] && m.cpu[.rcx] == single.cpu[.rcx])
            }
        }
        let whole = try TestMachine(code)
        #expect(whole.run() == .halt && whole.cpu[.rax] == 120)
        #expect(Self.cached(whole.cpu, TestMachine.code + 5)?.flagsDead == true)
        #expect(Self.cached(whole.cpu, TestMachine.code + 8)?.flagsDead == false)
        #expect(Self.cached(whole.cpu, TestMachine.code + 11)?.kind == .jccSub)
    }

    @Test func aJccAfterCMPOrTESTInItsBlockTakesTheSDMsBranches() throws {
        // mov $0, %eax; cmp|test %rsi, %rdi (or the 32-bit forms); jcc 1f; mov $1, %eax; 1: hlt
        // for every condition the specialised Jcc kinds take, over values around the sign and
        // carry edges: EAX is 0 when taken, as the SDM's flags say.
        let values: [UInt64] = [0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
                                0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, ~0]
        for wide in [true, false] {
            for logic in [false, true] {
                for cc: UInt8 in [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15] {
                    let compare: [UInt8] = (wide ? [0x48] : []) + [logic ? 0x85 : 0x39, 0xF7]
                    let code: [UInt8] = [0xB8, 0, 0, 0, 0] + compare + [0x70 | cc, 0x05, 0xB8, 1, 0, 0, 0, 0xF4]
                    for a in values {
                        for b in values {
                            let m = try TestMachine(code)
                            m.cpu[.rdi] = a
                            m.cpu[.rsi] = b
                            #expect(m.run() == .halt)
                            let mask: UInt64 = wide ? ~0 : 0xFFFF_FFFF, sign: UInt64 = wide ? 1 << 63 : 1 << 31
                            let x = a & mask, y = b & mask
                            let res = (logic ? x & y : x &- y) & mask
                            let cf = !logic && x < y, zf = res == 0, sf = res & sign != 0
                            let of = !logic && (x ^ y) & (x ^ res) & sign != 0
                            let base: Bool
                            switch cc & 0xE {
                            case 2: base = cf
                            case 4: base = zf
                            case 6: base = cf || zf
                            case 8: base = sf
                            case 12: base = sf != of
                            default: base = zf || sf != of
                            }
                            let taken = cc & 1 != 0 ? !base : base
                            #expect(m.cpu[.rax] == (taken ? 0 : 1), "cc \(cc) \(logic ? "test" : "cmp") \(wide ? 64 : 32)-bit \(a), \(b)")
                            let jcc = Self.cached(m.cpu, TestMachine.code + 5 + UInt64(compare.count))
                            #expect(jcc?.kind == (logic ? .jccLogic : .jccSub))
                        }
                    }
                }
            }
        }
    }
}
