import Glibc

// The native tier: hot blocks of the decode cache translated into x86-64 host code.
//
// A block run `nativeThreshold` times from the cache has its entries re-encoded, one by one
// from their decoded form (never copied from guest bytes), into host instructions that do
// the same operation at the same operand size on host registers, so the host CPU computes
// the result and all six arithmetic flags exactly as the guest's x86 would. Only a whitelist
// of kinds is translated (register ALU, MOV, shifts by an immediate, IMUL, INC/DEC, LEA,
// MOVZX/MOVSX, Jcc/JMP, loads and stores of 4 or 8 bytes, ALU with memory on either side,
// PUSH, POP, CALL and RET); the block's native code ends at the first entry outside it and exits
// to the interpreter there. Docs/softcpu.md describes the tier.
//
// The code's rules:
// - Guest registers live in host registers inside the code, loaded from `SoftCPU.regs` at
//   entry and stored back at every exit; host RSP is never a guest register (guest RSP gets
//   a pool register like any other), and the code touches no host memory but `regs`, the
//   TLB's arrays (read only) and guest pages the TLB maps.
// - Memory goes through the software TLB inline: the code looks up the entry the
//   interpreter would use, with flag-free instructions (LEA, NOT, RORX, MOVZX, JRCXZ) so the
//   guest's flags stay in the host's. A miss, an access crossing its page, or a write to a
//   page with cached code (such pages never get a write entry, see `markCode`) exits to the
//   interpreter *at* that instruction, with every register and flag exact; the interpreter
//   then takes the slow path (page walk, fault, invalidation).
// - Instructions are counted exactly: native code runs only when the budget covers the whole
//   block; a loop (the block's first branch back to its start) runs again inside the
//   code while a pass count the run loop gives it lasts, checked with JRCXZ (no flags) at
//   the top of each pass; every exit reports the instructions retired by its last pass.
// - The flags come in (the lazy flags evaluated) by SAHF and an ADD that sets OF, and go out
//   by PUSHFQ: the run loop stores them as plain flags (`lazyOp = .none`).
// - The code lives in a buffer written only while it is not executable (mmap, then mprotect
//   read-write to write and read-execute to run: never writable and executable at once),
//   bounded in size and emptied when full. A block's code is reachable only from its head,
//   whose tag dies with the decode cache's generation (every slice, every write to cached
//   code); a rebuilt block finds its code again only if the guest bytes it was made from are
//   unchanged (a copy is kept with the code).

/// Words after the 16 guest registers in ``SoftCPU/regs`` that native code and the run loop
/// exchange. The native code gets the pointer to `regs` as its only argument.
enum NativeSlot {
    /// In: the guest's flags for SAHF and OF (AL = 0x7F when OF is set, else 0; AH = the low
    /// byte of RFLAGS). Out: RFLAGS after the code (PUSHFQ).
    static let flags = 16
    /// Out: the guest RIP to go on at.
    static let rip = 17
    /// Out: instructions the last pass retired.
    static let partial = 18
    /// In: passes the budget covers. Out: passes not started.
    static let budget = 19
    /// In: ``TLB/base``.
    static let tlbBase = 20
    static let words = 24
}

/// ``DecodedBlock/native``: not translated yet, not translatable, or where the block's
/// native code is, at a 16-byte-aligned offset: a header, a copy of the guest bytes it was
/// made from, then the code.
enum NativeCode {
    static let none: UInt16 = 0, never: UInt16 = 1
    static func slot(_ offset: Int) -> UInt16 { UInt16(offset / 16 + 2) }
    static func offset(_ slot: UInt16) -> Int { (Int(slot) - 2) * 16 }
    // The header: the linear address the code was made for (its RIP-relative operands and
    // exits are linear), the instructions a pass of its loop retires, the block's
    // guest-physical address, the page offset and count of the guest bytes copied after the
    // header, the instructions the block retires, and where the code starts.
    static let linear = 0, loopRetired = 8, gpa = 16, bytesOffset = 24, bytesCount = 26, retired = 28, codeOffset = 30
    static let headerBytes = 32
}

/// The executable buffer of one vCPU: reserved once (512 KiB of address space, committed as
/// written), filled by a bump pointer and emptied with the decode cache.
final class NativeCodeBuffer {
    static let capacity = 512 << 10
    /// 64 memory entries take about 12 KiB; a block that does not fit is not translated.
    static let scratchCapacity = 16 << 10
    let base: UnsafeMutableRawPointer
    var used = 0
    /// Times it was full and emptied (for tests).
    var resets = 0
    /// Where a block is assembled before it is installed (allocated at the first
    /// translation: a vCPU that never runs hot code never needs it).
    private var scratchStorage: UnsafeMutablePointer<UInt8>?
    var scratch: UnsafeMutablePointer<UInt8> {
        if let scratchStorage { return scratchStorage }
        let made = UnsafeMutablePointer<UInt8>.allocate(capacity: Self.scratchCapacity)
        scratchStorage = made
        return made
    }

