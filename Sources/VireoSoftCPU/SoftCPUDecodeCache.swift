import Glibc
import VireoCore

/// One instruction decoded once: what to do (`kind`), its operands and its length. Made from
/// the bytes of a RAM code page in 64-bit mode with no prefix but REX; anything else is kept
/// as `.general`, which runs through the full decoder (``SoftCPU/step()``).
struct DecodedInstruction {
    /// The instruction's guest-physical address with the cache's generation in bits 48-63;
    /// ``DecodeCache/invalid`` or 0 (a slot never filled) for an empty slot.
    var tag: UInt64
    /// The memory operand's displacement; for branches the displacement from the next instruction.
    var disp: UInt64
    /// An immediate operand (ALU, MOV, shift count).
    var imm: UInt64
    var kind: DecodedKind
    var length: UInt8
    /// Operand size in bytes (4 or 8).
    var size: UInt8
    /// The register operand written (or compared, or pushed).
    var reg: UInt8
    /// The register source (register forms).
    var src: UInt8
    /// ALU operation (0-7, 8 = TEST), shift kind (4-7), INC (0) or DEC (1), or condition code.
    var op: UInt8
    /// Memory operand: base register (`noRegister`, or `ripBase` for RIP-relative), index, scale.
    var base: UInt8
    var index: UInt8
    var scale: UInt8
    /// A register MOV fused with the register-only operation after it (`mov %rcx, %rdi;
    /// shl $13, %rdi`, the two-operand idiom): that operation's kind (`.general` for none),
    /// registers, size, length and immediate (a shift count or a sign-extended imm32).
    var second: DecodedKind = .general
    var secondReg: UInt8 = 0
    var secondSrc: UInt8 = 0
    var secondSize: UInt8 = 0
    var secondLength: UInt8 = 0
    var secondImm: Int32 = 0
    /// Instructions this entry retires: 1, or 2 when fused.
    var retired: UInt8 = 1

    static let noRegister: UInt8 = 0xFF
    static let ripBase: UInt8 = 16
}

enum DecodedKind: UInt8 {
    case general
    case movRR, aluRR, aluRI, shiftRI, incDec, imulRR, imulRRI, movRI
    case load, store, aluRM, aluMR, aluMI, lea, imulRM, imulRMI, storeImm
    case jcc, jmp, call, ret, push, pop
    // The commonest ALU operations and shifts on registers, each its own case so that one
    // dispatch does the whole instruction.
    case addRR, subRR, cmpRR, andRR, orRR, xorRR, testRR
    case addRI, subRI, cmpRI, andRI, orRI, xorRI
    case shlRI, shrRI, sarRI

    /// Kinds a fused MOV may carry as its second operation: register-only, so they never
    /// fault (a fault between the two would need RIP between them).
    var registerOnly: Bool {
        switch self {
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .addRI, .subRI, .cmpRI, .andRI, .orRI, .xorRI,
             .shlRI, .shrRI, .sarRI:
            return true
        default:
            return false
        }
    }

    /// The specialised kind of a register-register (`immediate` false) or register-immediate
    /// ALU operation `op` (0-7, 8 = TEST), if there is one.
    static func alu(_ op: UInt8, immediate: Bool) -> DecodedKind? {
        switch op {
        case 0: return immediate ? .addRI : .addRR
        case 1: return immediate ? .orRI : .orRR
        case 4: return immediate ? .andRI : .andRR
        case 5: return immediate ? .subRI : .subRR
        case 6: return immediate ? .xorRI : .xorRR
        case 7: return immediate ? .cmpRI : .cmpRR
        case 8: return immediate ? nil : .testRR
        default: return nil
        }
    }
}

