import Foundation
import Testing
import VireoABI
import VireoCore
import VireoKVM
@testable import VireoSoftCPU

/// Random integer instruction sequences run on KVM and on the SoftCPU from the same registers
/// and flags; every general register and every flag the SDM defines after the sequence must
/// agree. On hosts whose KVM is kvm_pvm, KVM's side runs in its instruction emulator (about
/// 2 M instructions/s), so the count stays modest: 2000 sequences of 50, 100 000 instructions.
@Suite(.enabled(if: KVMSystem.unavailableReason() == nil, "needs /dev/kvm")) struct DifferentialTests {
    /// 2000 in CI; `VIREO_DIFFERENTIAL_SEQUENCES` asks for more (and a different seed with
    /// `VIREO_DIFFERENTIAL_SEED`) when hunting.
    static let sequences = Int(ProcessInfo.processInfo.environment["VIREO_DIFFERENTIAL_SEQUENCES"] ?? "") ?? 2000
    static let length = 50
    static let seed = UInt64(ProcessInfo.processInfo.environment["VIREO_DIFFERENTIAL_SEED"] ?? "") ?? 0x5EED_50F7_C0DE_0001

    /// SplitMix64: a fixed seed, so a failure names a sequence that can be replayed.
    struct Random {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
        mutating func pick<T>(_ xs: [T]) -> T { xs[below(xs.count)] }
    }

    static let CF: UInt64 = 1, PF: UInt64 = 4, AF: UInt64 = 0x10, ZF: UInt64 = 0x40, SF: UInt64 = 0x80, OF: UInt64 = 0x800
    static let all: UInt64 = 0x8D5
    /// Registers the sequences use: all but RSP.
    static let usable = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]

    /// One random instruction; updates `defined`, the flags whose values the SDM defines now.
    static func instruction(_ r: inout Random, defined: inout UInt64) -> [UInt8] {
        let dst = r.pick(usable), src = r.pick(usable)
        let wide = r.below(3) != 0  // 64-bit, else 32-bit
        func rex(_ reg: Int, _ rm: Int, w: Bool) -> [UInt8] {
            let b = UInt8(0x40 | (w ? 8 : 0) | (reg >= 8 ? 4 : 0) | (rm >= 8 ? 1 : 0))
            return b == 0x40 ? [] : [b]
        }
        func modrm(_ reg: Int, _ rm: Int) -> UInt8 { UInt8(0xC0 | (reg & 7) << 3 | (rm & 7)) }
        func flags(written: UInt64, undefined: UInt64) { defined = (defined | written) & ~undefined }
        func conditions() -> [UInt8] {
            let uses: [UInt64] = [OF, OF, CF, CF, ZF, ZF, CF | ZF, CF | ZF, SF, SF, PF, PF, SF | OF, SF | OF, ZF | SF | OF, ZF | SF | OF]
            return (0..<16).filter { uses[$0] & ~defined == 0 }.map { UInt8($0) }
        }
        switch r.below(19) {
        case 15:  // 8-bit and 16-bit ALU forms (with and without REX, so AH..BH appear too)
            let kind = r.below(8)
            if kind == 2 || kind == 3, defined & CF == 0 { return [] }
            flags(written: all, undefined: kind == 1 || kind == 4 || kind == 6 ? AF : 0)
            if r.below(2) == 0 {
                let (a, b) = (r.below(8), r.below(8))
                return [UInt8(kind * 8), modrm(a, b)]
            }
            return [0x66] + rex(src, dst, w: false) + [UInt8(kind * 8 + 1), modrm(src, dst)]
        case 16:  // ALU and MOV with memory at [0x40000 + 8k]
            let kind = r.below(9)
            let displacement = UInt32(0x40000 + 8 * r.below(32))
            let address = [0x04, 0x25] + (0..<4).map { UInt8(truncatingIfNeeded: displacement >> (8 * $0)) }
            let direction = r.below(2) == 0 ? 1 : 3  // r/m, r or r, r/m
            if kind == 8 {
                return rex(src, 0, w: wide) + [UInt8(0x89 + (direction == 3 ? 2 : 0)), UInt8((src & 7) << 3) | address[0]] + address.dropFirst()
            }
            if kind == 2 || kind == 3, defined & CF == 0 { return [] }
            flags(written: all, undefined: kind == 1 || kind == 4 || kind == 6 ? AF : 0)
            return rex(src, 0, w: wide) + [UInt8(kind * 8 + direction), UInt8((src & 7) << 3) | address[0]] + address.dropFirst()
        case 17:  // SHLD/SHRD by an immediate, RCL/RCR by 1
            if r.below(2) == 0 {
                guard defined & CF != 0 else { return [] }
                flags(written: CF | OF, undefined: 0)
                return rex(0, dst, w: wide) + [0xD1, modrm(2 + r.below(2), dst)]
            }
            let count = r.below(wide ? 64 : 32)
            if count != 0 { flags(written: all, undefined: AF | (count == 1 ? 0 : OF)) }
            return rex(src, dst, w: wide) + [0x0F, r.below(2) == 0 ? 0xA4 : 0xAC, modrm(src, dst), UInt8(count)]
        case 18:  // BSF, BSR, ADC/SBB with an immediate
            if r.below(2) == 0 {
                flags(written: all, undefined: CF | OF | SF | AF | PF)
                return rex(dst, src, w: wide) + [0x0F, r.below(2) == 0 ? 0xBC : 0xBD, modrm(dst, src)]
            }
            guard defined & CF != 0 else { return [] }
            flags(written: all, undefined: 0)
            return rex(0, dst, w: wide) + [0x83, modrm(2 + r.below(2), dst), UInt8(truncatingIfNeeded: r.next())]
        case 0, 1, 2:  // ALU r/m, r
            let kind = r.below(8)
            if kind == 2 || kind == 3, defined & CF == 0 { return [] }
            flags(written: all, undefined: kind == 1 || kind == 4 || kind == 6 ? AF : 0)
            return rex(src, dst, w: wide) + [UInt8(kind * 8 + 1), modrm(src, dst)]
        case 3:  // ALU r/m, imm8 or imm32; ALU AL, imm8 and eAX/RAX, imm32 (the short forms)
            let kind = r.below(8)
            if kind == 2 || kind == 3, defined & CF == 0 { return [] }
            flags(written: all, undefined: kind == 1 || kind == 4 || kind == 6 ? AF : 0)
            let form = r.below(4)
            if form == 0 { return rex(0, dst, w: wide) + [0x83, modrm(kind, dst), UInt8(truncatingIfNeeded: r.next())] }
            let imm = UInt32(truncatingIfNeeded: r.next())
            let imm32 = (0..<4).map { UInt8(truncatingIfNeeded: imm >> (8 * $0)) }
            if form == 2 { return [UInt8(kind * 8 + 4), UInt8(truncatingIfNeeded: imm)] }
            if form == 3 { return rex(0, 0, w: wide) + [UInt8(kind * 8 + 5)] + imm32 }
            return rex(0, dst, w: wide) + [0x81, modrm(kind, dst)] + imm32
        case 4:  // INC, DEC, NOT, NEG
            switch r.below(4) {
            case 0, 1:
                flags(written: all & ~CF, undefined: 0)
                return rex(0, dst, w: wide) + [0xFF, modrm(r.below(2), dst)]
            case 2: return rex(0, dst, w: wide) + [0xF7, modrm(2, dst)]
            default:
                flags(written: all, undefined: 0)
                return rex(0, dst, w: wide) + [0xF7, modrm(3, dst)]
            }
        case 5:  // shifts and rotates by an immediate (or by 1)
            let op = r.pick([0, 1, 4, 5, 7])
            let count = r.below(4) == 0 ? 1 : r.below(wide ? 64 : 32)
            if count != 0 {
                if op < 2 { flags(written: CF | OF, undefined: count == 1 ? 0 : OF) } else {
                    flags(written: all, undefined: AF | (count == 1 ? 0 : OF))
                }
            }
            if count == 1 && r.below(2) == 0 { return rex(0, dst, w: wide) + [0xD1, modrm(op, dst)] }
            return rex(0, dst, w: wide) + [0xC1, modrm(op, dst), UInt8(count)]
        case 6:  // IMUL r, r/m and MUL
            flags(written: all, undefined: SF | ZF | AF | PF)
            if r.below(3) == 0 { return rex(0, src, w: wide) + [0xF7, modrm(4, src)] }
            return rex(dst, src, w: wide) + [0x0F, 0xAF, modrm(dst, src)]
        case 7:  // MOV r, imm; MOV r, r
            if r.below(2) == 0 {
                let imm = UInt32(truncatingIfNeeded: r.next())
                return rex(0, dst, w: false) + [UInt8(0xB8 + dst & 7)] + (0..<4).map { UInt8(truncatingIfNeeded: imm >> (8 * $0)) }
            }
            return rex(src, dst, w: wide) + [0x89, modrm(src, dst)]
        case 8:  // MOVZX, MOVSX, MOVSXD
            let op = r.pick([0xB6, 0xB7, 0xBE, 0xBF, 0x63])
            if op == 0x63 { return rex(dst, src, w: true) + [0x63, modrm(dst, src)] }
            return [UInt8(0x48 | (dst >= 8 ? 4 : 0) | (src >= 8 ? 1 : 0)), 0x0F, UInt8(op), modrm(dst, src)]
        case 9:  // CMOVcc, SETcc
            let usable = conditions()
            guard !usable.isEmpty else { return [] }
            let cc = r.pick(usable)
            if r.below(2) == 0 { return rex(dst, src, w: wide) + [0x0F, 0x40 + cc, modrm(dst, src)] }
            return [UInt8(0x40 | (dst >= 8 ? 1 : 0)), 0x0F, 0x90 + cc, modrm(0, dst)]
        case 10:  // BT, BTS, BTR, BTC with an immediate
            flags(written: CF | OF | SF | AF | PF, undefined: OF | SF | AF | PF)
            return rex(0, dst, w: wide) + [0x0F, 0xBA, modrm(4 + r.below(4), dst), UInt8(r.below(256))]
        case 11:  // LEA r, [base + index*scale + disp8]
            let index = r.pick(usable), scale = r.below(4)
            let b = UInt8(0x48 | (dst >= 8 ? 4 : 0) | (index >= 8 ? 2 : 0) | (src >= 8 ? 1 : 0))
            return [b, 0x8D, UInt8(0x44 | (dst & 7) << 3), UInt8(scale << 6 | (index & 7) << 3 | (src & 7)), UInt8(truncatingIfNeeded: r.next())]
        case 12:  // XCHG, TEST, BSWAP
            switch r.below(3) {
            case 0: return rex(src, dst, w: wide) + [0x87, modrm(src, dst)]
            case 1:
                flags(written: all, undefined: AF)
                return rex(src, dst, w: wide) + [0x85, modrm(src, dst)]
            default: return rex(0, dst, w: wide) + [0x0F, UInt8(0xC8 + dst & 7)]
            }
        case 13:  // CMP (so conditionals see compares often)
            flags(written: all, undefined: 0)
            return rex(src, dst, w: wide) + [0x39, modrm(src, dst)]
        default:  // CQO/CDQ, CDQE/CWDE, XADD, CMPXCHG
            switch r.below(4) {
            case 0: return wide ? [0x48, 0x99] : [0x99]
            case 1: return wide ? [0x48, 0x98] : [0x98]
            case 2:
                flags(written: all, undefined: 0)
                return rex(src, dst, w: wide) + [0x0F, 0xC1, modrm(src, dst)]
            default:
                flags(written: all, undefined: 0)
                return rex(src, dst, w: wide) + [0x0F, 0xB1, modrm(src, dst)]
            }
        }
    }

    static func get(_ r: X86Registers, _ i: Int) -> UInt64 {
        [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15][i]
    }

    static func set(_ r: inout X86Registers, _ i: Int, _ v: UInt64) {
        switch i {
        case 0: r.rax = v
        case 1: r.rcx = v
        case 2: r.rdx = v
        case 3: r.rbx = v
        case 4: r.rsp = v
        case 5: r.rbp = v
        case 6: r.rsi = v
        case 7: r.rdi = v
        case 8: r.r8 = v
        case 9: r.r9 = v
        case 10: r.r10 = v
        case 11: r.r11 = v
        case 12: r.r12 = v
        case 13: r.r13 = v
        case 14: r.r14 = v
        default: r.r15 = v
        }
    }

    /// One machine of each kind, reused across sequences.
    final class Engines {
        let memory: GuestMemory
        let vm: KVMVirtualMachine
        let vcpu: KVMVirtualCPU
        static let code: UInt64 = 0x10000
        /// Instructions the SoftCPU ran as native code (the native tier translates every block
        /// on its first run in these machines), over all comparisons.
        var nativeRetired: UInt64 = 0

        init() throws {
            memory = try GuestMemory(ramBytes: 4 << 20)
            let kvm = try KVMSystem()
            vm = try kvm.makeVirtualMachine(memory: memory)
            vcpu = try vm.makeVirtualCPU(id: 0)
            try vcpu.setCPUID(XenCPUID.guestCPUID(supported: kvm.supportedCPUID(), vcpu: 0, domain: DomainID(1)))
            try LongModeSetup.enter(memory, vcpu, rip: Self.code)
        }

        /// Runs `instructions` then HLT on both from `start`; the differences, or nil when they agree
        /// (an empty list when the SoftCPU did not reach the end).
        func compare(_ instructions: [[UInt8]], from start: X86Registers, defined: UInt64) throws -> [String]? {
            let bytes: [UInt8] = instructions.flatMap { $0 } + [0xF4]
            try memory.write(bytes, at: GuestPhysicalAddress(Self.code))
            try memory.fill(0, at: GuestPhysicalAddress(0x40000), count: 256)
            vcpu.registers = start
            var exit = try vcpu.run()
            while exit == .interrupted { exit = try vcpu.run() }
            guard exit == .halt else { return ["KVM stopped with \(exit)"] }
            let expected = vcpu.registers
            let machine = try TestMachine(bytes, interruptsOn: false)
            for i in 0..<16 { machine.cpu[GPR(rawValue: i)!] = DifferentialTests.get(start, i) }
            machine.cpu.rflags = start.rflags
            let softExit = machine.run()
            nativeRetired += machine.cpu.nativeRetired
            // HLT with IF clear ends the SoftCPU's run as a shutdown at the end of the code.
            guard case .shutdown = softExit, machine.cpu.rip == TestMachine.code + UInt64(bytes.count) else {
                return ["the SoftCPU stopped with \(softExit) at 0x\(String(machine.cpu.rip, radix: 16))"]
            }
            var differences: [String] = []
            let data = GuestPhysicalAddress(0x40000)
            let kvmData = try memory.bytes(at: data, count: 256), softData = try machine.memory.bytes(at: data, count: 256)
            if kvmData != softData { differences.append("memory at 0x40000: KVM \(DifferentialTests.hex(kvmData)), SoftCPU \(DifferentialTests.hex(softData))") }
            for i in 0..<16 where i != 4 && DifferentialTests.get(expected, i) != machine.cpu[GPR(rawValue: i)!] {
                differences.append("\(GPR(rawValue: i)!): KVM 0x\(String(DifferentialTests.get(expected, i), radix: 16)), SoftCPU 0x\(String(machine.cpu[GPR(rawValue: i)!], radix: 16))")
            }
            let mask = defined & DifferentialTests.all
            if expected.rflags & mask != machine.cpu.rflags & mask {
                differences.append("flags (defined 0x\(String(mask, radix: 16))): KVM 0x\(String(expected.rflags & mask, radix: 16)), SoftCPU 0x\(String(machine.cpu.rflags & mask, radix: 16))")
            }
            return differences.isEmpty ? nil : differences
        }
    }

    static func hex(_ bytes: [UInt8]) -> String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ") }

    @Test func randomIntegerSequencesAgreeWithKVM() throws {
        let engines = try Engines()
        var random = Random(state: Self.seed)
        var compared = 0, mismatches = 0
        for sequence in 0..<Self.sequences {
            var defined = Self.all
            var instructions: [[UInt8]] = []
            var definedAfter: [UInt64] = []
            while instructions.count < Self.length {
                let one = Self.instruction(&random, defined: &defined)
                if one.isEmpty { continue }
                instructions.append(one)
                definedAfter.append(defined)
            }
            var start = X86Registers()
            let edges: [UInt64] = [0, 1, UInt64.max, 0x8000_0000, 0x7FFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF, 63, 64]
            for i in Self.usable { Self.set(&start, i, random.below(4) == 0 ? random.pick(edges) : random.next()) }
            start.rsp = 0x8000
            start.rip = Engines.code
            start.rflags = 0x2 | (random.next() & Self.all)
            compared += instructions.count
            guard let differences = try engines.compare(instructions, from: start, defined: defined) else { continue }
            mismatches += 1
            guard mismatches <= 8 else { continue }
            // The first instruction after which the engines disagree.
            var first = instructions.count
            for n in 1...instructions.count where try engines.compare(Array(instructions.prefix(n)), from: start, defined: definedAfter[n - 1]) != nil {
                first = n
                break
            }
            Issue.record("""
                sequence \(sequence): first differs after instruction \(first) (\(Self.hex(instructions[first - 1]))), \
                preceded by \(Self.hex(Array(instructions.prefix(first - 1).suffix(2).joined()))): \
                \((try engines.compare(Array(instructions.prefix(first)), from: start, defined: definedAfter[first - 1]) ?? differences).joined(separator: "; "))
                """)
        }
        #expect(mismatches == 0, "\(mismatches) of \(Self.sequences) sequences differ")
        #expect(compared >= 100_000)
        // Where the host can run the native tier, much of each sequence ran through it.
        print("DifferentialTests: \(engines.nativeRetired) of \(compared) instructions ran as native code")
        #expect(!SoftCPU.nativeTierAvailable || engines.nativeRetired >= UInt64(compared) / 5)
    }
}
