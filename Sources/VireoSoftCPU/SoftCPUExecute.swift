import VireoCore

/// The decoder and executor: one instruction per ``SoftCPU/step()``, decoded straight from the
/// guest's code page (prefixes, REX, ModRM/SIB/displacement/immediate) and executed in the
/// same switch. Faults are thrown as ``CPUFault`` and delivered by the run loop with RIP back
/// at the instruction's first byte; registers change only once an instruction can no longer
/// fault, so every fault is restartable.
extension SoftCPU {
    // MARK: Fetching

    /// Points the fetcher at RIP: straight into the code page when 15 bytes are there, else
    /// into a scratch copy of the two pages' bytes (a missing second page faults only if the
    /// instruction reaches it).
    @inline(__always) func beginFetch() throws(CPUFault) {
        let offset = Int(truncatingIfNeeded: rip & 0xFFF)
        fetchPosition = 0
        fetchFault = .gp()  // running past the window: an instruction longer than x86 allows
        if rip & ~0xFFF == codePage && offset <= 4096 - 16 {
            fetchPointer = codeHost + offset
            fetchAvailable = 16
            return
        }
        let p = try codePointer(rip)
        let left = 4096 &- offset
        if left >= 16 {
            codePage = rip & ~0xFFF
            codeHost = p - offset
            let ram = UInt(bitPattern: codeHost) &- UInt(bitPattern: memory.hostBase)
            codeFrameAddress = csLong && ram < UInt(decodeCache.frames) << 12 ? UInt64(ram) : DecodeCache.invalid
            fetchPointer = p
            fetchAvailable = 16
            return
        }
        fetchScratch.copyMemory(from: p, byteCount: left)
        fetchPointer = fetchScratch
        fetchAvailable = left
        let next = (rip | 0xFFF) &+ 1
        do {
            let q = try codePointer(next)
            fetchScratch.advanced(by: left).copyMemory(from: q, byteCount: 16 &- left)
            fetchAvailable = 16
        } catch {
            fetchFault = error
        }
    }

    /// Makes the page of `pc` the code page, as ``beginFetch()`` does, when its 16-byte window
    /// lies within the page and the fetch translates; false (nothing changed but what the
    /// walk itself records, which the full decoder's fetch would record the same) otherwise.
    @inline(never)
    func enterCodePage(_ pc: UInt64) -> Bool {
        let offset = Int(truncatingIfNeeded: pc & 0xFFF)
        guard offset <= 4096 - 16, let p = try? codePointer(pc) else { return false }
        codePage = pc & ~0xFFF
        codeHost = p - offset
        let ram = UInt(bitPattern: codeHost) &- UInt(bitPattern: memory.hostBase)
        codeFrameAddress = csLong && ram < UInt(decodeCache.frames) << 12 ? UInt64(ram) : DecodeCache.invalid
        return true
    }