/// The decode cache: per vCPU, direct-mapped by guest-physical address (8 pages' worth of
/// byte offsets, so a page's instructions never collide with each other), allocated once.
/// Keyed by physical address, it survives CR3 loads and INVLPG; it is invalidated
/// - page by page when this vCPU writes a page that holds cached code: such a page gets no
///   write TLB entry, so its first write takes the slow path, which drops the page's entries
///   (a page invalidated ``DecodeCache/maxInvalidations`` times is never cached again: code
///   and data sharing a page);
/// - wholesale (a generation bump, O(1)) at every ``SoftCPU/run(budget:)``, when the
///   guest-physical map changes and on serializing instructions (CPUID, IRET), so writes by
///   the host or other vCPUs are seen by the rules x86 gives cross-modifying code.
final class DecodeCache {
    static let slots = 8 * 4096
    static let invalid: UInt64 = ~0
    static let maxInvalidations: UInt8 = 16
    /// Per RAM frame: 0 no cached code, 1 cached code (writes trap), 2 never cached.
    static let noCode: UInt8 = 0, hasCode: UInt8 = 1, uncacheable: UInt8 = 2

    let entries: UnsafeMutablePointer<DecodedInstruction>
    let frameState: UnsafeMutablePointer<UInt8>
    let frameInvalidations: UnsafeMutablePointer<UInt8>
    let frames: Int
    /// Bits 48-63 of every live tag (never 0xFFFF, so no live tag equals `invalid`).
    var generation: UInt64 = 1 << 48

    /// The entries' bytes: an anonymous mapping, so the host commits only the pages of slots a
    /// guest's code has used (an idle domain's cache costs a few pages, not 1.5 MiB). Its zero
    /// bytes are empty slots: tag 0 matches no live tag, whose generation bits are never 0, and
    /// kind 0 is `.general`.
    static let entryBytes = slots * MemoryLayout<DecodedInstruction>.stride

    init(ramFrames: Int) {
        frames = ramFrames
        guard let raw = mmap(nil, Self.entryBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED else {
            fatalError("SoftCPU: cannot map \(Self.entryBytes) bytes for the decode cache")
        }
        entries = raw.bindMemory(to: DecodedInstruction.self, capacity: Self.slots)
        frameState = .allocate(capacity: max(frames, 1))
        frameState.initialize(repeating: Self.noCode, count: max(frames, 1))
        frameInvalidations = .allocate(capacity: max(frames, 1))
        frameInvalidations.initialize(repeating: 0, count: max(frames, 1))
    }

    deinit {
        munmap(UnsafeMutableRawPointer(entries), Self.entryBytes)
        frameState.deallocate()
        frameInvalidations.deallocate()
    }

    @inline(__always) static func slot(_ gpa: UInt64) -> Int {
        Int(truncatingIfNeeded: gpa & UInt64(slots - 1))
    }

    /// Drops every entry (O(1): live tags carry the generation; every 65535th flush clears).
    func flush() {
        generation &+= 1 << 48
        if generation >> 48 == 0xFFFF || generation == 0 {
            generation = 1 << 48
            for i in 0..<Self.slots { entries[i].tag = Self.invalid }
        }
    }

    /// Drops the entries of guest frame `frame` (a write reached it).
    func invalidate(frame: Int) {
        frameState[frame] = Self.noCode
        frameInvalidations[frame] &+= 1
        if frameInvalidations[frame] >= Self.maxInvalidations { frameState[frame] = Self.uncacheable }
        let page = UInt64(frame) << 12
        let first = Self.slot(page)
        for i in first..<(first + 4096) where entries[i].tag & 0xFFFF_FFFF_F000 == page {
            entries[i].tag = Self.invalid
        }
    }
}

extension SoftCPU {
    // MARK: Invalidation hooks

    /// Called by the TLB fill for a write to RAM frame `frame` (and by the page walk when it
    /// sets accessed or dirty bits): a page with cached code loses it.
    @inline(__always) func noteWrite(frame: UInt64) {
        guard frame < UInt64(decodeCache.frames) else { return }
        if decodeCache.frameState[Int(frame)] == DecodeCache.hasCode { decodeCache.invalidate(frame: Int(frame)) }
    }

    /// Code is about to be cached in `frame`: from now on writes to it must reach
    /// ``noteWrite(frame:)``, so write translations already in the TLB for it are dropped.
    func markCode(frame: UInt64) {
        decodeCache.frameState[Int(frame)] = DecodeCache.hasCode
        let host = UInt64(UInt(bitPattern: memory.hostBase)) &+ frame << 12
        for i in 0..<TLB.entries where tlb.writeTag[i] != TLB.invalid && tlb.writeTag[i] &+ tlb.writeAddend[i] == host {
            tlb.writeTag[i] = TLB.invalid
        }
    }