    init() {
        guard let raw = mmap(nil, Self.capacity, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              raw != MAP_FAILED else {
            fatalError("SoftCPU: cannot reserve \(Self.capacity) bytes for native code")
        }
        base = raw
        index.initialize(repeating: NativeCode.none, count: DecodeCache.blockSlots)
    }

    deinit {
        munmap(base, Self.capacity)
        index.deallocate()
        scratchStorage?.deallocate()
    }

    /// Code by the block's guest-physical address (``DecodeCache/blockSlot(_:)``): the
    /// latest block translated in each slot, found again when the decode cache rebuilds the
    /// block (every slice) if its guest bytes are the same.
    let index = UnsafeMutablePointer<UInt16>.allocate(capacity: DecodeCache.blockSlots)

    /// Drops all code (the buffer is full): the caller flushes the decode cache, whose blocks
    /// refer to it.
    func reset() {
        resets += 1
        used = 0
        index.update(repeating: NativeCode.none, count: DecodeCache.blockSlots)
    }

    /// The code made for the block at `gpa` retiring `retired` instructions, if its guest
    /// bytes are still those at `code` (the block's page).
    func find(gpa: UInt64, retired: UInt16, code: UnsafeRawPointer) -> UInt16 {
        let slot = index[DecodeCache.blockSlot(gpa)]
        guard slot > NativeCode.never else { return NativeCode.none }
        let header = UnsafeRawPointer(base + NativeCode.offset(slot))
        guard header.load(fromByteOffset: NativeCode.gpa, as: UInt64.self) == gpa,
              header.load(fromByteOffset: NativeCode.retired, as: UInt16.self) == retired else { return NativeCode.none }
        let offset = Int(header.load(fromByteOffset: NativeCode.bytesOffset, as: UInt16.self))
        let count = Int(header.load(fromByteOffset: NativeCode.bytesCount, as: UInt16.self))
        guard offset + count <= 4096, memcmp(header + NativeCode.headerBytes, code + offset, count) == 0 else { return NativeCode.none }
        return slot
    }

    /// Copies `count` bytes of assembled code from ``scratch`` into the buffer and returns
    /// their offset, or nil when the buffer is full. The pages written are read-write (not
    /// executable) while written, then read-execute.
    func install(_ count: Int) -> Int? {
        let offset = (used + 15) & ~15
        guard count > 0, offset + count <= Self.capacity else { return nil }
        let low = offset & ~4095, high = (offset + count + 4095) & ~4095
        guard mprotect(base + low, high - low, PROT_READ | PROT_WRITE) == 0 else { return nil }
        (base + offset).copyMemory(from: scratch, byteCount: count)
        guard mprotect(base + low, high - low, PROT_READ | PROT_EXEC) == 0 else { return nil }
        used = offset + count
        return offset
    }
}

/// A memory operand for native code: a constant linear address (RIP-relative), or host
/// registers and a displacement.
enum NativeAddress {
    case constant(UInt64)
    case operand(base: UInt8?, index: UInt8?, scale: UInt8, disp: Int32)
}

/// An x86-64 assembler for the few forms the translator needs, into a bounded buffer.
struct X86Emitter {
    let base: UnsafeMutablePointer<UInt8>
    let capacity: Int
    var count = 0
    var overflow = false

    mutating func byte(_ b: UInt8) {
        guard count < capacity else { overflow = true; return }
        base[count] = b
        count += 1
    }

    mutating func bytes(_ bs: UInt8...) { for b in bs { byte(b) } }

    mutating func u16(_ v: UInt16) { byte(UInt8(truncatingIfNeeded: v)); byte(UInt8(truncatingIfNeeded: v >> 8)) }

    mutating func u32(_ v: UInt32) { for i in 0..<4 { byte(UInt8(truncatingIfNeeded: v >> UInt32(8 * i))) } }

    mutating func u64(_ v: UInt64) { for i in 0..<8 { byte(UInt8(truncatingIfNeeded: v >> UInt64(8 * i))) } }

    /// Points the rel32 at `at` to `target` (offsets in the buffer).
    mutating func patch(_ at: Int, to target: Int) {
        guard at + 4 <= count else { overflow = true; return }
        let rel = UInt32(truncatingIfNeeded: Int32(truncatingIfNeeded: target - (at + 4)))
        for i in 0..<4 { base[at + i] = UInt8(truncatingIfNeeded: rel >> UInt32(8 * i)) }
    }

    /// A REX prefix when one is needed: W, and the fourth bits of ModRM.reg, SIB.index and
    /// ModRM.rm or SIB.base; `force` for the byte registers SPL, BPL, SIL and DIL.
    mutating func rex(w: Bool, r: UInt8 = 0, x: UInt8 = 0, b: UInt8 = 0, force: Bool = false) {
        let v: UInt8 = 0x40 | (w ? 8 : 0) | (r >> 3 & 1) << 2 | (x >> 3 & 1) << 1 | (b >> 3 & 1)
        if v != 0x40 || force { byte(v) }
    }