    @inline(__always) func fetch8() throws(CPUFault) -> UInt8 {
        guard fetchPosition < fetchAvailable else { throw fetchFault }
        let b = fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self)
        fetchPosition &+= 1
        return b
    }

    @inline(__always) func fetch16() throws(CPUFault) -> UInt64 {
        guard fetchPosition &+ 2 <= fetchAvailable else { throw fetchFault }
        let v = fetchPointer.loadUnaligned(fromByteOffset: fetchPosition, as: UInt16.self)
        fetchPosition &+= 2
        return UInt64(v)
    }

    @inline(__always) func fetch32() throws(CPUFault) -> UInt64 {
        guard fetchPosition &+ 4 <= fetchAvailable else { throw fetchFault }
        let v = fetchPointer.loadUnaligned(fromByteOffset: fetchPosition, as: UInt32.self)
        fetchPosition &+= 4
        return UInt64(v)
    }

    @inline(__always) func fetch64() throws(CPUFault) -> UInt64 {
        guard fetchPosition &+ 8 <= fetchAvailable else { throw fetchFault }
        let v = fetchPointer.loadUnaligned(fromByteOffset: fetchPosition, as: UInt64.self)
        fetchPosition &+= 8
        return v
    }

    /// A sign-extended 8-bit immediate.
    @inline(__always) func fetchS8() throws(CPUFault) -> UInt64 { UInt64(bitPattern: Int64(Int8(bitPattern: try fetch8()))) }
    @inline(__always) func fetchS32() throws(CPUFault) -> UInt64 { signExtend(try fetch32(), 4) }

    /// An immediate of operand size `size` (at most 32 bits, sign-extended for 64-bit operands).
    @inline(__always) func fetchImmediate(_ size: Int) throws(CPUFault) -> UInt64 {
        switch size {
        case 1: return UInt64(try fetch8())
        case 2: return try fetch16()
        case 4: return try fetch32()
        default: return try fetchS32()
        }
    }

    // MARK: Modes and sizes

    /// 64-bit code: CS.L, which is only ever set with EFER.LMA (and paging cannot be turned
    /// off from 64-bit code).
    @inline(__always) var mode64: Bool { csLong }

    @inline(__always) func operandSize() -> Int {
        if rex & 8 != 0 { return 8 }
        if csLong || csDefault32 { return operandOverride ? 2 : 4 }
        return operandOverride ? 4 : 2
    }

    /// Near branches, pushes and pops: 64-bit in long mode unless 66 says 16.
    @inline(__always) func stackOperandSize() -> Int {
        if mode64 { return operandOverride ? 2 : 8 }
        return operandOverride ? 2 : 4
    }

    // MARK: Registers by size

    @inline(__always) func getReg(_ r: Int, _ size: Int) -> UInt64 {
        if size == 8 { return regs[r] }
        switch size {
        case 1:
            if rexPresent || r < 4 { return regs[r] & 0xFF }
            return (regs[r &- 4] >> 8) & 0xFF
        case 2: return regs[r] & 0xFFFF
        case 4: return regs[r] & 0xFFFF_FFFF
        default: return regs[r]
        }
    }

    @inline(__always) func setReg(_ r: Int, _ size: Int, _ v: UInt64) {
        if size == 8 { regs[r] = v; return }
        switch size {
        case 1:
            if rexPresent || r < 4 { regs[r] = (regs[r] & ~0xFF) | (v & 0xFF) } else {
                regs[r &- 4] = (regs[r &- 4] & ~0xFF00) | ((v & 0xFF) << 8)
            }
        case 2: regs[r] = (regs[r] & ~0xFFFF) | (v & 0xFFFF)
        case 4: regs[r] = v & 0xFFFF_FFFF
        default: regs[r] = v
        }
    }

    func setReg8Low(_ r: Int, _ v: UInt64) { regs[r] = (regs[r] & ~0xFF) | (v & 0xFF) }

    // MARK: ModRM

    /// Decodes ModRM (and SIB, displacement): the reg field, and either a register or the
    /// effective (linear) address. `immediate` is the size of what follows, for RIP-relative
    /// addresses.
    @inline(__always) func decodeModRM(immediate: Int = 0) throws(CPUFault) {
        let m = try fetch8()
        let mod = m >> 6
        modrmReg = Int((m >> 3) & 7) | Int(rex & 4) << 1
        let rm = Int(m & 7)
        if mod == 3 {
            modrmIsRegister = true
            modrmRM = rm | Int(rex & 1) << 3
            return
        }
        modrmIsRegister = false
        var address: UInt64
        if rm == 4 {
            let sib = try fetch8()
            let base = Int(sib & 7)
            let index = Int((sib >> 3) & 7) | Int(rex & 2) << 2
            if base == 5 && mod == 0 {
                address = try fetchS32()
            } else {
                address = regs[base | Int(rex & 1) << 3]
            }
            if index != 4 { address &+= regs[index] << UInt64(sib >> 6) }
        } else if rm == 5 && mod == 0 {
            let disp = try fetchS32()
            if mode64 {
                address = rip &+ UInt64(fetchPosition &+ immediate) &+ disp
            } else {
                address = disp
            }
        } else {
            address = regs[rm | Int(rex & 1) << 3]
        }
        if mod == 1 { address &+= try fetchS8() } else if mod == 2 { address &+= try fetchS32() }
        if addressSize == 4 { address &= 0xFFFF_FFFF }
        effectiveAddress = address &+ segmentBase
    }

    @inline(__always) func readRM(_ size: Int) throws(CPUFault) -> UInt64 {
        if modrmIsRegister { return getReg(modrmRM, size) }
        return try read(effectiveAddress, size)
    }

    @inline(__always) func writeRM(_ size: Int, _ v: UInt64) throws(CPUFault) {
        if modrmIsRegister { setReg(modrmRM, size, v) } else { try write(effectiveAddress, size, v) }
    }

    // MARK: Read-modify-write

    /// Reads the r/m operand, computes `f` (nil: no write) and writes the result; returns the
    /// old value. With a LOCK prefix (or `atomic`, for XCHG) on an aligned memory operand it is
    /// a compare-exchange loop on the host page, so vCPUs on other threads see it whole.
    @inline(__always) @discardableResult
    func modifyRM(_ size: Int, atomic: Bool = false, _ f: (UInt64) -> UInt64?) throws(CPUFault) -> UInt64 {
        if (lockPrefix || atomic) && !modrmIsRegister && effectiveAddress & UInt64(size &- 1) == 0 {
            let p = try writePointer(effectiveAddress)
            while true {
                let old = Self.atomicLoad(p, size)
                guard let new = f(old) else { return old }
                if Self.compareExchange(p, size, old, new & sizeMask(size)) { return old }
            }
        }
        let v = try readRM(size)
        if let r = f(v) { try writeRM(size, r) }
        return v
    }

    static func atomicLoad(_ p: UnsafeMutableRawPointer, _ size: Int) -> UInt64 {
        switch size {
        case 1: return UInt64(p.load(as: UInt8.self))
        case 2: return UInt64(SharedRegion.unsafe(p, count: 2).loadAcquire16(at: 0))
        case 4: return UInt64(SharedRegion.unsafe(p, count: 4).loadAcquire32(at: 0))
        default: return SharedRegion.unsafe(p, count: 8).loadAcquire64(at: 0)
        }
    }

    /// One compare-exchange of `size` bytes (a byte goes through its aligned 32-bit word).
    static func compareExchange(_ p: UnsafeMutableRawPointer, _ size: Int, _ expected: UInt64, _ desired: UInt64) -> Bool {
        switch size {
        case 1:
            let offset = Int(UInt(bitPattern: p) & 3)
            let word = SharedRegion.unsafe(p - offset, count: 4)
            let shift = UInt32(offset * 8)
            while true {
                let w = word.loadAcquire32(at: 0)
                guard UInt64((w >> shift) & 0xFF) == expected else { return false }
                let nw = (w & ~(0xFF << shift)) | UInt32(desired & 0xFF) << shift
                if word.compareExchange32(at: 0, expected: w, desired: nw) == w { return true }
            }
        case 2:
            return SharedRegion.unsafe(p, count: 2).compareExchange16(at: 0, expected: UInt16(expected), desired: UInt16(desired)) == UInt16(expected)
        case 4:
            return SharedRegion.unsafe(p, count: 4).compareExchange32(at: 0, expected: UInt32(expected), desired: UInt32(desired)) == UInt32(expected)
        default:
            return SharedRegion.unsafe(p, count: 8).compareExchange64(at: 0, expected: expected, desired: desired) == expected
        }
    }

    // MARK: The stack

    @inline(__always) func push(_ v: UInt64, _ size: Int) throws(CPUFault) {
        var sp = regs[4] &- UInt64(size)
        if !mode64 { sp &= 0xFFFF_FFFF }
        try write(sp, size, v)
        regs[4] = mode64 ? sp : (regs[4] & ~0xFFFF_FFFF) | sp
    }

    @inline(__always) func pop(_ size: Int) throws(CPUFault) -> UInt64 {
        let sp = mode64 ? regs[4] : regs[4] & 0xFFFF_FFFF
        let v = try read(sp, size)
        let next = sp &+ UInt64(size)
        regs[4] = mode64 ? next : (regs[4] & ~0xFFFF_FFFF) | (next & 0xFFFF_FFFF)
        return v
    }

    // MARK: Arithmetic

    @inline(__always) func alu(_ op: Int, _ d: UInt64, _ s: UInt64, _ size: Int) -> UInt64 {
        let r: UInt64
        switch op {
        case 0: r = d &+ s; setLazy(.add, d, s, r, size)
        case 1: r = d | s; setLazy(.logic, d, s, r, size)
        case 2:
            let c = carryFlag()
            r = d &+ s &+ c; lazyCarry = c; setLazy(.adc, d, s, r, size)
        case 3:
            let c = carryFlag()
            r = d &- s &- c; lazyCarry = c; setLazy(.sbb, d, s, r, size)
        case 4: r = d & s; setLazy(.logic, d, s, r, size)
        case 5, 7: r = d &- s; setLazy(.sub, d, s, r, size)
        default: r = d ^ s; setLazy(.logic, d, s, r, size)
        }
        return r & sizeMask(size)
    }

    @inline(__always) func incDec(_ v: UInt64, _ size: Int, dec: Bool) -> UInt64 {
        lazyCarry = carryFlag()
        let r = dec ? v &- 1 : v &+ 1
        setLazy(dec ? .dec : .inc, v, 1, r, size)
        return r & sizeMask(size)
    }

    /// Flags from a result (ZF, SF, PF) plus `cf`/`of`: for shifts and multiplies.
    @inline(__always) func setResultFlags(_ r: UInt64, _ size: Int, cf: Bool, of: Bool) {
        var f: UInt64 = parityFlag(r)
        let m = r & sizeMask(size)
        if m == 0 { f |= Flags.ZF }
        if m & signBit(size) != 0 { f |= Flags.SF }
        if cf { f |= Flags.CF }
        if of { f |= Flags.OF }
        setArithmeticFlags(f)
    }

    /// Group 2: ROL, ROR, RCL, RCR, SHL, SHR, SAL, SAR by `count` (already masked to 5 or 6
    /// bits). A zero count changes nothing.
    @inline(__always) func shift(_ op: Int, _ v: UInt64, _ count: UInt64, _ size: Int) -> UInt64 {
        if op >= 4 {
            let d = v & sizeMask(size)
            switch op {
            case 4, 6:
                let r = count >= 64 ? 0 : (d << count) & sizeMask(size)
                setLazy(.shl, d, count, r, size)
                return r
            case 5:
                let r = count >= 64 ? 0 : d >> count
                setLazy(.shr, d, count, r, size)
                return r
            default:
                let r = UInt64(bitPattern: Int64(bitPattern: signExtend(d, size)) >> Int64(min(count, 63))) & sizeMask(size)
                setLazy(.sar, d, count, r, size)
                return r
            }
        }
        return rotate(op, v, count, size)
    }

    func rotate(_ op: Int, _ v: UInt64, _ count: UInt64, _ size: Int) -> UInt64 {
        let bits = UInt64(size * 8), m = sizeMask(size)
        let d = v & m
        guard count != 0 else { return d }
        switch op {
        case 0, 1:  // ROL, ROR: only CF and OF change
            let n = count % bits
            let r = op == 0 ? ((d << n) | (d >> ((bits - n) % bits))) & m : ((d >> n) | (d << ((bits - n) % bits))) & m
            let f = arithmeticFlags() & ~(Flags.CF | Flags.OF)
            var cf: UInt64, of: Bool
            if op == 0 {
                cf = r & 1
                of = (r & signBit(size) != 0) != (cf != 0)
            } else {
                cf = r & signBit(size) != 0 ? 1 : 0
                of = (r >> (bits - 1)) & 1 != (r >> (bits - 2)) & 1
            }
            setArithmeticFlags(f | cf | (of ? Flags.OF : 0))
            return r
        case 2, 3:  // RCL, RCR through CF
            let n = count % (bits + 1)
            var r = d, cf = carryFlag()
            for _ in 0..<n {
                if op == 2 {
                    let out = (r >> (bits - 1)) & 1
                    r = ((r << 1) | cf) & m
                    cf = out
                } else {
                    let out = r & 1
                    r = (r >> 1) | (cf << (bits - 1))
                    cf = out
                }
            }
            let f = arithmeticFlags() & ~(Flags.CF | Flags.OF)
            let of = op == 2 ? ((r >> (bits - 1)) & 1) != cf : (r >> (bits - 1)) & 1 != (r >> (bits - 2)) & 1
            setArithmeticFlags(f | cf | (of ? Flags.OF : 0))
            return r
        default:  // shifts are handled inline by `shift`
            return d
        }
    }

    /// SHLD/SHRD: `d` shifted by `count` with bits from `s`.
    func doubleShift(left: Bool, _ d: UInt64, _ s: UInt64, _ count: UInt64, _ size: Int) -> UInt64 {
        let bits = UInt64(size * 8), m = sizeMask(size)
        guard count != 0, count <= bits else { return d & m }
        let r: UInt64, cf: Bool
        if left {
            r = ((d << count) | (count == bits ? s & m : (s & m) >> (bits - count))) & m
            cf = (d >> (bits - count)) & 1 != 0
        } else {
            r = (((d & m) >> count) | (count == bits ? s & m : s << (bits - count))) & m
            cf = (d >> (count - 1)) & 1 != 0
        }
        setResultFlags(r, size, cf: cf, of: (r ^ d) & signBit(size) != 0)
        return r
    }

    /// Group 3's MUL, IMUL, DIV, IDIV on rDX:rAX (AX for bytes).
    func multiplyDivide(_ op: Int, _ s: UInt64, _ size: Int) throws(CPUFault) {
        let m = sizeMask(size), bits = UInt64(size * 8)
        let a = size == 1 ? regs[0] & 0xFF : getReg(0, size)
        let hiIn = size == 1 ? (regs[0] >> 8) & 0xFF : getReg(2, size)
        func store(_ lo: UInt64, _ hi: UInt64) {
            if size == 1 { regs[0] = (regs[0] & ~0xFFFF) | (lo & 0xFF) | (hi & 0xFF) << 8 } else {
                setReg(0, size, lo); setReg(2, size, hi)
            }
        }
        switch op {
        case 4:  // MUL
            let (hi, lo): (UInt64, UInt64)
            if size == 8 { (hi, lo) = a.multipliedFullWidth(by: s) } else {
                let p = a &* (s & m)
                (hi, lo) = ((p >> bits) & m, p & m)
            }
            store(lo, hi)
            setResultFlags(lo, size, cf: hi != 0, of: hi != 0)
        case 5:  // IMUL
            let (hi, lo): (UInt64, UInt64)
            let sa = Int64(bitPattern: signExtend(a, size)), ss = Int64(bitPattern: signExtend(s, size))
            if size == 8 {
                let p = sa.multipliedFullWidth(by: ss)
                (hi, lo) = (UInt64(bitPattern: p.high), p.low)
            } else {
                let p = UInt64(bitPattern: sa &* ss)
                (hi, lo) = ((p >> bits) & m, p & m)
            }
            let fits = signExtend(lo, size) == (size == 8 ? (Int64(bitPattern: hi) < 0 ? ~0 : 0) | lo : signExtend(lo, size))
                && (hi & m) == ((lo & signBit(size)) != 0 ? m : 0)
            store(lo, hi)
            setResultFlags(lo, size, cf: !fits, of: !fits)
        case 6:  // DIV
            let d = s & m
            guard d != 0 else { throw .de }
            if size == 8 {
                guard hiIn < d else { throw .de }
                let (q, r) = d.dividingFullWidth((high: hiIn, low: a))
                store(q, r)
            } else {
                let n = hiIn << bits | a
                let q = n / d
                guard q <= m else { throw .de }
                store(q, n % d)
            }
        default:  // IDIV
            let d = Int64(bitPattern: signExtend(s, size))
            guard d != 0 else { throw .de }
            if size == 8 {
                let negative = Int64(bitPattern: hiIn) < 0
                var (nh, nl) = (hiIn, a)
                if negative { nl = ~nl &+ 1; nh = ~nh &+ (nl == 0 ? 1 : 0) }
                let dm = d < 0 ? UInt64(bitPattern: 0 &- d) : UInt64(d)
                guard nh < dm else { throw .de }
                let (q, r) = dm.dividingFullWidth((high: nh, low: nl))
                let qNegative = negative != (d < 0)
                guard qNegative ? q <= 1 << 63 : q < 1 << 63 else { throw .de }
                store(qNegative ? 0 &- q : q, negative ? 0 &- r : r)
            } else {
                let n = Int64(bitPattern: signExtend(hiIn << bits | a, size * 2))
                let (q, overflow) = n.dividedReportingOverflow(by: d)
                guard !overflow else { throw .de }
                let limit = Int64(1) << Int64(bits - 1)
                guard q >= -limit && q < limit else { throw .de }
                store(UInt64(bitPattern: q) & m, UInt64(bitPattern: n % d) & m)
            }
        }
    }

    /// Two- and three-operand IMUL: the truncated product, CF = OF = it did not fit.
    @inline(__always) func imulTruncated(_ a: UInt64, _ b: UInt64, _ size: Int) -> UInt64 {
        let sa = Int64(bitPattern: signExtend(a, size)), sb = Int64(bitPattern: signExtend(b, size))
        let r: UInt64, fits: Bool
        if size == 8 {
            let (p, overflow) = sa.multipliedReportingOverflow(by: sb)
            r = UInt64(bitPattern: p); fits = !overflow
        } else {
            let p = sa &* sb
            r = UInt64(bitPattern: p) & sizeMask(size)
            fits = Int64(bitPattern: signExtend(r, size)) == p
        }
        // The flags stay lazy: a multiply's are rarely read before the next ALU operation.
        lazyCarry = fits ? 0 : 1
        setLazy(.mul, a, b, r, size)
        return r
    }

    // MARK: One instruction

    /// Decodes and executes the instruction at RIP.
    func step() throws(CPUFault) {
        try beginFetch()
        rex = 0
        rexPresent = false
        operandOverride = false
        segmentBase = 0
        lockPrefix = false
        let long = mode64
        addressSize = long ? 8 : 4
        let repPrefix: UInt8 = 0  // 0xF3 or 0xF2 once the prefix loop sees one
        var op = try fetch8()
        // Most instructions have no prefix but REX: test for the rest with a few compares.
        let legacy = op == 0x66 || op == 0x67 || op & 0xFE == 0xF2 || op == 0xF0 || op & 0xE7 == 0x26 || op & 0xFE == 0x64
        if !legacy {
            if long && op & 0xF0 == 0x40 {
                rex = op & 0xF
                rexPresent = true
                op = try fetch8()
                if op & 0xF0 == 0x40 { return try prefixed(op, 0, long: long) }
            }
            if long && registerForm(op) { return }
            return try execute(op, 0)
        }
        return try prefixed(op, repPrefix, long: long)
    }

    /// The commonest shape in compiled 64-bit code, register to register with no prefix but
    /// REX: MOV, the ALU operations and TEST on 32- or 64-bit registers, without the general
    /// ModRM decoder. False when the instruction is not of that shape (nothing consumed).
    @inline(__always) func registerForm(_ op: UInt8) -> Bool {
        // Up to two more bytes are read (ModRM and an imm8, or a rel8); near the end of a page
        // whose successor is missing the general decoder raises the fault instead.
        guard fetchPosition &+ 2 <= fetchAvailable else { return false }
        switch op {
        case 0x01, 0x03, 0x09, 0x0B, 0x11, 0x13, 0x19, 0x1B, 0x21, 0x23, 0x29, 0x2B, 0x31, 0x33, 0x39, 0x3B, 0x85, 0x89, 0x8B:
            break
        case 0x70...0x7F, 0xEB:  // Jcc rel8, JMP rel8
            let disp = UInt64(bitPattern: Int64(Int8(bitPattern: fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self))))
            fetchPosition &+= 1
            finish()
            if op == 0xEB || condition(op & 0xF) { rip &+= disp }
            return true
        case 0x83:  // ALU r, imm8
            let m = fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self)
            guard m >= 0xC0 else { return false }
            let imm = UInt64(bitPattern: Int64(Int8(bitPattern: fetchPointer.load(fromByteOffset: fetchPosition &+ 1, as: UInt8.self))))
            fetchPosition &+= 2
            let r = Int(m & 7) | Int(rex & 1) << 3, kind = Int((m >> 3) & 7)
            let size = rex & 8 != 0 ? 8 : 4
            let result = alu(kind, regs[r] & sizeMask(size), imm & sizeMask(size), size)
            if kind != 7 { regs[r] = result }
            finish()
            return true
        case 0xC1:  // SHL/SHR/SAR r, imm8
            let m = fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self)
            let kind = Int((m >> 3) & 7)
            guard m >= 0xC0, kind >= 4 else { return false }
            let count = UInt64(fetchPointer.load(fromByteOffset: fetchPosition &+ 1, as: UInt8.self))
            fetchPosition &+= 2
            let r = Int(m & 7) | Int(rex & 1) << 3
            let size = rex & 8 != 0 ? 8 : 4
            let masked = count & (size == 8 ? 63 : 31)
            let v = regs[r] & sizeMask(size)
            regs[r] = masked != 0 ? shift(kind, v, masked, size) : v
            finish()
            return true
        default:
            return false
        }
        let m = fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self)
        guard m >= 0xC0 else { return false }
        fetchPosition &+= 1
        let reg = Int((m >> 3) & 7) | Int(rex & 4) << 1, rm = Int(m & 7) | Int(rex & 1) << 3
        let (dst, src) = op & 2 == 0 ? (rm, reg) : (reg, rm)
        let wide = rex & 8 != 0
        let mask: UInt64 = wide ? ~0 : 0xFFFF_FFFF
        let size = wide ? 8 : 4
        switch op {
        case 0x89, 0x8B:
            regs[dst] = regs[src] & mask
        case 0x85:
            _ = alu(4, regs[dst] & mask, regs[src] & mask, size)
        default:
            let kind = Int(op >> 3)
            let r = alu(kind, regs[dst] & mask, regs[src] & mask, size)
            if kind != 7 { regs[dst] = r }
        }
        finish()
        return true
    }

    /// The general prefix loop (legacy prefixes in any order, REX only when it comes last).
    func prefixed(_ first: UInt8, _ rep: UInt8, long: Bool) throws(CPUFault) {
        var op = first
        var repPrefix = rep
        while true {
            switch op {
            case 0x66: operandOverride = true
            case 0x67:
                guard long else { throw unimplementedInstruction() }  // 16-bit addressing: real mode only
                addressSize = 4
            case 0xF2, 0xF3: repPrefix = op
            case 0xF0: lockPrefix = true
            case 0x2E, 0x3E, 0x26, 0x36: break  // CS/DS/ES/SS: flat
            case 0x64: segmentBase = fsBase
            case 0x65: segmentBase = gsBase
            case 0x40...0x4F where long:
                rex = op & 0xF
                rexPresent = true
                op = try fetch8()
                if (0x40...0x4F).contains(op) { continue }
                return try execute(op, repPrefix)
            default:
                return try execute(op, repPrefix)
            }
            rex = 0
            rexPresent = false
            op = try fetch8()
        }
    }

    @inline(__always) func finish() { rip &+= UInt64(fetchPosition) }

    func execute(_ op: UInt8, _ repPrefix: UInt8) throws(CPUFault) {
        switch op {
        case 0x00...0x3F where op & 7 < 6:
            let kind = Int(op >> 3)
            switch op & 7 {
            case 0, 1:
                let size = op & 1 == 0 ? 1 : operandSize()
                try decodeModRM()
                let s = getReg(modrmReg, size)
                if lockPrefix {
                    try modifyRM(size) { d in let r = alu(kind, d, s, size); return kind != 7 ? r : nil }
                } else {
                    let r = alu(kind, try readRM(size), s, size)
                    if kind != 7 { try writeRM(size, r) }
                }
            case 2, 3:
                let size = op & 1 == 0 ? 1 : operandSize()
                try decodeModRM()
                let s = try readRM(size), d = getReg(modrmReg, size)
                let r = alu(kind, d, s, size)
                if kind != 7 { setReg(modrmReg, size, r) }
            case 4:
                let s = UInt64(try fetch8())
                let r = alu(kind, regs[0] & 0xFF, s, 1)
                if kind != 7 { setReg(0, 1, r) }
            default:
                let size = operandSize()
                let s = try fetchImmediate(size)
                let r = alu(kind, getReg(0, size), s, size)
                if kind != 7 { setReg(0, size, r) }
            }
        case 0x40...0x4F:  // INC/DEC r (32-bit mode; REX in long mode never reaches here)
            let size = operandSize(), r = Int(op & 7)
            setReg(r, size, incDec(getReg(r, size), size, dec: op >= 0x48))
        case 0x50...0x57:
            let size = stackOperandSize()
            try push(getReg(Int(op & 7) | Int(rex & 1) << 3, size), size)
        case 0x58...0x5F:
            let size = stackOperandSize()
            let v = try pop(size)
            setReg(Int(op & 7) | Int(rex & 1) << 3, size, v)
        case 0x63 where mode64:  // MOVSXD
            let size = operandSize()
            try decodeModRM()
            let v = signExtend(try readRM(4), 4)
            setReg(modrmReg, size, v)
        case 0x68:
            let size = stackOperandSize()
            let v = size == 2 ? try fetch16() : try fetchS32()
            try push(v, size)
        case 0x6A:
            let size = stackOperandSize()
            try push(try fetchS8(), size)
        case 0x69, 0x6B:
            let size = operandSize()
            try decodeModRM(immediate: op == 0x6B ? 1 : min(size, 4))
            let a = try readRM(size)
            let b = op == 0x6B ? try fetchS8() : try fetchImmediate(size)
            setReg(modrmReg, size, imulTruncated(a, b, size))
        case 0x70...0x7F:
            let disp = try fetchS8()
            finish()
            if condition(op & 0xF) { jump(rip &+ disp) }
            return
        case 0x80, 0x81, 0x83:
            let size = op == 0x80 ? 1 : operandSize()
            try decodeModRM(immediate: op == 0x81 ? min(size, 4) : 1)
            let s = op == 0x83 ? try fetchS8() & sizeMask(size) : try fetchImmediate(size)
            let kind = modrmReg & 7
            if lockPrefix {
                try modifyRM(size) { d in let r = alu(kind, d, s, size); return kind != 7 ? r : nil }
            } else {
                let r = alu(kind, try readRM(size), s, size)
                if kind != 7 { try writeRM(size, r) }
            }
        case 0x84, 0x85:
            let size = op == 0x84 ? 1 : operandSize()
            try decodeModRM()
            let d = try readRM(size)
            _ = alu(4, d, getReg(modrmReg, size), size)
        case 0x86, 0x87:
            let size = op == 0x86 ? 1 : operandSize()
            try decodeModRM()
            let b = getReg(modrmReg, size)
            let a = try modifyRM(size, atomic: true) { _ in b }  // XCHG with memory is always locked
            setReg(modrmReg, size, a)
        case 0x88...0x8B:
            let size = op & 1 == 0 ? 1 : operandSize()
            try decodeModRM()
            if op < 0x8A { try writeRM(size, getReg(modrmReg, size)) } else { setReg(modrmReg, size, try readRM(size)) }
        case 0x8C:
            try decodeModRM()
            try writeRM(modrmIsRegister ? operandSize() : 2, UInt64(selector(modrmReg & 7)))
        case 0x8D:
            try decodeModRM()
            guard !modrmIsRegister else { throw .ud }
            setReg(modrmReg, operandSize(), effectiveAddress &- segmentBase)
        case 0x8E:
            try decodeModRM()
            try loadSegment(modrmReg & 7, UInt16(truncatingIfNeeded: try readRM(2)))
        case 0x8F:
            let size = stackOperandSize()
            try decodeModRM()
            let sp = regs[4]
            let v = try pop(size)
            do { try writeRM(size, v) } catch { regs[4] = sp; throw error }
        case 0x90 where rex & 1 == 0:  // NOP, PAUSE
            break
        case 0x90...0x97:
            let size = operandSize(), r = Int(op & 7) | Int(rex & 1) << 3
            let a = getReg(0, size)
            setReg(0, size, getReg(r, size))
            setReg(r, size, a)
        case 0x98:  // CBW/CWDE/CDQE
            let size = operandSize()
            setReg(0, size, signExtend(getReg(0, size / 2), size / 2))
        case 0x99:  // CWD/CDQ/CQO
            let size = operandSize()
            setReg(2, size, getReg(0, size) & signBit(size) != 0 ? ~0 : 0)
        case 0x9C:
            try push(rflags & ~(Flags.RF), stackOperandSize())
        case 0x9D:
            let size = stackOperandSize()
            let v = try pop(size)
            rflags = size == 2 ? (rflags & ~0xFFFF) | v : v
        case 0x9E:  // SAHF
            setArithmeticFlags((arithmeticFlags() & Flags.OF) | (regs[0] >> 8) & 0xD5)
        case 0x9F:  // LAHF
            regs[0] = (regs[0] & ~0xFF00) | ((rflags & 0xD7) | 2) << 8
        case 0xA0...0xA3:  // MOV moffs
            let size = op & 1 == 0 ? 1 : operandSize()
            let address = (addressSize == 8 ? try fetch64() : try fetch32()) &+ segmentBase
            if op < 0xA2 { setReg(0, size, try read(address, size)) } else { try write(address, size, getReg(0, size)) }
        case 0xA4...0xA7, 0xAA...0xAF:
            try stringInstruction(op, repPrefix)
        case 0xA8, 0xA9:
            let size = op == 0xA8 ? 1 : operandSize()
            _ = alu(4, getReg(0, size), try fetchImmediate(size), size)
        case 0xB0...0xB7:
            setReg(Int(op & 7) | Int(rex & 1) << 3, 1, UInt64(try fetch8()))
        case 0xB8...0xBF:
            let size = operandSize()
            let v = size == 8 ? try fetch64() : try fetchImmediate(size)
            setReg(Int(op & 7) | Int(rex & 1) << 3, size, v)
        case 0xC0, 0xC1, 0xD0...0xD3:
            let size = op & 1 == 0 ? 1 : operandSize()
            try decodeModRM(immediate: op < 0xC2 ? 1 : 0)
            let count: UInt64
            switch op {
            case 0xC0, 0xC1: count = UInt64(try fetch8())
            case 0xD0, 0xD1: count = 1
            default: count = regs[1] & 0xFF
            }
            let v = try readRM(size)
            let masked = count & (size == 8 ? 63 : 31)
            // Even a zero count writes the destination (a 32-bit register is zero-extended).
            try writeRM(size, masked != 0 ? shift(modrmReg & 7, v, masked, size) : v)
        case 0xC2, 0xC3:
            let size = stackOperandSize()
            let extra = op == 0xC2 ? try fetch16() : 0
            let target = try pop(size)
            regs[4] &+= extra
            rip = target
            return
        case 0xC6, 0xC7:
            let size = op == 0xC6 ? 1 : operandSize()
            try decodeModRM(immediate: min(size, 4))
            guard modrmReg & 7 == 0 else { throw unimplementedInstruction() }
            try writeRM(size, try fetchImmediate(size))
        case 0xC9:  // LEAVE
            let size = stackOperandSize()
            let saved = regs[4]
            regs[4] = regs[5]
            do { setReg(5, size, try pop(size)) } catch { regs[4] = saved; throw error }
        case 0xCA, 0xCB:  // far RET: reload CS
            let size = rex & 8 != 0 ? 8 : (operandOverride ? 2 : 4)
            let extra = op == 0xCA ? try fetch16() : 0
            let saved = regs[4]
            let target = try pop(size)
            let cs = try pop(size)
            do { try loadCS(UInt16(truncatingIfNeeded: cs)) } catch { regs[4] = saved; throw error }
            regs[4] &+= extra
            rip = target
            return
        case 0xCC:
            finish()
            try deliver(vector: 3, errorCode: nil, software: true)
            return
        case 0xCD:
            let vector = try fetch8()
            finish()
            try deliver(vector: vector, errorCode: nil, software: true)
            return
        case 0xCF:
            flushDecodeCache()  // IRET serializes, as CPUID
            try interruptReturn()
            return
        case 0xE3:  // JrCXZ
            let disp = try fetchS8()
            finish()
            if getReg(1, addressSize) == 0 { jump(rip &+ disp) }
            return
        case 0xE0...0xE2:  // LOOPNE, LOOPE, LOOP
            let disp = try fetchS8()
            finish()
            let c = getReg(1, addressSize) &- 1
            setReg(1, addressSize, c)
            let taken = c != 0 && (op == 0xE2 || condition(op == 0xE1 ? 4 : 5))
            if taken { jump(rip &+ disp) }
            return
        case 0xE4, 0xE5, 0xEC, 0xED:
            let port = op < 0xE8 ? UInt16(try fetch8()) : UInt16(truncatingIfNeeded: regs[2])
            finish()
            pendingPortIn = (op & 1 == 0 ? 1 : (operandOverride ? 2 : 4), true)
            exitPending = true
            pendingExit = .portIn(port: port, size: pendingPortIn.size)
            return
        case 0xE6, 0xE7, 0xEE, 0xEF:
            let port = op < 0xE8 ? UInt16(try fetch8()) : UInt16(truncatingIfNeeded: regs[2])
            let size = op & 1 == 0 ? 1 : (operandOverride ? 2 : 4)
            let length = fetchPosition
            finish()
            exitPending = true
            pendingExit = .portOut(port: port, size: size, value: UInt32(truncatingIfNeeded: regs[0] & sizeMask(size)), length: length)
            return
        case 0xE8:
            let size = stackOperandSize()
            let disp = size == 2 ? signExtend(try fetch16(), 2) : try fetchS32()
            finish()
            try push(rip, size)
            jump(rip &+ disp)
            return
        case 0xE9:
            let disp = operandOverride && !mode64 ? signExtend(try fetch16(), 2) : try fetchS32()
            finish()
            jump(rip &+ disp)
            return
        case 0xEA where !mode64:  // JMP ptr16:32 (the PVH entry's switch to 64-bit code)
            let target = operandOverride ? try fetch16() : try fetch32()
            let cs = UInt16(try fetch16())
            try loadCS(cs)
            rip = target
            return
        case 0xEB:
            let disp = try fetchS8()
            finish()
            jump(rip &+ disp)
            return
        case 0xF4:
            finish()
            exitPending = true
            pendingExit = interruptFlag ? .halt : .shutdown("HLT with interrupts disabled at RIP 0x\(String(rip &- 1, radix: 16))")
            return
        case 0xF5: setArithmeticFlags(arithmeticFlags() ^ Flags.CF)
        case 0xF6, 0xF7:
            let size = op == 0xF6 ? 1 : operandSize()
            try decodeModRM(immediate: modrmPeekIsTest() ? min(size, 4) : 0)
            switch modrmReg & 7 {
            case 0, 1:
                let v = try readRM(size)
                _ = alu(4, v, try fetchImmediate(size), size)
            case 2: try modifyRM(size) { v in ~v & sizeMask(size) }
            case 3: try modifyRM(size) { v in alu(5, 0, v, size) }
            default: try multiplyDivide(modrmReg & 7, try readRM(size), size)
            }
        case 0xF8: setArithmeticFlags(arithmeticFlags() & ~Flags.CF)
        case 0xF9: setArithmeticFlags(arithmeticFlags() | Flags.CF)
        case 0xFA: flagsStored &= ~Flags.IF
        case 0xFB:
            if flagsStored & Flags.IF == 0 { interruptShadow = true }
            flagsStored |= Flags.IF
        case 0xFC: flagsStored &= ~Flags.DF
        case 0xFD: flagsStored |= Flags.DF
        case 0xFE, 0xFF:
            let size = op == 0xFE ? 1 : operandSize()
            try decodeModRM()
            switch modrmReg & 7 {
            case 0, 1:
                let dec = modrmReg & 7 == 1
                try modifyRM(size) { v in incDec(v, size, dec: dec) }
            case 2 where op == 0xFF:  // CALL near indirect
                let ssize = stackOperandSize()
                let target = try readRM(ssize)
                finish()
                try push(rip, ssize)
                rip = target
                return
            case 4 where op == 0xFF:  // JMP near indirect
                rip = try readRM(stackOperandSize())
                return
            case 6 where op == 0xFF:
                let ssize = stackOperandSize()
                try push(try readRM(ssize), ssize)
            default:
                throw unimplementedInstruction()
            }
        case 0x0F:
            try executeTwoByte(try fetch8(), repPrefix)
            return
        default:
            throw unimplementedInstruction()
        }
        finish()
    }

    /// Whether the ModRM byte at the fetch position selects TEST (F6/F7 /0 and /1 take an immediate).
    @inline(__always) func modrmPeekIsTest() -> Bool {
        guard fetchPosition < fetchAvailable else { return false }
        return (fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self) >> 3) & 6 == 0
    }

    @inline(__always) func jump(_ target: UInt64) {
        rip = mode64 ? target : target & 0xFFFF_FFFF
    }

    // MARK: String instructions

    func stringInstruction(_ op: UInt8, _ repPrefix: UInt8) throws(CPUFault) {
        let size = op & 1 == 0 ? 1 : operandSize()
        let step = flagsStored & Flags.DF != 0 ? 0 &- UInt64(size) : UInt64(size)
        let am = sizeMask(addressSize)
        let kind = op & 0xFE
        @inline(__always) func advance(_ r: Int) { regs[r] = (regs[r] & ~am) | ((regs[r] &+ step) & am) }
        @inline(__always) func once() throws(CPUFault) {
            switch kind {
            case 0xA4:  // MOVS
                let v = try read((regs[6] & am) &+ segmentBase, size)
                try write(regs[7] & am, size, v)
                advance(6); advance(7)
            case 0xA6:  // CMPS
                let a = try read((regs[6] & am) &+ segmentBase, size), b = try read(regs[7] & am, size)
                _ = alu(7, a, b, size)
                advance(6); advance(7)
            case 0xAA:  // STOS
                try write(regs[7] & am, size, getReg(0, size))
                advance(7)
            case 0xAC:  // LODS
                setReg(0, size, try read((regs[6] & am) &+ segmentBase, size))
                advance(6)
            default:  // SCAS
                let b = try read(regs[7] & am, size)
                _ = alu(7, getReg(0, size), b, size)
                advance(7)
            }
        }
        if repPrefix == 0 {
            try once()
            return
        }
        let compares = kind == 0xA6 || kind == 0xAE
        if !compares && kind == 0xAA && step == UInt64(size) && addressSize == 8 {
            try fastStore(size)
        }
        while regs[1] & am != 0 {
            try once()
            regs[1] = (regs[1] & ~am) | ((regs[1] &- 1) & am)
            instructions &+= 1  // each iteration retires
            if compares && condition(repPrefix == 0xF3 ? 5 : 4) { break }  // REPE stops on NE, REPNE on E
        }
    }

    /// REP STOS forward in 64-bit addressing: whole runs within a page at once.
    private func fastStore(_ size: Int) throws(CPUFault) {
        let value = getReg(0, size)
        while regs[1] != 0 {
            let di = regs[7]
            let room = (4096 &- Int(di & 0xFFF)) / size
            guard room > 0, di & UInt64(size &- 1) == 0 else { return }
            let n = Int(min(UInt64(room), regs[1]))
            let p = try writePointer(di)
            switch size {
            case 1: p.initializeMemory(as: UInt8.self, repeating: UInt8(truncatingIfNeeded: value), count: n)
            case 2: p.bindMemory(to: UInt16.self, capacity: n).update(repeating: UInt16(truncatingIfNeeded: value), count: n)
            case 4: p.bindMemory(to: UInt32.self, capacity: n).update(repeating: UInt32(truncatingIfNeeded: value), count: n)
            default: p.bindMemory(to: UInt64.self, capacity: n).update(repeating: value, count: n)
            }
            regs[7] = di &+ UInt64(n &* size)
            regs[1] &-= UInt64(n)
            instructions &+= UInt64(n)
        }
    }

    // MARK: The two-byte map

    func executeTwoByte(_ op: UInt8, _ repPrefix: UInt8) throws(CPUFault) {
        switch op {
        case 0x00:  // group 6: SLDT, STR, LLDT, LTR
            try decodeModRM()
            switch modrmReg & 7 {
            case 0: try writeRM(2, 0)
            case 1: try writeRM(2, UInt64(trSelector))
            case 2:
                guard try readRM(2) & ~3 == 0 else { throw unimplementedInstruction() }  // only a null LDT
            case 3: try loadTaskRegister(UInt16(truncatingIfNeeded: try readRM(2)))
            default: throw unimplementedInstruction()
            }
        case 0x01:
            try groupSeven()
            return
        case 0x06: cr0 &= ~CR0.TS  // CLTS
        case 0x08, 0x09: break  // INVD, WBINVD: no caches to write back
        case 0x0B: throw .ud  // UD2
        case 0x0D, 0x18...0x1F:  // prefetches and hint NOPs
            try decodeModRM()
        case 0x20, 0x22:  // MOV from/to CR
            try decodeModRM()
            let n = modrmReg
            if op == 0x20 {
                let v: UInt64
                switch n {
                case 0: v = cr0
                case 2: v = cr2
                case 3: v = cr3
                case 4: v = cr4
                case 8: v = cr8
                default: throw .ud
                }
                setReg(modrmRM, mode64 ? 8 : 4, v)
            } else {
                finish()
                try writeControlRegister(n, getReg(modrmRM, mode64 ? 8 : 4))
                return
            }
        case 0x21, 0x23:  // MOV DR: debug registers read as 0, writes are ignored
            try decodeModRM()
            if op == 0x21 { setReg(modrmRM, mode64 ? 8 : 4, 0) }
        case 0x30:  // WRMSR
            let msr = UInt32(truncatingIfNeeded: regs[1])
            let value = (regs[2] & 0xFFFF_FFFF) << 32 | (regs[0] & 0xFFFF_FFFF)
            finish()
            if try writeMSR(msr, value) { return }
            pendingMSRWrite = (msr, true)
            exitPending = true
            pendingExit = .writeMSR(msr: msr, value: value)
            return
        case 0x31:  // RDTSC
            let t = tsc
            regs[0] = t & 0xFFFF_FFFF
            regs[2] = t >> 32
        case 0x32:  // RDMSR
            let v = try readMSR(UInt32(truncatingIfNeeded: regs[1]))
            regs[0] = v & 0xFFFF_FFFF
            regs[2] = v >> 32
        case 0x40...0x4F:  // CMOVcc
            let size = operandSize()
            try decodeModRM()
            let v = try readRM(size)
            if condition(op & 0xF) { setReg(modrmReg, size, v) } else if size == 4 { regs[modrmReg] &= 0xFFFF_FFFF }
        case 0x80...0x8F:
            let disp = operandOverride && !mode64 ? signExtend(try fetch16(), 2) : try fetchS32()
            finish()
            if condition(op & 0xF) { jump(rip &+ disp) }
            return
        case 0x90...0x9F:
            try decodeModRM()
            try writeRM(1, condition(op & 0xF) ? 1 : 0)
        case 0xA2:  // CPUID, serializing: code other vCPUs wrote is seen from here on
            flushDecodeCache()
            let (a, b, c, d) = cpuid(UInt32(truncatingIfNeeded: regs[0]), UInt32(truncatingIfNeeded: regs[1]))
            regs[0] = UInt64(a); regs[3] = UInt64(b); regs[1] = UInt64(c); regs[2] = UInt64(d)
        case 0xA3, 0xAB, 0xB3, 0xBB, 0xBA:
            try bitTest(op)
        case 0xA4, 0xA5, 0xAC, 0xAD:  // SHLD, SHRD
            let size = operandSize()
            try decodeModRM(immediate: op & 1 == 0 ? 1 : 0)
            let count = (op & 1 == 0 ? UInt64(try fetch8()) : regs[1]) & (size == 8 ? 63 : 31)
            let d = try readRM(size)
            try writeRM(size, count != 0 ? doubleShift(left: op < 0xA8, d, getReg(modrmReg, size), count, size) : d)
        case 0xAE:
            try decodeModRM()
            guard modrmIsRegister || modrmReg & 7 == 7 else { throw unimplementedInstruction() }  // fences; CLFLUSH
        case 0xAF:
            let size = operandSize()
            try decodeModRM()
            setReg(modrmReg, size, imulTruncated(getReg(modrmReg, size), try readRM(size), size))
        case 0xB0, 0xB1:  // CMPXCHG
            let size = op == 0xB0 ? 1 : operandSize()
            try decodeModRM()
            let a = getReg(0, size), s = getReg(modrmReg, size)
            // The destination is written back on failure (the locked cycle does; a 32-bit
            // register is zero-extended): a CAS that changes nothing is the same to others.
            let d = try modifyRM(size) { d in _ = alu(7, a, d, size); return a == d ? s : d }
            if a != d { setReg(0, size, d) }
        case 0xB6, 0xB7, 0xBE, 0xBF:  // MOVZX, MOVSX
            let size = operandSize(), from = op & 1 == 0 ? 1 : 2
            try decodeModRM()
            let v = try readRM(from)
            setReg(modrmReg, size, op < 0xB8 ? v : signExtend(v, from))
        case 0xB8 where repPrefix == 0xF3:  // POPCNT
            let size = operandSize()
            try decodeModRM()
            let v = try readRM(size)
            setArithmeticFlags(v == 0 ? Flags.ZF : 0)
            setReg(modrmReg, size, UInt64(v.nonzeroBitCount))
        case 0xBC, 0xBD:  // BSF, BSR (TZCNT/LZCNT are not offered in CPUID, so F3 is ignored)
            let size = operandSize()
            try decodeModRM()
            let v = try readRM(size)
            let f = arithmeticFlags() & ~Flags.ZF
            if v == 0 {
                setArithmeticFlags(f | Flags.ZF)
            } else {
                setArithmeticFlags(f)
                setReg(modrmReg, size, op == 0xBC ? UInt64(v.trailingZeroBitCount) : UInt64(63 - v.leadingZeroBitCount))
            }
        case 0xC0, 0xC1:  // XADD
            let size = op == 0xC0 ? 1 : operandSize()
            try decodeModRM()
            let s = getReg(modrmReg, size)
            if modrmIsRegister {  // the source takes the old value first, then the sum lands
                let d = getReg(modrmRM, size)
                let sum = alu(0, d, s, size)
                setReg(modrmReg, size, d)
                setReg(modrmRM, size, sum)
            } else {
                let d = try modifyRM(size) { d in alu(0, d, s, size) }
                setReg(modrmReg, size, d)
            }
        case 0xC8...0xCF:  // BSWAP
            let size = operandSize(), r = Int(op & 7) | Int(rex & 1) << 3
            let v = getReg(r, size)
            setReg(r, size, size == 8 ? v.byteSwapped : UInt64(UInt32(truncatingIfNeeded: v).byteSwapped))
        default:
            if try sse(op, repPrefix) { return }
            throw unimplementedInstruction()
        }
        finish()
    }

    /// BT, BTS, BTR, BTC (register or immediate bit offset; a register offset reaches beyond
    /// a memory operand, as the hardware's does).
    func bitTest(_ op: UInt8) throws(CPUFault) {
        let size = operandSize(), bits = UInt64(size * 8)
        try decodeModRM(immediate: op == 0xBA ? 1 : 0)
        var kind: Int, offset: UInt64
        if op == 0xBA {
            kind = modrmReg & 7
            guard kind >= 4 else { throw unimplementedInstruction() }
            kind -= 4
            offset = UInt64(try fetch8()) & (bits - 1)
        } else {
            kind = Int((op >> 3) & 3)
            let src = getReg(modrmReg, size)
            if modrmIsRegister {
                offset = src & (bits - 1)
            } else {
                let signed = Int64(bitPattern: signExtend(src, size))
                let unit = signed >> Int64(bits.trailingZeroBitCount)
                effectiveAddress &+= UInt64(bitPattern: unit &* Int64(size))
                offset = UInt64(bitPattern: signed) & (bits - 1)
            }
        }
        let bit: UInt64 = 1 << offset
        let f = arithmeticFlags() & ~Flags.CF
        try modifyRM(size) { v in
            setArithmeticFlags(f | (v & bit != 0 ? Flags.CF : 0))
            switch kind {
            case 1: return v | bit
            case 2: return v & ~bit
            case 3: return v ^ bit
            default: return nil
            }
        }
    }

    /// 0F 01: LGDT, LIDT, SGDT, SIDT, INVLPG, SWAPGS, RDTSCP, VMCALL, VMMCALL.
    func groupSeven() throws(CPUFault) {
        guard fetchPosition < fetchAvailable else { throw fetchFault }
        let m = fetchPointer.load(fromByteOffset: fetchPosition, as: UInt8.self)
        switch m {
        case 0xC1, 0xD9:  // VMCALL, VMMCALL: a hypercall trap
            fetchPosition += 1
            let length = fetchPosition
            finish()
            exitPending = true
            pendingExit = .hypercall(length: length)
            return
        case 0xF8:  // SWAPGS
            guard mode64 else { throw .ud }
            fetchPosition += 1
            (gsBase, kernelGSBase) = (kernelGSBase, gsBase)
        case 0xF9:  // RDTSCP
            fetchPosition += 1
            let t = tsc
            regs[0] = t & 0xFFFF_FFFF
            regs[2] = t >> 32
            regs[1] = 0
        default:
            try decodeModRM()
            guard !modrmIsRegister else { throw unimplementedInstruction() }
            let baseSize = mode64 ? 8 : 4
            switch modrmReg & 7 {
            case 0, 1:
                let (base, limit) = modrmReg & 7 == 0 ? (gdtBase, gdtLimit) : (idtBase, idtLimit)
                try write(effectiveAddress, 2, UInt64(limit))
                try write(effectiveAddress &+ 2, baseSize, base)
            case 2, 3:
                let limit = UInt16(try read(effectiveAddress, 2))
                var base = try read(effectiveAddress &+ 2, baseSize)
                if operandOverride && !mode64 { base &= 0xFF_FFFF }
                if modrmReg & 7 == 2 { (gdtBase, gdtLimit) = (base, limit) } else { (idtBase, idtLimit) = (base, limit) }
            case 7:
                flushTLB()  // INVLPG: whole TLB, since a large page spans many entries
            default:
                throw unimplementedInstruction()
            }
        }
        finish()
    }
}