    /// Drops every decoded instruction (the runner calls it after writing guest code itself;
    /// every ``run(budget:)`` starts with it anyway).
    public func flushDecodeCache() { decodeCache.flush() }

    // MARK: The cached loop

    /// The decoded instruction at `pc` (RIP), decoding it now if the cache lacks it; nil when RIP is
    /// not on the current code page (the full decoder finds the page), the page is not RAM or
    /// not 64-bit code, the instruction's 16-byte window leaves the page, or the instruction is
    /// not one the cache decodes: the caller runs ``step()`` then.
    @inline(__always) func cachedInstruction(at pc: UInt64, _ view: CacheView) -> UnsafeMutablePointer<DecodedInstruction>? {
        let offset = pc & 0xFFF
        guard pc & ~0xFFF == view.page, view.frameAddress != DecodeCache.invalid, offset <= 4096 - 16 else {
            return nil
        }
        let gpa = view.frameAddress | offset
        let entry = view.entries + DecodeCache.slot(gpa)
        let tag = gpa | view.generation
        if entry.pointee.tag != tag, !fill(entry, gpa: gpa, tag: tag) { return nil }
        return entry.pointee.kind == .general ? nil : entry
    }

    /// What the cached loop reads for every instruction, loaded once per run of cached
    /// instructions (and again after a fault is delivered, which may change CS and the page).
    struct CacheView {
        let page: UInt64
        let frameAddress: UInt64
        let entries: UnsafeMutablePointer<DecodedInstruction>
        let generation: UInt64
    }

    @inline(__always) func cacheView() -> CacheView {
        CacheView(page: codePage, frameAddress: codeFrameAddress, entries: decodeCache.entries, generation: decodeCache.generation)
    }

    /// Decodes the instruction at `gpa` (on the current code page) into `entry`, fusing a
    /// register MOV with the register-only operation after it; false when the page is not to
    /// be cached.
    @inline(never)
    func fill(_ entry: UnsafeMutablePointer<DecodedInstruction>, gpa: UInt64, tag: UInt64) -> Bool {
        let frame = gpa >> 12
        switch decodeCache.frameState[Int(frame)] {
        case DecodeCache.uncacheable: return false
        case DecodeCache.noCode: markCode(frame: frame)
        default: break
        }
        let offset = Int(gpa & 0xFFF)
        let code = UnsafeRawPointer(codeHost + offset)
        entry.pointee = Self.decode(code, tag: tag)
        let length = Int(entry.pointee.length)
        if entry.pointee.kind == .movRR, offset + length <= 4096 - 16 {
            // The operation after it is on the same page, so writes there drop both.
            let next = Self.decode(code + length, tag: tag)
            if next.kind.registerOnly {
                entry.pointee.second = next.kind
                entry.pointee.secondReg = next.reg
                entry.pointee.secondSrc = next.src
                entry.pointee.secondSize = next.size
                entry.pointee.secondLength = next.length
                entry.pointee.secondImm = Int32(truncatingIfNeeded: Int64(bitPattern: next.imm))
                entry.pointee.retired = 2
            }
        }
        return true
    }

    /// The effective address of a decoded memory operand (64-bit addressing, flat segments).
    @inline(__always) func address(_ e: UnsafeMutablePointer<DecodedInstruction>, _ pc: UInt64) -> UInt64 {
        let d = e.pointee
        var a = d.disp
        if d.base != DecodedInstruction.noRegister {
            a &+= d.base == DecodedInstruction.ripBase ? pc &+ UInt64(d.length) : regs[Int(d.base)]
        }
        if d.index != DecodedInstruction.noRegister { a &+= regs[Int(d.index)] << UInt64(d.scale) }
        return a
    }