    /// `opcode` with a register ModRM: reg field `reg`, r/m field `rm`.
    mutating func rr(w: Bool, _ opcode: [UInt8], reg: UInt8, rm: UInt8, forceREX: Bool = false) {
        rex(w: w, r: reg, b: rm, force: forceREX)
        for o in opcode { byte(o) }
        byte(0xC0 | (reg & 7) << 3 | rm & 7)
    }

    /// `opcode` with a memory operand [base + index << scale + disp] (nil: none).
    mutating func rm(w: Bool, _ opcode: [UInt8], reg: UInt8, base: UInt8?, index: UInt8? = nil, scale: UInt8 = 0,
                     disp: Int32 = 0) {
        rex(w: w, r: reg, x: index ?? 0, b: base ?? 0)
        for o in opcode { byte(o) }
        let r = (reg & 7) << 3
        let indexBits = (index.map { $0 & 7 } ?? 4) << 3
        guard let b = base else {
            byte(r | 4)
            byte(scale << 6 | indexBits | 5)
            u32(UInt32(bitPattern: disp))
            return
        }
        let mod: UInt8 = disp == 0 && b & 7 != 5 ? 0 : Int32(Int8(truncatingIfNeeded: disp)) == disp ? 1 : 2
        if index == nil && b & 7 != 4 {
            byte(mod << 6 | r | b & 7)
        } else {
            byte(mod << 6 | r | 4)
            byte(scale << 6 | indexBits | b & 7)
        }
        if mod == 1 { byte(UInt8(truncatingIfNeeded: disp)) } else if mod == 2 { u32(UInt32(bitPattern: disp)) }
    }

    /// RORX dst, src, imm (BMI2): a rotate that leaves the flags alone.
    mutating func rorx(_ dst: UInt8, _ src: UInt8, _ imm: UInt8) {
        byte(0xC4)
        byte((~dst >> 3 & 1) << 7 | 1 << 6 | (~src >> 3 & 1) << 5 | 0x03)
        byte(0xFB)  // W1, no vvvv, L0, F2
        byte(0xF0)
        byte(0xC0 | (dst & 7) << 3 | src & 7)
        byte(imm)
    }

    /// MOV reg, imm64 in the shortest form that gives the same 64 bits.
    mutating func movImmediate(_ reg: UInt8, _ v: UInt64) {
        if v <= 0xFFFF_FFFF {
            rex(w: false, b: reg)
            byte(0xB8 | reg & 7)
            u32(UInt32(v))
        } else if Int64(Int32(truncatingIfNeeded: v)) == Int64(bitPattern: v) {
            rex(w: true, b: reg)
            byte(0xC7)
            byte(0xC0 | reg & 7)
            u32(UInt32(truncatingIfNeeded: v))
        } else {
            rex(w: true, b: reg)
            byte(0xB8 | reg & 7)
            u64(v)
        }
    }

    /// A rel32 jump (`cc` nil) or Jcc; returns where its rel32 is, to patch.
    mutating func jump(_ cc: UInt8? = nil) -> Int {
        if let cc { bytes(0x0F, 0x80 | cc) } else { byte(0xE9) }
        let at = count
        u32(0)
        return at
    }
}

extension SoftCPU {
    typealias NativeFunction = @convention(c) (UnsafeMutableRawPointer) -> Void

    /// Host registers that hold guest registers in native code (never RSP; RCX and R12-R15
    /// are the code's own).
    static let nativePool: [UInt8] = [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    static let hostRCX: UInt8 = 1, scratchC: UInt8 = 12, scratchB: UInt8 = 13, scratchA: UInt8 = 14, context: UInt8 = 15

    /// Whether this host can run native code (x86-64 with BMI2's RORX and SAHF in 64-bit
    /// mode), once per process.
    static let nativeTierAvailable: Bool = {
        #if arch(x86_64)
        guard let file = fopen("/proc/cpuinfo", "r") else { return false }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 16384)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("flags") {
                let flags = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
                return flags.contains("bmi2") && flags.contains("lahf_lm")
            }
        }
        return false
        #else
        return false
        #endif
    }()

    /// The native tier's default for new vCPUs: on where the host can run it, unless the
    /// environment says `VIREO_SOFTCPU_NATIVE=0`.
    static func nativeTierDefault() -> Bool {
        if let value = getenv("VIREO_SOFTCPU_NATIVE"), value.pointee == UInt8(ascii: "0") { return false }
        return nativeTierAvailable
    }

