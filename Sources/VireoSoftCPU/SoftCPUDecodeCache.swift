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
    /// Instructions its block retires up to and including this entry.
    var through: UInt16 = 0
    /// The flags this entry sets are overwritten later in its block before anything can read
    /// them (a Jcc, a fault, the block's end): it computes its result alone.
    var flagsDead = false

    static let noRegister: UInt8 = 0xFF
    static let ripBase: UInt8 = 16
}

enum DecodedKind: UInt8 {
    case general
    case movRR, aluRR, aluRI, shiftRI, incDec, imulRR, imulRRI, movRI
    case load, store, aluRM, aluMR, aluMI, lea, imulRM, imulRMI, storeImm
    case jcc, jmp, call, ret, push, pop
    /// A Jcc whose flags come from a SUB or CMP (`jccSub`) or an AND, OR, XOR or TEST
    /// (`jccLogic`) earlier in its block, at operand size `size`, with nothing between that
    /// changes them: the condition straight from the lazy operands (not O or P).
    case jccSub, jccLogic
    // The commonest ALU operations and shifts on registers, each its own case so that one
    // dispatch does the whole instruction.
    case addRR, subRR, cmpRR, andRR, orRR, xorRR, testRR
    case addRI, subRI, cmpRI, andRI, orRI, xorRI
    case shlRI, shrRI, sarRI
    // Byte and 16-bit (0x66) operand forms: registers through ``SoftCPU/sizedRegister(_:_:)``
    // (16-19 are AH, CH, DH, BH), results merged into the register's other bits.
    case aluRRn, aluRIn, aluRMn, aluMRn, aluMIn, movRRn, movRIn, loadN, storeN, storeImmN, incDecN
    /// MOVZX/MOVSX: `op` is the source size (1 or 2), `size` the destination's.
    case movzxR, movzxM, movsxR, movsxM
    /// MOVS/CMPS/STOS/LODS/SCAS with or without REP/REPE/REPNE (`src`: 0, 0xF3 or 0xF2),
    /// opcode in `op`: one entry, run by the full decoder's string code (each iteration
    /// counts as an instruction there).
    case string

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

    /// Kinds that handle operand sizes 1 and 2 (the others assume 4 or 8).
    var anySize: Bool {
        switch self {
        case .aluRRn, .aluRIn, .aluRMn, .aluMRn, .aluMIn, .movRRn, .movRIn, .loadN, .storeN, .storeImmN, .incDecN,
             .movzxR, .movzxM, .movsxR, .movsxM, .string:
            return true
        default:
            return false
        }
    }

    /// The byte or 16-bit form of a kind decoded at operand size 1 or 2, if it has one.
    var sized: DecodedKind? {
        if anySize { return self }
        switch self {
        case .aluRR, .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR: return .aluRRn
        case .aluRI, .addRI, .subRI, .cmpRI, .andRI, .orRI, .xorRI: return .aluRIn
        case .aluRM: return .aluRMn
        case .aluMR: return .aluMRn
        case .aluMI: return .aluMIn
        case .movRR: return .movRRn
        case .movRI: return .movRIn
        case .load: return .loadN
        case .store: return .storeN
        case .storeImm: return .storeImmN
        case .incDec: return .incDecN
        default: return nil
        }
    }

    /// What an entry does to the arithmetic flags, for the block's dead-flag pass.
    enum FlagEffect { case transparent, sets, other }

    /// Whether the entry `d` (of this kind) leaves the flags alone and cannot fault or stop its
    /// block (`transparent`), sets all six from its operands and honours
    /// ``DecodedInstruction/flagsDead`` (`sets`), or anything else: it may read them, set
    /// some, fault, exit or stop the block (`other`: the flags before it must be exact).
    static func flagEffect(_ d: DecodedInstruction) -> FlagEffect {
        switch d.kind {
        case .movRR:
            switch d.second {
            case .general: return .transparent
            case .shlRI, .shrRI, .sarRI: return d.secondImm != 0 ? .sets : .transparent
            default: return .sets
            }
        case .movRI, .lea, .jmp, .movRRn, .movRIn, .movzxR, .movsxR:
            return .transparent
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR, .addRI, .subRI, .cmpRI, .andRI, .orRI, .xorRI,
             .imulRR, .imulRRI:
            return .sets
        case .shlRI, .shrRI, .sarRI:
            return d.imm != 0 ? .sets : .transparent
        default:
            return .other
        }
    }

    /// For a flag-setting entry, the Jcc kind that reads its flags straight (`jccSub`,
    /// `jccLogic`) and the operand size; `.jcc` when there is none.
    static func flagSource(_ d: DecodedInstruction) -> (DecodedKind, UInt8) {
        let kind = d.kind == .movRR ? d.second : d.kind
        let size = d.kind == .movRR ? d.secondSize : d.size
        switch kind {
        case .subRR, .cmpRR, .subRI, .cmpRI: return (.jccSub, size)
        case .andRR, .orRR, .xorRR, .testRR, .andRI, .orRI, .xorRI: return (.jccLogic, size)
        default: return (.jcc, size)
        }
    }