    /// Executes the decoded instruction at `pc` and returns the next RIP. The caller keeps RIP
    /// in a register meanwhile and stores it in ``rip`` when it leaves the cached loop or on a
    /// fault: as in the decoder, nothing changes before the last access that can fault, so a
    /// fault restarts the instruction at `pc`.
    @inline(__always) func executeDecoded(_ e: UnsafeMutablePointer<DecodedInstruction>, at pc: UInt64) throws(CPUFault) -> UInt64 {
        let d = e.pointee
        let size = Int(d.size)
        let mask: UInt64 = size == 8 ? ~0 : 0xFFFF_FFFF
        let next = pc &+ UInt64(d.length)
        // ALU operation 8 is TEST: AND's flags, no result written (nor for CMP, 7).
        let kind = d.op == 8 ? 4 : Int(d.op)
        let writes = d.op < 7
        switch d.kind {
        case .movRR:
            regs[Int(d.reg)] = regs[Int(d.src)] & mask
            if d.second != .general {
                let size2 = Int(d.secondSize)
                registerOperation(d.second, Int(d.secondReg), Int(d.secondSrc),
                                  UInt64(bitPattern: Int64(d.secondImm)), size2, size2 == 8 ? ~0 : 0xFFFF_FFFF)
                return next &+ UInt64(d.secondLength)
            }
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .addRI, .subRI, .cmpRI, .andRI, .orRI, .xorRI,
             .shlRI, .shrRI, .sarRI:
            registerOperation(d.kind, Int(d.reg), Int(d.src), d.imm, size, mask)
        case .aluRR:
            let r = alu(kind, regs[Int(d.reg)] & mask, regs[Int(d.src)] & mask, size)
            if writes { regs[Int(d.reg)] = r }
        case .aluRI:
            let r = alu(kind, regs[Int(d.reg)] & mask, d.imm & mask, size)
            if writes { regs[Int(d.reg)] = r }
        case .shiftRI:
            let v = regs[Int(d.reg)] & mask
            regs[Int(d.reg)] = d.imm != 0 ? shift(Int(d.op), v, d.imm, size) : v
        case .incDec:
            regs[Int(d.reg)] = incDec(regs[Int(d.reg)] & mask, size, dec: d.op != 0)
        case .imulRR:
            regs[Int(d.reg)] = imulTruncated(regs[Int(d.reg)] & mask, regs[Int(d.src)] & mask, size)
        case .imulRRI:
            regs[Int(d.reg)] = imulTruncated(regs[Int(d.src)] & mask, d.imm & mask, size)
        case .movRI:
            regs[Int(d.reg)] = d.imm & mask
        case .load:
            regs[Int(d.reg)] = try read(address(e, pc), size)
        case .store:
            try write(address(e, pc), size, regs[Int(d.reg)])
        case .storeImm:
            try write(address(e, pc), size, d.imm)
        case .aluRM:
            let s = try read(address(e, pc), size)
            let r = alu(kind, regs[Int(d.reg)] & mask, s, size)
            if writes { regs[Int(d.reg)] = r }
        case .aluMR, .aluMI:
            let a = address(e, pc)
            let s = d.kind == .aluMR ? regs[Int(d.reg)] & mask : d.imm & mask
            let r = alu(kind, try read(a, size), s, size)
            if writes { try write(a, size, r) }
        case .imulRMI:
            regs[Int(d.reg)] = imulTruncated(try read(address(e, pc), size), d.imm & mask, size)
        case .lea:
            regs[Int(d.reg)] = address(e, pc) & mask
        case .imulRM:
            regs[Int(d.reg)] = imulTruncated(regs[Int(d.reg)] & mask, try read(address(e, pc), size), size)
        case .jcc:
            return condition(d.op) ? next &+ d.disp : next
        case .jmp:
            return next &+ d.disp
        case .call:
            try push(next, 8)
            return next &+ d.disp
        case .ret:
            return try pop(8)
        case .push:
            try push(regs[Int(d.reg)], 8)
        case .pop:
            let v = try pop(8)
            regs[Int(d.reg)] = v
        case .general:  // never handed out by cachedInstruction(at:)
            rip = pc
            try step()
            return rip
        }
        return next
    }