    /// The guest registers a whitelisted entry reads or writes, or nil when the entry is not
    /// one native code can do.
    static func nativeRegisters(_ d: DecodedInstruction) -> [UInt8]? {
        func memory() -> [UInt8] {
            var r: [UInt8] = []
            if d.base != DecodedInstruction.noRegister, d.base != DecodedInstruction.ripBase { r.append(d.base) }
            if d.index != DecodedInstruction.noRegister { r.append(d.index) }
            return r
        }
        switch d.kind {
        case .jcc, .jccSub, .jccLogic, .jmp, .call, .ret, .push, .pop: break
        default: guard d.size >= 4 else { return nil }
        }
        switch d.kind {
        case .movRR:
            guard d.second != .general else { return [d.reg, d.src] }
            guard d.second.registerOnly, d.secondSize >= 4, aluOperation(d.second) != nil else { return nil }
            switch d.second {
            case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR: return [d.reg, d.src, d.secondReg, d.secondSrc]
            default: return [d.reg, d.src, d.secondReg]
            }
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .imulRR, .imulRRI:
            return [d.reg, d.src]
        case .aluRR:
            return d.op <= 8 ? [d.reg, d.src] : nil
        case .addRI, .subRI, .cmpRI, .andRI, .orRI, .xorRI, .shlRI, .shrRI, .sarRI, .incDec, .movRI:
            return [d.reg]
        case .aluRI:
            return d.op <= 8 ? [d.reg] : nil
        case .movzxR, .movsxR:
            return d.src < 16 ? [d.reg, d.src] : nil
        case .lea, .load, .store:
            guard d.base == DecodedInstruction.ripBase || Int64(Int32(truncatingIfNeeded: d.disp)) == Int64(bitPattern: d.disp) else {
                return nil
            }
            return [d.reg] + memory()
        case .storeImm:
            guard d.base == DecodedInstruction.ripBase || Int64(Int32(truncatingIfNeeded: d.disp)) == Int64(bitPattern: d.disp) else {
                return nil
            }
            return memory()
        case .aluRM, .aluMR, .aluMI:
            guard d.op <= 8, d.base == DecodedInstruction.ripBase || Int64(Int32(truncatingIfNeeded: d.disp)) == Int64(bitPattern: d.disp) else {
                return nil
            }
            return d.kind == .aluMI ? memory() : [d.reg] + memory()
        case .push, .pop:
            return [d.reg, 4]
        case .call, .ret:
            return [4]
        case .jcc, .jccSub, .jccLogic, .jmp:
            return []
        default:
            return nil
        }
    }

    /// The ALU operation (0-7, 8 = TEST) or shift (4 SHL, 5 SHR, 7 SAR) of a specialised kind.
    static func aluOperation(_ kind: DecodedKind) -> UInt8? {
        switch kind {
        case .addRR, .addRI: return 0
        case .orRR, .orRI: return 1
        case .andRR, .andRI, .shlRI: return 4
        case .subRR, .subRI, .shrRI: return 5
        case .xorRR, .xorRI: return 6
        case .cmpRR, .cmpRI, .sarRI: return 7
        case .testRR: return 8
        default: return nil
        }
    }