    /// Unconditional branches end a block; a Jcc does not: taken, it leaves the block there
    /// (a side exit), not taken, the block goes on.
    var endsBlock: Bool {
        switch self {
        case .jmp, .call, .ret: return true
        default: return false
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

/// A run of decoded instructions that execute one after another with no lookup between them:
/// it starts at a guest-physical address and ends after a CALL, a RET or a JMP that is not a
/// forward jump within the page (which goes on at its target; a taken Jcc leaves the block
/// early), before
/// an instruction the cache does not decode, at the end of its page's window or after
/// ``DecodeCache/maxBlockEntries`` entries.
struct DecodedBlock {
    /// The first instruction's guest-physical address with the cache's generation in bits
    /// 48-63; ``DecodeCache/invalid`` or 0 for an empty slot.
    var tag: UInt64
    /// Its first entry in ``DecodeCache/entries``.
    var start: UInt16
    /// Entries; 0 when the first instruction is one the cache leaves to the full decoder.
    var count: UInt8
    /// Runs from the cache since it was built, counted until it is translated to native code.
    var hits: UInt8 = 0
    /// Guest instructions the entries retire (a fused pair retires two).
    var retired: UInt16
    /// Its native code (SoftCPUNative.swift): ``NativeCode/none`` not translated yet,
    /// ``NativeCode/never`` not translatable, else ``NativeCode/slot(_:)`` of its header.
    var native: UInt16 = NativeCode.none
}

/// The decode cache: per vCPU, blocks of decoded instructions found through a direct-mapped
/// table of block heads keyed by guest-physical address, their entries bump-allocated from a
/// pool that starts empty at every flush. Both are anonymous mappings reserved once and
/// committed by the host only as far as they are used, so the cache's memory follows the
/// code the guest actually runs between two flushes (an idle guest commits a few pages).
/// Keyed by physical address, blocks survive CR3 loads and INVLPG; they are dropped
/// - when this vCPU writes a page that holds cached code: such a page gets no write TLB entry,
///   so its first write takes the slow path, which flushes the cache (a page written
///   ``DecodeCache/maxInvalidations`` times is never cached again: code and data sharing a
///   page), and the running block stops after that instruction;
/// - wholesale (a generation bump, O(1)) at every ``SoftCPU/run(budget:)``, when the
///   guest-physical map changes, on serializing instructions (CPUID, IRET) and when the pool
///   is full, so writes by the host or other vCPUs are seen by the rules x86 gives
///   cross-modifying code.
final class DecodeCache {
    static let blockSlots = 1024
    /// Entries the pool can hold between two flushes (1.5 MiB reserved, committed as used).
    static let poolCapacity = 32768
    static let maxBlockEntries = 64
    static let invalid: UInt64 = ~0
    static let maxInvalidations: UInt8 = 16
    /// Per RAM frame: 0 no cached code, 1 cached code (writes trap), 2 never cached.
    static let noCode: UInt8 = 0, hasCode: UInt8 = 1, uncacheable: UInt8 = 2

    let blocks: UnsafeMutablePointer<DecodedBlock>
    let entries: UnsafeMutablePointer<DecodedInstruction>
    /// Entries in use since the last flush.
    var used = 0
    let frameState: UnsafeMutablePointer<UInt8>
    let frameInvalidations: UnsafeMutablePointer<UInt8>
    let frames: Int
    /// Native code for hot blocks (SoftCPUNative.swift), emptied with the cache.
    let nativeCode = NativeCodeBuffer()
    /// Bits 48-63 of every live tag (never 0xFFFF, so no live tag equals `invalid`); kept
    /// behind a pointer the run loop holds, to check after every instruction whether the
    /// cache was flushed under the running block.
    let generationStorage: UnsafeMutablePointer<UInt64>
    var generation: UInt64 {
        get { generationStorage.pointee }
        set { generationStorage.pointee = newValue }
    }

    static let blockBytes = blockSlots * MemoryLayout<DecodedBlock>.stride
    static let entryBytes = poolCapacity * MemoryLayout<DecodedInstruction>.stride

    /// An anonymous mapping: its zero bytes are empty slots (tag 0 matches no live tag, whose
    /// generation bits are never 0; kind 0 is `.general`), and the host commits only the pages
    /// touched.
    static func reserve(_ bytes: Int) -> UnsafeMutableRawPointer {
        guard let raw = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED else {
            fatalError("SoftCPU: cannot map \(bytes) bytes for the decode cache")
        }
        return raw
    }

    init(ramFrames: Int) {
        frames = ramFrames
        blocks = Self.reserve(Self.blockBytes).bindMemory(to: DecodedBlock.self, capacity: Self.blockSlots)
        entries = Self.reserve(Self.entryBytes).bindMemory(to: DecodedInstruction.self, capacity: Self.poolCapacity)
        frameState = .allocate(capacity: max(frames, 1))
        frameState.initialize(repeating: Self.noCode, count: max(frames, 1))
        frameInvalidations = .allocate(capacity: max(frames, 1))
        frameInvalidations.initialize(repeating: 0, count: max(frames, 1))
        generationStorage = .allocate(capacity: 1)
        generationStorage.initialize(to: 1 << 48)
    }

    deinit {
        munmap(UnsafeMutableRawPointer(blocks), Self.blockBytes)
        munmap(UnsafeMutableRawPointer(entries), Self.entryBytes)
        frameState.deallocate()
        frameInvalidations.deallocate()
        generationStorage.deallocate()
    }

    @inline(__always) static func blockSlot(_ gpa: UInt64) -> Int {
        Int(truncatingIfNeeded: (gpa &* 0x9E37_79B9_7F4A_7C15) >> 54)
    }

    /// The most entries the pool held between two flushes, since the last trim; the most it
    /// has held since the pages past it were last given back; flushes since the last trim.
    var recentPeak = 0, committedPeak = 0, flushesSinceTrim = 0
    /// Flushes (slices, mostly) between two looks at whether the pool can give pages back.
    static let trimInterval = 64

    /// Drops every block (O(1): live tags carry the generation; every 65535th flush clears)
    /// and empties the pool. Every ``trimInterval`` flushes, pool pages past what the recent
    /// slices used go back to the host, so a burst of code (boot) does not stay committed.
    func flush() {
        recentPeak = max(recentPeak, used)
        committedPeak = max(committedPeak, used)
        flushesSinceTrim += 1
        if flushesSinceTrim >= Self.trimInterval {
            trim(keeping: recentPeak)
            recentPeak = 0
            flushesSinceTrim = 0
        }
        generation &+= 1 << 48
        used = 0
        if generation >> 48 == 0xFFFF || generation == 0 {
            generation = 1 << 48
            for i in 0..<Self.blockSlots { blocks[i].tag = Self.invalid }
        }
    }

    /// Gives the pool's pages past `keeping` entries back to the host (they read as zeros:
    /// empty entries). Only entries past the current block's are touched.
    func trim(keeping: Int) {
        let stride = MemoryLayout<DecodedInstruction>.stride
        let keep = (max(keeping, used) * stride + 4095) & ~4095
        let committed = min((committedPeak * stride + 4095) & ~4095, Self.entryBytes)
        guard committed > keep else { return }
        _ = madvise(UnsafeMutableRawPointer(entries) + keep, committed - keep, MADV_DONTNEED)
        committedPeak = max(keeping, used)
    }

    /// A write reached guest frame `frame`, which holds cached code.
    func invalidate(frame: Int) {
        frameState[frame] = Self.noCode
        frameInvalidations[frame] &+= 1
        if frameInvalidations[frame] >= Self.maxInvalidations { frameState[frame] = Self.uncacheable }
        flush()
    }

    /// The live entry for the instruction at guest-physical `gpa`, if a block holds it (for
    /// tests: a linear search of the pool).
    func entry(at gpa: UInt64) -> DecodedInstruction? {
        for i in 0..<used where entries[i].tag == gpa | generation { return entries[i] }
        return nil
    }

    /// Host memory the cache's mappings commit now (pages resident, by mincore).
    var residentBytes: Int {
        func resident(_ p: UnsafeMutableRawPointer, _ bytes: Int) -> Int {
            let pages = (bytes + 4095) / 4096
            var vec = [UInt8](repeating: 0, count: pages)
            guard mincore(p, bytes, &vec) == 0 else { return bytes }
            return vec.reduce(0) { $0 + Int($1 & 1) } * 4096
        }
        return resident(UnsafeMutableRawPointer(blocks), Self.blockBytes) + resident(UnsafeMutableRawPointer(entries), Self.entryBytes)
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

    /// What the cached loop reads for every block, loaded once per run of cached blocks (and
    /// again after a fault is delivered, which may change CS and the page, or a block is built,
    /// which may flush).
    struct CacheView {
        let page: UInt64
        let frameAddress: UInt64
        let blocks: UnsafeMutablePointer<DecodedBlock>
        let entries: UnsafeMutablePointer<DecodedInstruction>
        let generation: UInt64
    }

    @inline(__always) func cacheView() -> CacheView {
        CacheView(page: codePage, frameAddress: codeFrameAddress, blocks: decodeCache.blocks, entries: decodeCache.entries,
                  generation: decodeCache.generation)
    }

    /// The block's head for `pc` (RIP), whatever its tag; nil when RIP is not on the current
    /// code page (the full decoder finds the page), the page is not RAM or not 64-bit code, or
    /// the instruction's 16-byte window leaves the page: the caller runs ``step()`` then.
    @inline(__always) func blockHead(at pc: UInt64, _ view: CacheView) -> (UnsafeMutablePointer<DecodedBlock>, UInt64)? {
        let offset = pc & 0xFFF
        guard pc & ~0xFFF == view.page, view.frameAddress != DecodeCache.invalid, offset <= 4096 - 16 else {
            return nil
        }
        let gpa = view.frameAddress | offset
        return (view.blocks + DecodeCache.blockSlot(gpa), gpa)
    }

    /// Decodes the block at `gpa` (on the current code page) into the pool and `head`,
    /// fusing each register MOV with a register-only operation after it. A page never to be
    /// cached gets an empty block. May flush the cache first (pool full): the caller reloads
    /// its view.
    @inline(never)
    func buildBlock(_ head: UnsafeMutablePointer<DecodedBlock>, gpa: UInt64) {
        let cache = decodeCache
        if cache.used + DecodeCache.maxBlockEntries > DecodeCache.poolCapacity { cache.flush() }
        let page = gpa & ~0xFFF
        let frame = gpa >> 12
        var count = 0, retired = 0
        switch cache.frameState[Int(frame)] {
        case DecodeCache.uncacheable:
            head.pointee = DecodedBlock(tag: gpa | cache.generation, start: UInt16(cache.used), count: 0, retired: 0)
            return
        case DecodeCache.noCode: markCode(frame: frame)
        default: break
        }
        let generation = cache.generation
        var offset = Int(gpa & 0xFFF)
        while count < DecodeCache.maxBlockEntries, offset <= 4096 - 16 {
            let code = UnsafeRawPointer(codeHost + offset)
            var d = Self.decode(code, tag: (page | UInt64(offset)) | generation)
            if d.kind == .general { break }
            var length = Int(d.length)
            if d.kind == .movRR, offset + length <= 4096 - 16 {
                // The operation after it is on the same page, so writes there drop both.
                let next = Self.decode(code + length, tag: 0)
                // Only an operation on the MOV's destination (the two-operand idiom): the run
                // loop then hands it the moved value in a register.
                if next.kind.registerOnly, next.reg == d.reg {
                    d.second = next.kind
                    d.secondReg = next.reg
                    d.secondSrc = next.src
                    d.secondSize = next.size
                    d.secondLength = next.length
                    d.secondImm = Int32(truncatingIfNeeded: Int64(bitPattern: next.imm))
                    d.retired = 2
                    length += Int(next.length)
                }
            }
            retired += Int(d.retired)
            d.through = UInt16(retired)
            cache.entries[cache.used + count] = d
            count += 1
            offset += length
            if d.kind == .jmp {
                // A forward jump within the page: the block goes on at its target. (Not
                // backward: a loop would unroll into the block in as many phases as fit.)
                let target = offset &+ Int(Int64(bitPattern: d.disp))
                guard target > offset, target <= 4096 - 16 else { break }
                offset = target
                continue
            }
            if d.kind.endsBlock { break }
        }
        // Dead flags: walking back from the block's end (where the flags are live), a
        // flag-setting entry whose flags the next setter overwrites, with nothing between that
        // reads them, can fault or stops the block, need not record them.
        // And a Jcc after a SUB/CMP or a logic operation, with nothing between that changes the
        // flags (a Jcc not taken does not), reads that operation's operands straight.
        var source: (DecodedKind, UInt8) = (.jcc, 0)
        for i in 0..<count {
            let e = cache.entries + cache.used + i
            if e.pointee.kind == .jcc {
                let cc = e.pointee.op & 0xE
                if source.0 != .jcc, cc != 0, cc != 10 {
                    e.pointee.kind = source.0
                    e.pointee.size = source.1
                }
                continue
            }
            switch DecodedKind.flagEffect(e.pointee) {
            case .transparent: break
            case .sets: source = DecodedKind.flagSource(e.pointee)
            case .other: source = (.jcc, 0)
            }
        }
        var live = true
        for i in stride(from: count - 1, through: 0, by: -1) {
            let e = cache.entries + cache.used + i
            switch DecodedKind.flagEffect(e.pointee) {
            case .transparent: break
            case .sets:
                e.pointee.flagsDead = !live
                live = false
            case .other: live = true
            }
        }
        head.pointee = DecodedBlock(tag: gpa | generation, start: UInt16(cache.used), count: UInt8(count), retired: UInt16(retired))
        cache.used += count
        // Native code made for the same bytes in an earlier slice runs again without being
        // made anew (the bytes are compared: anyone may have written them since).
        if nativeTier, count > 0 {
            head.pointee.native = cache.nativeCode.find(gpa: gpa, retired: UInt16(retired), code: UnsafeRawPointer(codeHost))
        }
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
    ///
    /// `stop` is set when the block must not go on after this entry: a taken Jcc, or a memory
    /// access that flushed the cache (`generation` is the one the block was decoded in).
    @inline(__always) func executeDecoded(_ e: UnsafeMutablePointer<DecodedInstruction>, at pc: UInt64,
                                          _ generation: UInt64, _ stop: inout Bool) throws(CPUFault) -> UInt64 {
        let d = e.pointee
        let size = Int(d.size)
        let mask: UInt64 = size == 8 ? ~0 : 0xFFFF_FFFF
        let next = pc &+ UInt64(d.length)
        // ALU operation 8 is TEST: AND's flags, no result written (nor for CMP, 7).
        let kind = d.op == 8 ? 4 : Int(d.op)
        let writes = d.op < 7
        switch d.kind {
        case .movRR:
            let moved = regs[Int(d.src)] & mask
            if d.second != .general {
                // The second operation works on the MOV's destination: shifts take the moved
                // value straight (no store and reload of the register between the two).
                let size2 = Int(d.secondSize)
                let mask2: UInt64 = size2 == 8 ? ~0 : 0xFFFF_FFFF
                let r = Int(d.reg), count = UInt64(bitPattern: Int64(d.secondImm))
                if d.second == .shlRI, count != 0 {
                    let v = moved & mask2, res = (v << count) & mask2
                    if !d.flagsDead { setLazy(.shl, v, count, res, size2) }
                    regs[r] = res
                } else if d.second == .shrRI, count != 0 {
                    let v = moved & mask2, res = v >> count
                    if !d.flagsDead { setLazy(.shr, v, count, res, size2) }
                    regs[r] = res
                } else {
                    regs[r] = moved
                    registerOperation(d.second, r, Int(d.secondSrc), count, size2, mask2, flags: !d.flagsDead)
                }
                return next &+ UInt64(d.secondLength)
            }
            regs[Int(d.reg)] = moved
        // Each specialised kind in a case of its own, written out (the compiler leaves a
        // shared helper out of line), so one dispatch does it all.
        case .addRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a &+ b
            if !d.flagsDead { setLazy(.add, a, b, res, size) }
            regs[Int(d.reg)] = res & mask
        case .subRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a &- b
            if !d.flagsDead { setLazy(.sub, a, b, res, size) }
            regs[Int(d.reg)] = res & mask
        case .cmpRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a &- b
            if !d.flagsDead { setLazy(.sub, a, b, res, size) }
        case .andRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a & b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        case .orRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a | b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        case .xorRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a ^ b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        case .testRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask, res = a & b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
        case .addRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a &+ b
            if !d.flagsDead { setLazy(.add, a, b, res, size) }
            regs[Int(d.reg)] = res & mask
        case .subRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a &- b
            if !d.flagsDead { setLazy(.sub, a, b, res, size) }
            regs[Int(d.reg)] = res & mask
        case .cmpRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a &- b
            if !d.flagsDead { setLazy(.sub, a, b, res, size) }
        case .andRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a & b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        case .orRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a | b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        case .xorRI:
            let a = regs[Int(d.reg)] & mask, b = d.imm & mask, res = a ^ b
            if !d.flagsDead { setLazy(.logic, a, b, res, size) }
            regs[Int(d.reg)] = res
        // SHL and SHR written out here: the compiler leaves a helper out of line.
        case .shlRI:
            let r = Int(d.reg), v = regs[r] & mask
            if d.imm != 0 {
                let res = (v << d.imm) & mask
                if !d.flagsDead { setLazy(.shl, v, d.imm, res, size) }
                regs[r] = res
            } else {
                regs[r] = v
            }
        case .shrRI:
            let r = Int(d.reg), v = regs[r] & mask
            if d.imm != 0 {
                let res = v >> d.imm
                if !d.flagsDead { setLazy(.shr, v, d.imm, res, size) }
                regs[r] = res
            } else {
                regs[r] = v
            }
        case .sarRI:
            shiftImmediate(.sarRI, Int(d.reg), d.imm, size, mask, flags: !d.flagsDead)
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
        // The product's low bits are the same signed or unsigned: with its flags dead, IMUL is
        // a plain multiply.
        case .imulRR:
            let a = regs[Int(d.reg)] & mask, b = regs[Int(d.src)] & mask
            regs[Int(d.reg)] = d.flagsDead ? (a &* b) & mask : imulTruncated(a, b, size)
        case .imulRRI:
            let a = regs[Int(d.src)] & mask, b = d.imm & mask
            regs[Int(d.reg)] = d.flagsDead ? (a &* b) & mask : imulTruncated(a, b, size)
        case .movRI:
            regs[Int(d.reg)] = d.imm & mask
        case .load:
            regs[Int(d.reg)] = try read(address(e, pc), size)
            stop = flushed(generation)
        case .store:
            try write(address(e, pc), size, regs[Int(d.reg)])
            stop = flushed(generation)
        case .storeImm:
            try write(address(e, pc), size, d.imm)
            stop = flushed(generation)
        case .aluRM:
            let s = try read(address(e, pc), size)
            let r = alu(kind, regs[Int(d.reg)] & mask, s, size)
            if writes { regs[Int(d.reg)] = r }
            stop = flushed(generation)
        case .aluMR, .aluMI:
            let a = address(e, pc)
            let s = d.kind == .aluMR ? regs[Int(d.reg)] & mask : d.imm & mask
            let r = alu(kind, try read(a, size), s, size)
            if writes { try write(a, size, r) }
            stop = flushed(generation)
        case .imulRMI:
            regs[Int(d.reg)] = imulTruncated(try read(address(e, pc), size), d.imm & mask, size)
            stop = flushed(generation)
        case .lea:
            regs[Int(d.reg)] = address(e, pc) & mask
        case .imulRM:
            regs[Int(d.reg)] = imulTruncated(regs[Int(d.reg)] & mask, try read(address(e, pc), size), size)
            stop = flushed(generation)
        case .jcc:
            if condition(d.op) {
                stop = true
                return next &+ d.disp
            }
        case .jccSub:
            // The SUB or CMP stored its operands already masked to `size`.
            let a = lazyDst, b = lazySrc
            let r: Bool
            switch d.op & 0xE {
            case 2: r = a < b
            case 4: r = a == b
            case 6: r = a <= b
            case 8: r = (a &- b) & signBit(size) != 0
            case 12: r = Int64(bitPattern: signExtend(a, size)) < Int64(bitPattern: signExtend(b, size))
            default: r = Int64(bitPattern: signExtend(a, size)) <= Int64(bitPattern: signExtend(b, size))
            }
            if r != (d.op & 1 != 0) {
                stop = true
                return next &+ d.disp
            }
        case .jccLogic:
            let res = lazyRes
            let r: Bool
            switch d.op & 0xE {
            case 2: r = false
            case 4, 6: r = res == 0
            case 8, 12: r = res & signBit(size) != 0
            default: r = res == 0 || res & signBit(size) != 0
            }
            if r != (d.op & 1 != 0) {
                stop = true
                return next &+ d.disp
            }
        case .jmp:
            return next &+ d.disp
        case .call:
            try push(next, 8)
            stop = flushed(generation)
            return next &+ d.disp
        case .ret:
            let target = try pop(8)
            stop = flushed(generation)
            return target
        case .push:
            try push(regs[Int(d.reg)], 8)
            stop = flushed(generation)
        case .pop:
            let v = try pop(8)
            regs[Int(d.reg)] = v
            stop = flushed(generation)
        case .aluRRn:
            let r = alu(kind, sizedRegister(d.reg, size), sizedRegister(d.src, size), size)
            if writes { setSizedRegister(d.reg, size, r) }
        case .aluRIn:
            let r = alu(kind, sizedRegister(d.reg, size), d.imm & sizeMask(size), size)
            if writes { setSizedRegister(d.reg, size, r) }
        case .aluRMn:
            let s = try read(address(e, pc), size)
            let r = alu(kind, sizedRegister(d.reg, size), s, size)
            if writes { setSizedRegister(d.reg, size, r) }
            stop = flushed(generation)
        case .aluMRn, .aluMIn:
            let a = address(e, pc)
            let s = d.kind == .aluMRn ? sizedRegister(d.reg, size) : d.imm & sizeMask(size)
            let r = alu(kind, try read(a, size), s, size)
            if writes { try write(a, size, r) }
            stop = flushed(generation)
        case .movRRn:
            setSizedRegister(d.reg, size, sizedRegister(d.src, size))
        case .movRIn:
            setSizedRegister(d.reg, size, d.imm)
        case .loadN:
            setSizedRegister(d.reg, size, try read(address(e, pc), size))
            stop = flushed(generation)
        case .storeN:
            try write(address(e, pc), size, sizedRegister(d.reg, size))
            stop = flushed(generation)
        case .storeImmN:
            try write(address(e, pc), size, d.imm)
            stop = flushed(generation)
        case .incDecN:
            setSizedRegister(d.reg, size, incDec(sizedRegister(d.reg, size), size, dec: d.op != 0))
        case .movzxR, .movsxR:
            let v = sizedRegister(d.src, Int(d.op))
            setSizedRegister(d.reg, size, d.kind == .movsxR ? signExtend(v, Int(d.op)) : v)
        case .movzxM, .movsxM:
            let v = try read(address(e, pc), Int(d.op))
            setSizedRegister(d.reg, size, d.kind == .movsxM ? signExtend(v, Int(d.op)) : v)
            stop = flushed(generation)
        case .string:
            // The decoder's state for the string code: this entry's operand size, 64-bit
            // addresses, flat segments (the cache takes no segment override).
            rex = d.size == 8 ? 8 : 0
            operandOverride = d.size == 2
            addressSize = 8
            segmentBase = 0
            try stringInstruction(d.op, d.src)
            stop = flushed(generation)
        case .general:  // never in a block
            rip = pc
            try step()
            stop = true
            return rip
        }
        return next
    }

    /// Register `r` at operand size `size`; for bytes, 16-19 are AH, CH, DH and BH.
    @inline(__always) func sizedRegister(_ r: UInt8, _ size: Int) -> UInt64 {
        switch size {
        case 1: return r < 16 ? regs[Int(r)] & 0xFF : (regs[Int(r) &- 16] >> 8) & 0xFF
        case 2: return regs[Int(r)] & 0xFFFF
        case 4: return regs[Int(r)] & 0xFFFF_FFFF
        default: return regs[Int(r)]
        }
    }

    /// Writes register `r` at operand size `size`: bytes and words merge into the register's
    /// other bits, a 32-bit value zero-extends.
    @inline(__always) func setSizedRegister(_ r: UInt8, _ size: Int, _ v: UInt64) {
        switch size {
        case 1:
            if r < 16 {
                regs[Int(r)] = (regs[Int(r)] & ~0xFF) | (v & 0xFF)
            } else {
                regs[Int(r) &- 16] = (regs[Int(r) &- 16] & ~0xFF00) | (v & 0xFF) << 8
            }
        case 2: regs[Int(r)] = (regs[Int(r)] & ~0xFFFF) | (v & 0xFFFF)
        case 4: regs[Int(r)] = v & 0xFFFF_FFFF
        default: regs[Int(r)] = v
        }
    }

    /// Whether the cache was flushed since the block began (a write reached cached code): the
    /// block stops after this entry.
    @inline(__always) func flushed(_ generation: UInt64) -> Bool {
        decodeCache.generationStorage.pointee != generation
    }

    /// The register-only kinds (``DecodedKind/registerOnly``): register `r` against register
    /// `src` or immediate `imm`.
    @inline(__always) func registerOperation(_ kind: DecodedKind, _ r: Int, _ src: Int, _ imm: UInt64, _ size: Int, _ mask: UInt64,
                                             flags: Bool) {
        switch kind {
        case .addRR, .subRR, .cmpRR, .andRR, .orRR, .xorRR, .testRR:
            arithmetic(kind, r, regs[r] & mask, regs[src] & mask, size, flags: flags)
        case .shlRI, .shrRI, .sarRI:
            shiftImmediate(kind, r, imm, size, mask, flags: flags)
        default:  // the ALU with an immediate
            arithmetic(kind, r, regs[r] & mask, imm & mask, size, flags: flags)
        }
    }

    /// SHL, SHR or SAR of register `r` by the immediate count `imm` (already masked); the
    /// lazy flags recorded only when `flags` (they are not dead).
    @inline(__always) func shiftImmediate(_ kind: DecodedKind, _ r: Int, _ imm: UInt64, _ size: Int, _ mask: UInt64, flags: Bool) {
        switch kind {
        case .shlRI:
            let v = regs[r] & mask
            if imm != 0 {
                let res = (v << imm) & mask
                if flags { setLazy(.shl, v, imm, res, size) }
                regs[r] = res
            } else {
                regs[r] = v
            }
        case .shrRI:
            let v = regs[r] & mask
            if imm != 0 {
                let res = v >> imm
                if flags { setLazy(.shr, v, imm, res, size) }
                regs[r] = res
            } else {
                regs[r] = v
            }
        default:  // SAR
            let v = regs[r] & mask
            if imm == 0 {
                regs[r] = v
            } else if flags {
                regs[r] = shift(7, v, imm, size)
            } else {
                regs[r] = UInt64(bitPattern: Int64(bitPattern: signExtend(v, size)) >> Int64(imm)) & mask
            }
        }
    }

    /// The specialised ALU kinds: the result (kept for all but CMP and TEST) and, when
    /// `flags` (they are not dead), the lazy flags.
    @inline(__always) func arithmetic(_ kind: DecodedKind, _ r: Int, _ a: UInt64, _ b: UInt64, _ size: Int, flags: Bool) {
        switch kind {
        case .addRR, .addRI:
            let res = a &+ b
            if flags { setLazy(.add, a, b, res, size) }
            regs[r] = res & sizeMask(size)
        case .subRR, .subRI:
            let res = a &- b
            if flags { setLazy(.sub, a, b, res, size) }
            regs[r] = res & sizeMask(size)
        case .cmpRR, .cmpRI:
            if flags { setLazy(.sub, a, b, a &- b, size) }
        case .andRR, .andRI:
            let res = a & b
            if flags { setLazy(.logic, a, b, res, size) }
            regs[r] = res
        case .orRR, .orRI:
            let res = a | b
            if flags { setLazy(.logic, a, b, res, size) }
            regs[r] = res
        case .xorRR, .xorRI:
            let res = a ^ b
            if flags { setLazy(.logic, a, b, res, size) }
            regs[r] = res
        default:  // TEST
            if flags { setLazy(.logic, a, b, a & b, size) }
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
        var rex: UInt8 = 0, rexPresent = false
        var op = byte()
        var rep: UInt8 = 0
        if op == 0xF3 || op == 0xF2 {
            rep = op
            op = byte()
        }
        let operand16 = op == 0x66
        if operand16 { op = byte() }
        if op & 0xF0 == 0x40 {
            rex = op & 0xF
            rexPresent = true
            op = byte()
        }
        d.size = rex & 8 != 0 ? 8 : operand16 ? 2 : 4
        // Byte registers: without REX, 4-7 are AH, CH, DH, BH (16-19 here).
        func byteRegister(_ r: UInt8) -> UInt8 { !rexPresent && r >= 4 && r < 8 ? r + 12 : r }
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
        case 0x00, 0x02, 0x08, 0x0A, 0x10, 0x12, 0x18, 0x1A, 0x20, 0x22, 0x28, 0x2A, 0x30, 0x32, 0x38, 0x3A, 0x84:
            // Byte ALU: r/m8 with r8 either way round, TEST r/m8, r8.
            d.size = 1
            d.op = op == 0x84 ? 8 : op >> 3
            if modrm() {
                d.src = byteRegister(d.src)
                d.reg = byteRegister(d.reg)
                if op & 2 == 0 { (d.reg, d.src) = (d.src, d.reg) }
                d.kind = .aluRRn
            } else {
                d.reg = byteRegister(d.reg)
                d.kind = op == 0x84 || op & 2 != 0 ? .aluRMn : .aluMRn
            }
        case 0x80, 0xF6, 0xF7:
            // ALU r/m8, imm8; TEST r/m, imm (F6 /0, F7 /0).
            let register = modrm()
            d.op = op == 0x80 ? d.reg & 7 : 8
            if op != 0x80 && d.reg & 7 != 0 { break }
            if op == 0xF7 {
                d.imm = d.size == 2 ? UInt64(p.loadUnaligned(fromByteOffset: at, as: UInt16.self)) : s32()
                if d.size == 2 { at += 2 }
            } else {
                d.size = 1
                d.imm = UInt64(byte())
            }
            if register {
                d.reg = d.size == 1 ? byteRegister(d.src) : d.src
                d.kind = .aluRI
            } else {
                d.kind = .aluMI
            }
        case 0x04, 0x0C, 0x14, 0x1C, 0x24, 0x2C, 0x34, 0x3C, 0xA8:
            // ALU AL, imm8 and TEST AL, imm8: the short forms with the accumulator.
            d.size = 1
            d.op = op == 0xA8 ? 8 : op >> 3
            d.imm = UInt64(byte())
            d.kind = .aluRI
        case 0x05, 0x0D, 0x15, 0x1D, 0x25, 0x2D, 0x35, 0x3D, 0xA9:
            // ALU eAX, imm32 (sign-extended for RAX) or imm16, and TEST eAX, imm.
            d.op = op == 0xA9 ? 8 : op >> 3
            if d.size == 2 {
                d.imm = UInt64(p.loadUnaligned(fromByteOffset: at, as: UInt16.self))
                at += 2
            } else {
                d.imm = s32()
            }
            d.kind = DecodedKind.alu(d.op, immediate: true) ?? .aluRI
        case 0x88, 0x8A:
            d.size = 1
            if modrm() {
                d.src = byteRegister(d.src)
                d.reg = byteRegister(d.reg)
                if op == 0x88 { (d.reg, d.src) = (d.src, d.reg) }
                d.kind = .movRRn
            } else {
                d.reg = byteRegister(d.reg)
                d.kind = op == 0x88 ? .storeN : .loadN
            }
        case 0xC6:
            d.size = 1
            let register = modrm()
            guard d.reg & 7 == 0 else { break }
            d.imm = UInt64(byte())
            if register {
                d.reg = byteRegister(d.src)
                d.kind = .movRIn
            } else {
                d.kind = .storeImmN
            }
        case 0xB0...0xB7:
            d.size = 1
            d.reg = byteRegister(op & 7 | (rex & 1) << 3)
            d.imm = UInt64(byte())
            d.kind = .movRIn
        case 0xFE:
            d.size = 1
            guard modrm(), d.reg & 7 < 2 else { break }
            d.op = d.reg & 7
            d.reg = byteRegister(d.src)
            d.kind = .incDecN
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
            if op == 0x81 && d.size == 2 {
                d.imm = UInt64(p.loadUnaligned(fromByteOffset: at, as: UInt16.self))
                at += 2
            } else {
                d.imm = op == 0x83 ? s8() : s32()
            }
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
            if d.size == 2 {
                d.imm = UInt64(p.loadUnaligned(fromByteOffset: at, as: UInt16.self))
                at += 2
            } else {
                d.imm = s32()
            }
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
            } else if d.size == 2 {
                d.imm = UInt64(p.loadUnaligned(fromByteOffset: at, as: UInt16.self))
                at += 2
            } else {
                d.imm = s32() & 0xFFFF_FFFF
            }
            d.kind = .movRI
        case 0xA4...0xA7, 0xAA...0xAF:
            d.op = op
            d.src = rep
            d.kind = .string
        case 0x0F:
            let op2 = byte()
            switch op2 {
            case 0xAF:
                d.kind = modrm() ? .imulRR : .imulRM
            case 0xB6, 0xB7, 0xBE, 0xBF:
                // MOVZX/MOVSX r, r/m8 or r/m16.
                d.op = op2 & 1 == 0 ? 1 : 2
                let register = modrm()
                if register && d.op == 1 { d.src = byteRegister(d.src) }
                d.kind = op2 < 0xB8 ? (register ? .movzxR : .movzxM) : (register ? .movsxR : .movsxM)
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
        if rep != 0, d.kind != .string {
            d.kind = .general  // PAUSE, REP RET, POPCNT...: the full decoder
        }
        if d.size < 4, d.kind != .general {
            // Byte and 16-bit operands take the kinds that merge into the register; anything
            // else at those sizes (a 0x66 branch, shift, LEA...) the full decoder.
            d.kind = d.kind.sized ?? .general
        }
        d.length = UInt8(at)
        return d
    }
}