    /// The register-only kinds (``DecodedKind/registerOnly``): register `r` against register
    /// `src` or immediate `imm`.
    @inline(__always) func registerOperation(_ kind: DecodedKind, _ r: Int, _ src: Int, _ imm: UInt64, _ size: Int, _ mask: UInt64) {
        switch kind {
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR:
            arithmetic(kind, r, regs[r] & mask, regs[src] & mask, size)
        case .shlRI:
            let v = regs[r] & mask
            if imm != 0 {
                let res = (v << imm) & mask
                setLazy(.shl, v, imm, res, size)
                regs[r] = res
            } else {
                regs[r] = v
            }
        case .shrRI:
            let v = regs[r] & mask
            if imm != 0 {
                let res = v >> imm
                setLazy(.shr, v, imm, res, size)
                regs[r] = res
            } else {
                regs[r] = v
            }
        case .sarRI:
            let v = regs[r] & mask
            regs[r] = imm != 0 ? shift(7, v, imm, size) : v
        default:  // the ALU with an immediate
            arithmetic(kind, r, regs[r] & mask, imm & mask, size)
        }
    }

    /// The specialised ALU kinds: the result (kept for all but CMP and TEST) and lazy flags.
    @inline(__always) func arithmetic(_ kind: DecodedKind, _ r: Int, _ a: UInt64, _ b: UInt64, _ size: Int) {
        switch kind {
        case .addRR, .addRI:
            let res = a &+ b
            setLazy(.add, a, b, res, size)
            regs[r] = res & sizeMask(size)
        case .subRR, .subRI:
            let res = a &- b
            setLazy(.sub, a, b, res, size)
            regs[r] = res & sizeMask(size)
        case .cmpRR, .cmpRI:
            setLazy(.sub, a, b, a &- b, size)
        case .andRR, .andRI:
            let res = a & b
            setLazy(.logic, a, b, res, size)
            regs[r] = res
        case .orRR, .orRI:
            let res = a | b
            setLazy(.logic, a, b, res, size)
            regs[r] = res
        case .xorRR, .xorRI:
            let res = a ^ b
            setLazy(.logic, a, b, res, size)
            regs[r] = res
        default:  // TEST
            setLazy(.logic, a, b, a & b, size)
        }
    }

    // MARK: The decoder for the cache