    /// Translates the block at `head` (entered at linear `linear`) into native code; returns
    /// the value for ``DecodedBlock/native``.
    @inline(never)
    func translateNative(_ head: UnsafeMutablePointer<DecodedBlock>, linear: UInt64) -> UInt16 {
        let block = head.pointee
        let entries = decodeCache.entries + Int(block.start)
        let count = Int(block.count)
        // How many entries native code can do, and the guest registers they use.
        var used = [Bool](repeating: false, count: 16)
        var usedCount = 0
        var n = 0
        while n < count {
            guard let registers = Self.nativeRegisters(entries[n]) else { break }
            var extra = 0
            for r in Set(registers) where r < 16 && !used[Int(r)] { extra += 1 }
            guard registers.allSatisfy({ $0 < 16 }), usedCount + extra <= Self.nativePool.count else { break }
            for r in registers { if !used[Int(r)] { used[Int(r)] = true; usedCount += 1 } }
            n += 1
        }
        guard n > 0 else { return NativeCode.never }
        // Guest registers to host registers: the same number where the pool has it.
        var host = [UInt8](repeating: 0xFF, count: 16)
        var taken = [Bool](repeating: false, count: 16)
        for g in 0..<16 where used[g] && Self.nativePool.contains(UInt8(g)) {
            host[g] = UInt8(g)
            taken[g] = true
        }
        for g in 0..<16 where used[g] && host[g] == 0xFF {
            guard let h = Self.nativePool.first(where: { !taken[Int($0)] }) else { return NativeCode.never }
            host[g] = h
            taken[Int(h)] = true
        }
        // Each entry's linear address and the next one's (a forward JMP's is its target).
        var pcs = [UInt64](repeating: 0, count: n + 1)
        var pc = linear
        for k in 0..<n {
            pcs[k] = pc
            let d = entries[k]
            pc &+= UInt64(d.length) &+ (d.kind == .movRR && d.second != .general ? UInt64(d.secondLength) : 0)
            if d.kind == .jmp { pc &+= d.disp }
        }
        pcs[n] = pc
        let last = entries[n - 1]
        // The loop: the first branch back to the block's start (a JMP only ends a block)
        // goes to the top of the next pass instead of leaving.
        var loopEntry = -1
        for k in 0..<n {
            let d = entries[k]
            let isJcc = d.kind == .jcc || d.kind == .jccSub || d.kind == .jccLogic
            if isJcc && pcs[k] &+ UInt64(d.length) &+ d.disp == linear || d.kind == .jmp && k == n - 1 && pcs[n] == linear {
                loopEntry = k
                break
            }
        }
        // A call of native code costs about what a few interpreted instructions cost (the
        // host's callee-saved registers, the flags in and out): a block that does not loop is
        // translated only when native code covers at least 3 of its entries.
        guard loopEntry >= 0 || n >= nativeMinimumEntries else { return NativeCode.never }
        let loopRetired = loopEntry >= 0 ? entries[loopEntry].through : block.retired

        let buffer = decodeCache.nativeCode
        var a = X86Emitter(base: buffer.scratch, capacity: NativeCodeBuffer.scratchCapacity)
        let ctx = Self.context, rcx = Self.hostRCX, sa = Self.scratchA, sb = Self.scratchB, sc = Self.scratchC
        func slot(_ s: Int) -> Int32 { Int32(8 * s) }
        // Exits to emit after the body: where their jump is, the RIP and the instructions the
        // pass retired.
        var exits: [(at: Int, rip: UInt64, partial: UInt16)] = []
        // The header and the guest bytes the block was decoded from: from its first
        // instruction to the end of its last (forward jumps' gaps included).
        let gpa = block.tag & 0xFFFF_FFFF_FFFF
        let first = Int(gpa & 0xFFF)
        var bytesEnd = first, offset = first
        for k in 0..<count {
            let d = entries[k]
            offset += Int(d.length) + (d.kind == .movRR && d.second != .general ? Int(d.secondLength) : 0)
            bytesEnd = max(bytesEnd, offset)
            if d.kind == .jmp { offset &+= Int(Int64(bitPattern: d.disp)) }
        }
        guard bytesEnd <= 4096 else { return NativeCode.never }
        let codeStart = (NativeCode.headerBytes + (bytesEnd - first) + 15) & ~15
        a.u64(linear)
        a.u64(UInt64(loopRetired))
        a.u64(gpa)
        a.u16(UInt16(first))
        a.u16(UInt16(bytesEnd - first))
        a.u16(block.retired)
        a.u16(UInt16(codeStart))
        for i in first..<bytesEnd { a.byte(codeHost.load(fromByteOffset: i, as: UInt8.self)) }
        while a.count < codeStart { a.byte(0xCC) }

        // Prologue: callee-saved registers, the context, the flags, the guest registers.
        a.bytes(0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57)
        a.rr(w: true, [0x89], reg: 7, rm: ctx)  // mov %rdi, %r15
        // The flags without POPFQ (slow): ADD $1, %al sets OF exactly when AL is 0x7F, then
        // SAHF sets SF, ZF, AF, PF and CF from AH and leaves OF. RAX is loaded after.
        a.rm(w: false, [0x8B], reg: 0, base: ctx, disp: slot(NativeSlot.flags))  // mov flags, %eax
        a.bytes(0x04, 0x01, 0x9E)  // add $1, %al; sahf
        for g in 0..<16 where used[g] { a.rm(w: true, [0x8B], reg: host[g], base: ctx, disp: slot(g)) }
        // The top of a pass: stop when the passes the budget covers are done (no flags touched).
        let top = a.count
        a.rm(w: true, [0x8B], reg: rcx, base: ctx, disp: slot(NativeSlot.budget))
        a.bytes(0xE3, 0x02, 0xEB, 0x05)  // jrcxz +2; jmp +5
        exits.append((a.jump(), linear, loopRetired))
        a.rm(w: true, [0x8D], reg: rcx, base: rcx, disp: -1)
        a.rm(w: true, [0x89], reg: rcx, base: ctx, disp: slot(NativeSlot.budget))

        func h(_ g: UInt8) -> UInt8 { host[Int(g)] }
        func alu(_ kind: DecodedKind, op: UInt8, reg: UInt8, src: UInt8, imm: UInt64, size: UInt8) {
            let w = size == 8
            switch kind {
            case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .aluRR:
                a.rr(w: w, [op == 8 ? 0x85 : op << 3 | 1], reg: h(src), rm: h(reg))
            case .shlRI, .shrRI, .sarRI:
                a.rr(w: w, [0xC1], reg: op, rm: h(reg))
                a.byte(UInt8(truncatingIfNeeded: imm))
            default:  // with an immediate
                a.rr(w: w, [op == 8 ? 0xF7 : 0x81], reg: op == 8 ? 0 : op, rm: h(reg))
                a.u32(UInt32(truncatingIfNeeded: imm))
            }
        }
        var dynamicExits: [Int] = []
        // The TLB entry the interpreter would use (``SoftCPU/readPointer(_:)``,
        // ``SoftCPU/writePointer(_:)``) for `size` bytes at `address`: its tag must equal the
        // address's page exactly and the access must stay within the page, else the code
        // exits to the interpreter at `miss`. Leaves the address in R14 and the entry's addend
        // in RCX; false when the access always misses (a constant address crossing a page).
        // Flag-free throughout (LEA, NOT, RORX, MOVZX, JRCXZ), so the guest's flags stay in
        // the host's; R12-R14 and RCX are the code's own.
        func tlb(_ address: NativeAddress, size: UInt8, reading: Bool, miss: (UInt64, UInt16)) -> Bool {
            let tags = Int32(reading ? TLB.readTagOffset : TLB.writeTagOffset)
            let addends = Int32(reading ? TLB.readAddendOffset : TLB.writeAddendOffset)
            switch address {
            case .constant(let la):
                // Its entry, page and page crossing are known now.
                let index = Int32((la >> 12) & UInt64(TLB.entries - 1)) * 8
                guard la & 0xFFF <= 4096 - UInt64(size) else {
                    exits.append((a.jump(), miss.0, miss.1))
                    return false
                }
                a.rm(w: true, [0x8B], reg: sc, base: ctx, disp: slot(NativeSlot.tlbBase))
                a.rm(w: true, [0x8B], reg: rcx, base: sc, disp: tags + index)
                a.movImmediate(sa, 0 &- (la & ~0xFFF))
                a.rm(w: true, [0x8D], reg: rcx, base: rcx, index: sa)  // tag - page
                a.bytes(0xE3, 0x05)  // jrcxz +5: a hit
                exits.append((a.jump(), miss.0, miss.1))
                a.rm(w: true, [0x8B], reg: rcx, base: sc, disp: addends + index)
                a.movImmediate(sa, la)
            case .operand(let base, let index, let scale, let disp):
                a.rm(w: true, [0x8D], reg: sa, base: base, index: index, scale: scale, disp: disp)
                // R13 = the entry's index (bits 12-19 of the address); R12 = ~page: the
                // address rotated right by 12, then shifted left by 12 (LEA ×8 four times).
                a.rorx(sc, sa, 12)
                a.rr(w: false, [0x0F, 0xB6], reg: sb, rm: sc, forceREX: true)  // movzx %r12b, %r13d
                for _ in 0..<4 { a.rm(w: true, [0x8D], reg: sc, base: nil, index: sc, scale: 3, disp: 0) }
                a.rr(w: true, [0xF7], reg: 2, rm: sc)  // not %r12
                // RCX = (offset in the page + size - 1) >> 12: 0 unless the access crosses.
                a.rm(w: true, [0x8D], reg: rcx, base: sc, index: sa, scale: 0, disp: Int32(size))
                a.rorx(rcx, rcx, 12)
                a.rr(w: false, [0x0F, 0xB6], reg: rcx, rm: rcx)  // movzx %cl, %ecx
                a.bytes(0xE3, 0x05)  // jrcxz +5: within the page
                exits.append((a.jump(), miss.0, miss.1))
                // R13 = the TLB base + 8 × index; RCX = tag - page.
                a.rm(w: true, [0x8B], reg: rcx, base: ctx, disp: slot(NativeSlot.tlbBase))
                a.rm(w: true, [0x8D], reg: sb, base: rcx, index: sb, scale: 3)
                a.rm(w: true, [0x8B], reg: rcx, base: sb, disp: tags)
                a.rm(w: true, [0x8D], reg: rcx, base: rcx, index: sc, disp: 1)
                a.bytes(0xE3, 0x05)  // jrcxz +5: a hit
                exits.append((a.jump(), miss.0, miss.1))
                a.rm(w: true, [0x8B], reg: rcx, base: sb, disp: addends)
            }
            return true
        }
        for k in 0..<n {
            let d = entries[k]
            let w = d.size == 8
            let mask: UInt64 = w ? ~0 : 0xFFFF_FFFF
            let nextPC = pcs[k] &+ UInt64(d.length)
            switch d.kind {
            case .movRR:
                a.rr(w: w, [0x89], reg: h(d.src), rm: h(d.reg))
                if d.second != .general, let op = Self.aluOperation(d.second) {
                    let imm = d.second == .shlRI || d.second == .shrRI || d.second == .sarRI
                        ? UInt64(UInt32(bitPattern: d.secondImm)) : UInt64(bitPattern: Int64(d.secondImm))
                    alu(d.second, op: op, reg: d.secondReg, src: d.secondSrc, imm: imm, size: d.secondSize)
                }
            case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .aluRR, .addRI, .subRI, .cmpRI, .andRI, .orRI,
                 .xorRI, .aluRI, .shlRI, .shrRI, .sarRI:
                alu(d.kind, op: Self.aluOperation(d.kind) ?? d.op, reg: d.reg, src: d.src, imm: d.imm, size: d.size)
            case .incDec:
                a.rr(w: w, [0xFF], reg: d.op, rm: h(d.reg))
            case .imulRR:
                a.rr(w: w, [0x0F, 0xAF], reg: h(d.reg), rm: h(d.src))
            case .imulRRI:
                a.rr(w: w, [0x69], reg: h(d.reg), rm: h(d.src))
                a.u32(UInt32(truncatingIfNeeded: d.imm))
            case .movRI:
                a.movImmediate(h(d.reg), d.imm & mask)
            case .movzxR, .movsxR:
                let opcode: UInt8 = (d.kind == .movzxR ? 0xB6 : 0xBE) | (d.op == 2 ? 1 : 0)
                a.rr(w: w, [0x0F, opcode], reg: h(d.reg), rm: h(d.src), forceREX: d.op == 1)
            case .lea:
                if d.base == DecodedInstruction.ripBase {
                    a.movImmediate(h(d.reg), (nextPC &+ d.disp) & mask)
                } else {
                    a.rm(w: w, [0x8D], reg: h(d.reg), base: d.base == DecodedInstruction.noRegister ? nil : h(d.base),
                         index: d.index == DecodedInstruction.noRegister ? nil : h(d.index), scale: d.scale,
                         disp: Int32(truncatingIfNeeded: d.disp))
                }
            case .load, .store, .storeImm, .aluRM, .aluMR, .aluMI:
                // A read-modify-write needs the write entry (CMP and TEST only read).
                let reading = d.kind == .load || d.kind == .aluRM || d.op >= 7 && (d.kind == .aluMR || d.kind == .aluMI)
                let address: NativeAddress = d.base == DecodedInstruction.ripBase ? .constant(nextPC &+ d.disp)
                    : .operand(base: d.base == DecodedInstruction.noRegister ? nil : h(d.base),
                               index: d.index == DecodedInstruction.noRegister ? nil : h(d.index), scale: d.scale,
                               disp: Int32(truncatingIfNeeded: d.disp))
                // The access at the address (R14) plus the entry's addend (RCX).
                guard tlb(address, size: d.size, reading: reading, miss: (pcs[k], d.through &- UInt16(d.retired))) else { break }
                switch d.kind {
                case .load: a.rm(w: w, [0x8B], reg: h(d.reg), base: sa, index: rcx)
                case .store: a.rm(w: w, [0x89], reg: h(d.reg), base: sa, index: rcx)
                case .storeImm:
                    a.rm(w: w, [0xC7], reg: 0, base: sa, index: rcx)
                    a.u32(UInt32(truncatingIfNeeded: d.imm))
                case .aluRM:  // ALU with a memory source: loaded into R13, then the register form
                    a.rm(w: w, [0x8B], reg: sb, base: sa, index: rcx)
                    a.rr(w: w, [d.op == 8 ? 0x85 : d.op << 3 | 1], reg: sb, rm: h(d.reg))
                case .aluMR:  // on the guest's memory itself, as the guest's x86 would
                    a.rm(w: w, [d.op == 8 ? 0x85 : d.op << 3 | 1], reg: h(d.reg), base: sa, index: rcx)
                default:
                    a.rm(w: w, [d.op == 8 ? 0xF7 : 0x81], reg: d.op == 8 ? 0 : d.op, base: sa, index: rcx)
                    a.u32(UInt32(truncatingIfNeeded: d.imm))
                }
            case .push, .call:
                // The stack pointer moves only once the store is done (a miss leaves it).
                guard tlb(.operand(base: h(4), index: nil, scale: 0, disp: -8), size: 8, reading: false,
                          miss: (pcs[k], d.through &- UInt16(d.retired))) else { break }
                if d.kind == .push {
                    a.rm(w: true, [0x89], reg: h(d.reg), base: sa, index: rcx)
                } else {
                    a.movImmediate(sb, nextPC)
                    a.rm(w: true, [0x89], reg: sb, base: sa, index: rcx)
                }
                a.rm(w: true, [0x8D], reg: h(4), base: h(4), disp: -8)
                if d.kind == .call { exits.append((a.jump(), nextPC &+ d.disp, d.through)) }
            case .pop, .ret:
                guard tlb(.operand(base: h(4), index: nil, scale: 0, disp: 0), size: 8, reading: true,
                          miss: (pcs[k], d.through &- UInt16(d.retired))) else { break }
                a.rm(w: true, [0x8B], reg: sb, base: sa, index: rcx)
                a.rm(w: true, [0x8D], reg: h(4), base: h(4), disp: 8)
                if d.kind == .pop {
                    a.rr(w: true, [0x89], reg: sb, rm: h(d.reg))  // after RSP: POP %RSP loads it
                } else {
                    // The return address is the exit's RIP: straight to the common exit.
                    a.rr(w: true, [0x89], reg: sb, rm: rcx)
                    a.rm(w: true, [0xC7], reg: 0, base: ctx, disp: slot(NativeSlot.partial))
                    a.u32(UInt32(d.through))
                    dynamicExits.append(a.jump())
                }
            case .jcc, .jccSub, .jccLogic:
                let target = nextPC &+ d.disp
                let at = a.jump(d.op & 0xF)
                if k == loopEntry {
                    a.patch(at, to: top)
                } else {
                    exits.append((at, target, d.through))
                }
            case .jmp:
                if k == loopEntry { a.patch(a.jump(), to: top) }
            default:
                return NativeCode.never  // not reached: nativeRegisters admitted only the above
            }
        }
        // The end of the native code: the block's end, or the first entry it does not do.
        if !(loopEntry == n - 1 && last.kind == .jmp) { exits.append((a.jump(), pcs[n], last.through)) }
        var toCommon: [Int] = []
        for exit in exits {
            a.patch(exit.at, to: a.count)
            a.movImmediate(rcx, exit.rip)
            a.rm(w: true, [0xC7], reg: 0, base: ctx, disp: slot(NativeSlot.partial))
            a.u32(UInt32(exit.partial))
            toCommon.append(a.jump())
        }
        // The common exit: flags, RIP and the guest registers out, the host's back.
        for at in toCommon + dynamicExits { a.patch(at, to: a.count) }
        a.byte(0x9C)  // pushfq
        a.rm(w: false, [0x8F], reg: 0, base: ctx, disp: slot(NativeSlot.flags))  // pop flags
        a.rm(w: true, [0x89], reg: rcx, base: ctx, disp: slot(NativeSlot.rip))
        for g in 0..<16 where used[g] { a.rm(w: true, [0x89], reg: host[g], base: ctx, disp: slot(g)) }
        a.bytes(0x41, 0x5F, 0x41, 0x5E, 0x41, 0x5D, 0x41, 0x5C, 0x5D, 0x5B, 0xC3)
        guard !a.overflow else { return NativeCode.never }
        guard let offset = buffer.install(a.count) else {
            // Full: all code goes, and with it the blocks that refer to it.
            buffer.reset()
            decodeCache.flush()
            return NativeCode.never
        }
        nativeTranslations &+= 1
        let slot = NativeCode.slot(offset)
        buffer.index[DecodeCache.blockSlot(gpa)] = slot
        return slot
    }

