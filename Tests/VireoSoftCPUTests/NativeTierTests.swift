import Testing
import VireoABI
import VireoCore
@testable import VireoSoftCPU

/// The native tier (SoftCPUNative.swift): hot blocks translated into host code. Each test runs
/// the same code with the tier (every block translated on its first run) and without it (the
/// interpreter alone, itself checked against KVM by DifferentialTests), in the same slices,
/// and expects the same registers, flags, RIP, instruction count and memory at every stop.
@Suite(.enabled(if: SoftCPU.nativeTierAvailable, "the host cannot run the native tier (x86-64 with BMI2)"))
struct NativeTierTests {
    /// Runs `code` on both tiers in slices of `budget` until HLT (or `limit` instructions),
    /// comparing the machines after every slice; returns the native machine.
    @discardableResult
    static func agree(_ code: [UInt8], budget: Int, limit: Int = 200_000, setUp: (TestMachine) throws -> Void = { _ in },
                      sourceLocation: SourceLocation = #_sourceLocation) throws -> TestMachine {
        let native = try TestMachine(code, native: true), interpreted = try TestMachine(code, native: false)
        try setUp(native)
        try setUp(interpreted)
        var run = 0
        while run < limit {
            let a = native.cpu.run(budget: budget), b = interpreted.cpu.run(budget: budget)
            run += budget
            #expect(a == b, "exit after \(run)", sourceLocation: sourceLocation)
            let stop = "slice of \(budget), stop \(run / budget)"
            #expect(native.cpu.rip == interpreted.cpu.rip, "RIP at \(stop)", sourceLocation: sourceLocation)
            #expect(native.cpu.instructions == interpreted.cpu.instructions, "instructions at \(stop)", sourceLocation: sourceLocation)
            #expect(native.cpu.rflags == interpreted.cpu.rflags, "RFLAGS at \(stop)", sourceLocation: sourceLocation)
            for r in GPR.allCases where native.cpu[r] != interpreted.cpu[r] {
                Issue.record("\(r) at \(stop): native 0x\(String(native.cpu[r], radix: 16)), interpreter 0x\(String(interpreted.cpu[r], radix: 16))",
                             sourceLocation: sourceLocation)
            }
            guard a == b, native.cpu.rip == interpreted.cpu.rip else { break }
            if a != .budget { break }
        }
        let data = GuestPhysicalAddress(TestMachine.data)
        #expect(try native.memory.bytes(at: data, count: 8192) == interpreted.memory.bytes(at: data, count: 8192),
                sourceLocation: sourceLocation)
        if budget >= 20 {  // slices shorter than a block run only the interpreter
            #expect(native.cpu.nativeTranslations > 0 && native.cpu.nativeRuns > 0, "the native tier ran", sourceLocation: sourceLocation)
        }
        #expect(interpreted.cpu.nativeRuns == 0, sourceLocation: sourceLocation)
        return native
    }

    /// cpubench's loop for 1000 iterations: mov $1000, %esi; movabs $0x9E3779B97F4A7C15, %rcx;
    /// xor %edx, %edx; 1: sub $1, %rsi; jb 2f; mov %rcx, %rdi; shl $13, %rdi; xor %rcx, %rdi;
    /// mov %rdi, %r8; shr $7, %r8; xor %rdi, %r8; mov %r8, %rcx; shl $17, %rcx; xor %r8, %rcx;
    /// mov %rcx, 0x40000; imul $31, %rdx, %rdi; mov %rcx, %rdx; shr $11, %rdx; add %rdi, %rdx;
    /// mov %rdx, 0x30000(%rip); jmp 1b; 2: hlt
    static let xorshift: [UInt8] = [
        0xbe, 0xe8, 0x03, 0x00, 0x00, 0x48, 0xb9, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, 0x31, 0xd2, 0x48, 0x83,
        0xee, 0x01, 0x72, 0x3d, 0x48, 0x89, 0xcf, 0x48, 0xc1, 0xe7, 0x0d, 0x48, 0x31, 0xcf, 0x49, 0x89, 0xf8, 0x49, 0xc1,
        0xe8, 0x07, 0x49, 0x31, 0xf8, 0x4c, 0x89, 0xc1, 0x48, 0xc1, 0xe1, 0x11, 0x4c, 0x31, 0xc1, 0x48, 0x89, 0x0c, 0x25,
        0x00, 0x00, 0x04, 0x00, 0x48, 0x6b, 0xfa, 0x1f, 0x48, 0x89, 0xca, 0x48, 0xc1, 0xea, 0x0b, 0x48, 0x01, 0xfa, 0x48,
        0x89, 0x15, 0x00, 0x00, 0x03, 0x00, 0xeb, 0xbd, 0xf4,
    ]

    /// mov $300, %ecx; mov $0x12345678, %eax; xor %ebx, %ebx; 1: lea 0x11(%rax,%rbx,4), %rdx;
    /// movzbl %dl, %esi; movsbq %al, %rdi; add %esi, %ebx; adc %rdi, %rbx; sbb $3, %rax;
    /// imul %rdx, %rax; inc %r9; dec %r10d; test $0x40, %al; jz 3f; or $0x1000, %r11;
    /// 3: and $0xfffffff0, %r11d; mov 0x40000(,%rcx,8), %r12; add %rax, %r12;
    /// mov %r12, 0x40000(,%rcx,8); movl $7, 0x40004(,%rcx,8); cmp $5, %ecx; ja 4f; neg %r13;
    /// 4: dec %ecx; jnz 1b; hlt — side exits both ways, a loop whose back edge is not the
    /// block's last entry, a NEG the tier leaves to the interpreter.
    static let mixed: [UInt8] = [
        0xb9, 0x2c, 0x01, 0x00, 0x00, 0xb8, 0x78, 0x56, 0x34, 0x12, 0x31, 0xdb, 0x48, 0x8d, 0x54, 0x98, 0x11, 0x0f, 0xb6,
        0xf2, 0x48, 0x0f, 0xbe, 0xf8, 0x01, 0xf3, 0x48, 0x11, 0xfb, 0x48, 0x83, 0xd8, 0x03, 0x48, 0x0f, 0xaf, 0xc2, 0x49,
        0xff, 0xc1, 0x41, 0xff, 0xca, 0xa8, 0x40, 0x74, 0x07, 0x49, 0x81, 0xcb, 0x00, 0x10, 0x00, 0x00, 0x41, 0x83, 0xe3,
        0xf0, 0x4c, 0x8b, 0x24, 0xcd, 0x00, 0x00, 0x04, 0x00, 0x49, 0x01, 0xc4, 0x4c, 0x89, 0x24, 0xcd, 0x00, 0x00, 0x04,
        0x00, 0xc7, 0x04, 0xcd, 0x04, 0x00, 0x04, 0x00, 0x07, 0x00, 0x00, 0x00, 0x83, 0xf9, 0x05, 0x77, 0x03, 0x49, 0xf7,
        0xdd, 0xff, 0xc9, 0x75, 0xa8, 0xf4,
    ]

    @Test func cpubenchsLoopAgreesWithTheInterpreterAtEveryStop() throws {
        for budget in [1, 2, 3, 7, 16, 17, 100, 10_000] { try Self.agree(Self.xorshift, budget: budget) }
        let m = try Self.agree(Self.xorshift, budget: 100_000)
        // One pass of the loop is 18 instructions: the whole run is one call of its code
        // (and a few of the blocks around it).
        #expect(m.cpu.nativeRuns >= 999)
        #expect(m.cpu.instructions == 3 + 1000 * 18 + 2 + 1)
    }

    @Test func mixedLoopAgreesWithTheInterpreterAtEveryStop() throws {
        for budget in [1, 2, 5, 13, 64, 10_000] { try Self.agree(Self.mixed, budget: budget) }
    }

    @Test func stackOperationsCallsAndMemorySourcesAgreeWithTheInterpreter() throws {
        // mov $200, %ecx; xor %eax, %eax; 1: push %rcx; push %rax; call 2f; add (%rsp), %rax;
        // pop %rdx; pop %rsi; cmp 0x40000, %esi; sbb 0x30000(%rip), %rax; test %rdx, 8(%rsp);
        // dec %ecx; jnz 1b; push %rsp; pop %rsp; hlt; 2: lea 3(%rax,%rcx,2), %rax;
        // mov %rsp, %rbx; ret — PUSH, POP (of RSP too), CALL and RET through the TLB, and
        // ALU with a memory source (register, absolute and RIP-relative addresses).
        let code: [UInt8] = [
            0xb9, 0xc8, 0x00, 0x00, 0x00, 0x31, 0xc0, 0x51, 0x50, 0xe8, 0x20, 0x00, 0x00, 0x00, 0x48, 0x03, 0x04, 0x24, 0x5a,
            0x5e, 0x3b, 0x34, 0x25, 0x00, 0x00, 0x04, 0x00, 0x48, 0x1b, 0x05, 0x00, 0x00, 0x03, 0x00, 0x48, 0x85, 0x54, 0x24,
            0x08, 0xff, 0xc9, 0x75, 0xdc, 0x54, 0x5c, 0xf4, 0x48, 0x8d, 0x44, 0x48, 0x03, 0x48, 0x89, 0xe3, 0xc3,
        ]
        for budget in [1, 2, 5, 9, 33, 10_000] {
            let m = try Self.agree(code, budget: budget)
            #expect(m.cpu[.rsp] == TestMachine.stackTop && m.cpu[.rbx] == TestMachine.stackTop - 24)
        }
    }

    @Test func readModifyWritesOnMemoryAgreeWithTheInterpreter() throws {
        // mov $100, %ecx; mov $0x40100, %edi; mov $7, %eax; 1: addl $1, 0x30000(%rip);
        // add %rax, (%rdi); sub %ecx, 8(%rdi); cmpq $500, (%rdi); jb 2f; adcl $3, 12(%rdi);
        // 2: testl $0x10, 8(%rdi); jz 3f; xor %rcx, 16(%rdi); 3: orq $-2, 24(%rdi,%rcx,8);
        // andl $0xff0, 0x40fff (across a page: the interpreter splits it); dec %ecx; jnz 1b; hlt
        let code: [UInt8] = [
            0xb9, 0x64, 0x00, 0x00, 0x00, 0xbf, 0x00, 0x01, 0x04, 0x00, 0xb8, 0x07, 0x00, 0x00, 0x00, 0x83, 0x05, 0x00, 0x00,
            0x03, 0x00, 0x01, 0x48, 0x01, 0x07, 0x29, 0x4f, 0x08, 0x48, 0x81, 0x3f, 0xf4, 0x01, 0x00, 0x00, 0x72, 0x04, 0x83,
            0x57, 0x0c, 0x03, 0xf7, 0x47, 0x08, 0x10, 0x00, 0x00, 0x00, 0x74, 0x04, 0x48, 0x31, 0x4f, 0x10, 0x48, 0x83, 0x4c,
            0xcf, 0x18, 0xfe, 0x81, 0x24, 0x25, 0xff, 0x0f, 0x04, 0x00, 0xf0, 0x0f, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xc4, 0xf4,
        ]
        for budget in [1, 3, 8, 50, 10_000] {
            let m = try Self.agree(code, budget: budget) { m in
                try m.memory.write([UInt8](repeating: 0xA5, count: 8), at: GuestPhysicalAddress(0x40FF8))
            }
            #expect(try m.memory.load(UInt32.self, at: GuestPhysicalAddress(0x40016)) == 100)
            #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40100)) == 700)
        }
    }

    @Test func flagsAtTheExitAreTheSDMs() throws {
        // mov $2, %ecx; xor %eax, %eax; 1: add $0x20000000, %eax; sub $1, %ecx; jnz 1b;
        // add $0x40000000, %eax; hlt — the last ADD overflows into the sign bit: OF, SF and
        // PF (a zero low byte) set, CF, ZF and AF clear, left by native code. (ADD to EAX
        // in its short form, opcode 05.)
        let code: [UInt8] = [0xb9, 0x02, 0x00, 0x00, 0x00, 0x31, 0xc0, 0x05, 0x00, 0x00, 0x00, 0x20, 0x83, 0xe9, 0x01, 0x75,
                             0xf6, 0x05, 0x00, 0x00, 0x00, 0x40, 0xf4]
        let m = try Self.agree(code, budget: 10_000)
        #expect(m.cpu[.rax] == 0x8000_0000)
        #expect(m.cpu.rflags & 0x8D5 == 0x884)
    }

    @Test func aStoreIntoItsOwnBlockExitsAndTheNewCodeRuns() throws {
        // mov $5, %ecx; xor %ebx, %ebx; 1: mov $1, %eax; add %eax, %ebx; movl %ebx, 1b+1(%rip);
        // dec %ecx; jnz 1b; hlt — each pass writes the MOV's immediate for the next: the
        // store's page holds cached code, so native code exits there to the interpreter,
        // which drops the code. EAX: 1, 1, 2, 4, 8; EBX = 16.
        let code: [UInt8] = [0xb9, 0x05, 0x00, 0x00, 0x00, 0x31, 0xdb, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x01, 0xc3, 0x89, 0x1d,
                             0xf4, 0xff, 0xff, 0xff, 0xff, 0xc9, 0x75, 0xef, 0xf4]
        for budget in [1, 3, 10_000] {
            let m = try Self.agree(code, budget: budget)
            #expect(m.cpu[.rax] == 8 && m.cpu[.rbx] == 16)
        }
    }

    @Test func storesThatMissTheTLBExitAndGoOn() throws {
        // mov $300, %ecx; mov $0x100000, %edi; 1: mov %rcx, (%rdi); add $4096, %rdi; dec %ecx;
        // jnz 1b; hlt — 300 pages, more than the TLB's 256 entries: every store misses once,
        // leaves native code at the store, and the loop goes on natively.
        let code: [UInt8] = [0xb9, 0x2c, 0x01, 0x00, 0x00, 0xbf, 0x00, 0x00, 0x10, 0x00, 0x48, 0x89, 0x0f, 0x48, 0x81, 0xc7,
                             0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf2, 0xf4]
        for budget in [7, 10_000] {
            let m = try Self.agree(code, budget: budget)
            for page in [0, 1, 255, 256, 299] {
                #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x10_0000 + UInt64(page) * 4096)) == UInt64(300 - page))
            }
        }
    }

    @Test func accessesTheTLBHasNoEntryForOrThatCrossAPageGoToTheInterpreter() throws {
        // mov $8, %edi; mov $3, %ecx; 1: mov %rcx, (%rdi); mov %rcx, 0x40ffc;
        // mov %ecx, 0x42fe3(%rip) (0x52ffe); mov 0x40ffa, %rdx; dec %ecx; jnz 1b;
        // movabs $0x8000000000000008, %rdi; mov %rcx, (%rdi); hlt — the first store meets
        // page 0's empty TLB entry (an address next to the empty tag's value 1), three
        // accesses cross a page (split by the interpreter), the last is non-canonical: #GP.
        let code: [UInt8] = [
            0xbf, 0x08, 0x00, 0x00, 0x00, 0xb9, 0x03, 0x00, 0x00, 0x00, 0x48, 0x89, 0x0f, 0x48, 0x89, 0x0c, 0x25, 0xfc, 0x0f,
            0x04, 0x00, 0x89, 0x0d, 0xe3, 0x2f, 0x04, 0x00, 0x48, 0x8b, 0x14, 0x25, 0xfa, 0x0f, 0x04, 0x00, 0xff, 0xc9, 0x75,
            0xe3, 0x48, 0xbf, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x48, 0x89, 0x0f, 0xf4,
        ]
        for budget in [1, 4, 10_000] {
            let m = try Self.agree(code, budget: budget)
            #expect(m.exceptionVector == 13)
            #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(8)) == 1)
            #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40FFC)) == 1)
            #expect(try m.memory.load(UInt32.self, at: GuestPhysicalAddress(0x52FFE)) == 1)
            #expect(m.cpu[.rdx] == 1 << 16)
        }
    }

    @Test func aLoadFromAMissingPageFaultsAtTheLoad() throws {
        // mov $0x50000, %eax; mov $4, %edx; 1: mov (%rax), %rcx; add $4096, %rax; dec %edx;
        // jnz 1b; hlt — with 0x52000 not present: #PF on the third pass, RIP at the load,
        // CR2 = 0x52000, RCX still the second page's value.
        let code: [UInt8] = [0xb8, 0x00, 0x00, 0x05, 0x00, 0xba, 0x04, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x08, 0x48, 0x05, 0x00,
                             0x10, 0x00, 0x00, 0xff, 0xca, 0x75, 0xf3, 0xf4]
        let m = try Self.agree(code, budget: 10_000) { m in
            try m.memory.store(UInt64(0x51), at: GuestPhysicalAddress(0x51000))
            try m.setPTE(0x52000, 0)
        }
        #expect(m.exceptionVector == 14)
        #expect(m.cpu.cr2 == 0x52000)
        #expect(m.cpu[.rcx] == 0x51)
        #expect(try m.stackWord(1) == TestMachine.code + 10)
    }

    @Test func codeTheHostRewritesIsTranslatedAnewAndOnlyThen() throws {
        // 1: mov $1, %eax; add $1, %ebx; jmp 1b — translated in the first run; the next runs
        // (each a new slice, which drops the decode cache) find the same bytes and run the
        // same code; the host rewrites the immediate: the next run translates and runs it.
        let m = try TestMachine([0xB8, 1, 0, 0, 0, 0x83, 0xC3, 0x01, 0xEB, 0xF6])
        #expect(m.cpu.run(budget: 300) == .budget && m.cpu[.rax] == 1 && m.cpu[.rbx] == 100)
        #expect(m.cpu.nativeRuns >= 99)
        let translations = m.cpu.nativeTranslations
        for run in 2...4 { #expect(m.cpu.run(budget: 300) == .budget && m.cpu[.rbx] == 100 * UInt64(run)) }
        #expect(m.cpu.nativeTranslations == translations)
        try m.memory.write([5], at: GuestPhysicalAddress(TestMachine.code + 1))
        #expect(m.cpu.run(budget: 300) == .budget && m.cpu[.rax] == 5 && m.cpu[.rbx] == 500)
        #expect(m.cpu.nativeTranslations > translations)
    }

    @Test func aBlockOfSixtyStoresAgreesWithTheInterpreter() throws {
        // mov $10, %ecx; mov $0x40000, %edi; 1: 60 × mov %rax, 0x10(%rdi,%rcx,8); dec %ecx;
        // jnz 1b; hlt — the largest native code a block makes (every entry a TLB check).
        let body: [UInt8] = (0..<60).flatMap { _ in [0x48, 0x89, 0x44, 0xCF, 0x10] as [UInt8] }
        let back = UInt32(bitPattern: Int32(10 - (10 + body.count + 2 + 6)))  // jnz rel32 to the loop's start
        let code: [UInt8] = [0xB9, 10, 0, 0, 0, 0xBF, 0x00, 0x00, 0x04, 0x00] + body + [0xFF, 0xC9, 0x0F, 0x85]
            + (0..<4).map { UInt8(truncatingIfNeeded: back >> (8 * $0)) } + [0xF4]
        let m = try Self.agree(code, budget: 10_000) { m in m.cpu[.rax] = 0x1122_3344_5566_7788 }
        #expect(try m.memory.load(UInt64.self, at: GuestPhysicalAddress(0x40000 + 0x10 + 8)) == 0x1122_3344_5566_7788)
        #expect(m.cpu.nativeRetired >= 9 * 62)
    }

    @Test func aFullCodeBufferStartsAgain() throws {
        // 2000 blocks of 64 entries (add $1, %eax), each translated at its first run: more
        // code than the buffer holds. It empties itself (and the cache) and goes on.
        let code: [UInt8] = (0..<(2000 * 64)).flatMap { _ in [0x83, 0xC0, 0x01] as [UInt8] } + [0xF4]
        let m = try TestMachine(code)
        #expect(m.run(limit: 200_000) == .halt)
        #expect(m.cpu[.rax] == 2000 * 64)
        #expect(m.cpu.decodeCache.nativeCode.resets >= 1)
        #expect(m.cpu.nativeTranslations >= 1900)
    }

    @Test func codeTheGuestRewritesOnAnotherPageIsTranslatedAnew() throws {
        // mov $40, %ecx; 1: call 0x11000; add %eax, %ebx; movl %ecx, 0x11001; dec %ecx; jnz 1b;
        // hlt — and at 0x11000: mov $1, %eax; xor %edx, %edx; add %edx, %eax; ret. Each pass
        // rewrites (from native code, which leaves the store to the interpreter: the page
        // holds cached code) the immediate the function's native code was made with: EBX sums
        // 1 + 40 + 39 + ... + 2.
        let code: [UInt8] = [0xB9, 40, 0, 0, 0, 0xE8, 0xF6, 0x0F, 0, 0, 0x01, 0xC3, 0x89, 0x0C, 0x25, 0x01, 0x10, 0x01, 0x00,
                             0xFF, 0xC9, 0x75, 0xEE, 0xF4]
        let m = try Self.agree(code, budget: 10_000) { m in
            try m.memory.write([0xB8, 1, 0, 0, 0, 0x31, 0xD2, 0x01, 0xD0, 0xC3], at: GuestPhysicalAddress(0x11000))
        }
        #expect(m.cpu[.rbx] == 1 + (2...40).reduce(0, +))
    }
}