    /// Decodes the instruction at `p` (16 readable bytes) into a cache entry: the common shapes
    /// of compiled 64-bit code with no prefix but REX, at 32- or 64-bit operand size. Anything
    /// else becomes `.general` (decoded each time by the full decoder).
    static func decode(_ p: UnsafeRawPointer, tag: UInt64) -> DecodedInstruction {
        var d = DecodedInstruction(tag: tag, disp: 0, imm: 0, kind: .general, length: 0, size: 4, reg: 0, src: 0, op: 0,
                                   base: DecodedInstruction.noRegister, index: DecodedInstruction.noRegister, scale: 0)
        var at = 0
        func byte() -> UInt8 { let b = p.load(fromByteOffset: at, as: UInt8.self); at += 1; return b }
        func s8() -> UInt64 { UInt64(bitPattern: Int64(Int8(bitPattern: byte()))) }
        func s32() -> UInt64 {
            let v = p.loadUnaligned(fromByteOffset: at, as: Int32.self)
            at += 4
            return UInt64(bitPattern: Int64(v))
        }
        var rex: UInt8 = 0
        var op = byte()
        if op & 0xF0 == 0x40 {
            rex = op & 0xF
            op = byte()
        }
        d.size = rex & 8 != 0 ? 8 : 4
        // ModRM: the reg field into `d.reg`; true for a register r/m (in `d.src`), false for
        // memory (base, index, scale, displacement in `d`).
        func modrm() -> Bool {
            let m = byte()
            let mod = m >> 6, rm = m & 7
            d.reg = (m >> 3) & 7 | (rex & 4) << 1
            if mod == 3 {
                d.src = rm | (rex & 1) << 3
                return true
            }
            if rm == 4 {
                let sib = byte()
                let base = sib & 7, index = (sib >> 3) & 7 | (rex & 2) << 2
                if base == 5 && mod == 0 {
                    d.disp = s32()
                } else {
                    d.base = base | (rex & 1) << 3
                }
                if index != 4 { d.index = index; d.scale = sib >> 6 }
            } else if rm == 5 && mod == 0 {
                d.base = DecodedInstruction.ripBase
                d.disp = s32()
            } else {
                d.base = rm | (rex & 1) << 3
            }
            if mod == 1 { d.disp &+= s8() } else if mod == 2 { d.disp &+= s32() }
            return false
        }
        switch op {
        case 0x01, 0x03, 0x09, 0x0B, 0x11, 0x13, 0x19, 0x1B, 0x21, 0x23, 0x29, 0x2B, 0x31, 0x33, 0x39, 0x3B, 0x85:
            d.op = op == 0x85 ? 8 : op >> 3
            if modrm() {
                if op & 2 == 0 { (d.reg, d.src) = (d.src, d.reg) }  // r/m is the destination
                d.kind = DecodedKind.alu(d.op, immediate: false) ?? .aluRR
            } else if op == 0x85 {
                d.kind = .aluRM  // TEST is symmetric: the register against memory, nothing written
            } else {
                d.kind = op & 2 == 0 ? .aluMR : .aluRM
            }
        case 0x89, 0x8B:
            if modrm() {
                if op == 0x89 { (d.reg, d.src) = (d.src, d.reg) }
                d.kind = .movRR
            } else {
                d.kind = op == 0x89 ? .store : .load
            }
        case 0x8D:
            d.kind = modrm() ? .general : .lea
        case 0x81, 0x83:
            let register = modrm()
            d.op = d.reg & 7
            d.imm = op == 0x83 ? s8() : s32()
            if register {
                d.reg = d.src
                d.kind = DecodedKind.alu(d.op, immediate: true) ?? .aluRI
            } else {
                d.kind = .aluMI
            }
        case 0x69, 0x6B:  // IMUL r, r/m, imm
            let register = modrm()
            d.imm = op == 0x6B ? s8() : s32()
            d.kind = register ? .imulRRI : .imulRMI
        case 0xC1:
            guard modrm() else { break }
            d.op = d.reg & 7
            guard d.op >= 4 else { break }  // rotates: the general path
            d.imm = UInt64(byte()) & (d.size == 8 ? 63 : 31)
            d.reg = d.src
            d.kind = d.op == 5 ? .shrRI : d.op == 7 ? .sarRI : .shlRI
        case 0xFF:
            guard modrm(), d.reg & 7 < 2 else { break }
            d.op = d.reg & 7
            d.reg = d.src
            d.kind = .incDec
        case 0xC7:
            let register = modrm()
            guard d.reg & 7 == 0 else { break }
            d.imm = s32()
            if register {
                d.reg = d.src
                d.kind = .movRI
            } else {
                d.kind = .storeImm
            }
        case 0xB8...0xBF:
            d.reg = op & 7 | (rex & 1) << 3
            if rex & 8 != 0 {
                d.imm = p.loadUnaligned(fromByteOffset: at, as: UInt64.self)
                at += 8
            } else {
                d.imm = s32() & 0xFFFF_FFFF
            }
            d.kind = .movRI
        case 0x0F:
            let op2 = byte()
            switch op2 {
            case 0xAF:
                d.kind = modrm() ? .imulRR : .imulRM
            case 0x80...0x8F:
                d.op = op2 & 0xF
                d.disp = s32()
                d.kind = .jcc
            default:
                break
            }
        case 0x70...0x7F:
            d.op = op & 0xF
            d.disp = s8()
            d.kind = .jcc
        case 0xEB:
            d.disp = s8()
            d.kind = .jmp
        case 0xE9:
            d.disp = s32()
            d.kind = .jmp
        case 0xE8:
            d.disp = s32()
            d.kind = .call
        case 0xC3:
            d.kind = .ret
        case 0x50...0x57:
            d.reg = op & 7 | (rex & 1) << 3
            d.kind = .push
        case 0x58...0x5F:
            d.reg = op & 7 | (rex & 1) << 3
            d.kind = .pop
        default:
            break
        }
        d.length = UInt8(at)
        return d
    }
}