    /// Counts a run of the untranslated block at `head`; true when it is hot enough to
    /// translate.
    @inline(__always) func countHit(_ head: UnsafeMutablePointer<DecodedBlock>) -> Bool {
        let hits = head.pointee.hits &+ 1
        head.pointee.hits = hits
        return hits >= nativeThreshold
    }

    /// The linear address the native code at `slot` was translated for.
    @inline(__always) func nativeLinear(_ slot: UInt16) -> UInt64 {
        (decodeCache.nativeCode.base + NativeCode.offset(slot)).load(as: UInt64.self)
    }

    /// Runs the native code of `head` (entered at its ``nativeLinear(_:)``) with `left`
    /// instructions of budget, at least the block's. Returns the next RIP and the
    /// instructions retired.
    @inline(never)
    func runNative(_ head: UnsafeMutablePointer<DecodedBlock>, left: Int) -> (pc: UInt64, retired: Int) {
        let block = head.pointee
        let header = decodeCache.nativeCode.base + NativeCode.offset(block.native)
        // Every pass may run to the block's end: pass i starts only when what is left after
        // i - 1 passes of the loop covers the whole block.
        let pass = Int(header.load(fromByteOffset: NativeCode.loopRetired, as: UInt64.self))
        let passes = (left - Int(block.retired)) / pass + 1
        let flags = arithmeticFlags()
        regs[NativeSlot.flags] = (flags & 0xFF) << 8 | (flags & Flags.OF != 0 ? 0x7F : 0)
        regs[NativeSlot.budget] = UInt64(passes)
        let code = header + Int(header.load(fromByteOffset: NativeCode.codeOffset, as: UInt16.self))
        unsafeBitCast(code, to: NativeFunction.self)(UnsafeMutableRawPointer(regs))
        flagsStored = (flagsStored & ~Flags.arithmetic) | (regs[NativeSlot.flags] & Flags.arithmetic)
        lazyOp = .none
        let started = passes - Int(regs[NativeSlot.budget])
        let retired = (started - 1) * pass + Int(regs[NativeSlot.partial])
        nativeRuns &+= UInt64(started)
        nativeRetired &+= UInt64(retired)
        return (regs[NativeSlot.rip], retired)
    }
}
