/// System state: segment and descriptor loads, control registers, MSRs, interrupt and
/// exception delivery through the guest's long-mode IDT, IRET; and the SSE2 subset.
extension SoftCPU {
    // MARK: Segments

    func selector(_ index: Int) -> UInt16 {
        switch index {
        case 0: selectors.0
        case 1: selectors.1
        case 2: selectors.2
        case 3: selectors.3
        case 4: selectors.4
        default: selectors.5
        }
    }

    /// The 8-byte GDT descriptor for `selector` (LDT selectors are refused: there is no LDT).
    func descriptor(_ selector: UInt16) throws(CPUFault) -> UInt64 {
        let code = UInt32(selector & ~3)
        guard selector & 4 == 0, UInt64(selector | 7) <= UInt64(gdtLimit) else { throw .gp(code) }
        return try read(gdtBase &+ UInt64(selector & ~7), 8)
    }

    /// Loads CS (far jump, far return, IRET, interrupt gates): its L and D bits set the mode.
    func loadCS(_ selector: UInt16) throws(CPUFault) {
        guard selector & ~3 != 0 else { throw .gp() }
        let d = try descriptor(selector)
        guard d & (1 << 44) != 0, d & (1 << 43) != 0 else { throw .gp(UInt32(selector & ~3)) }  // a code segment
        guard d & (1 << 47) != 0 else { throw CPUFault(11, UInt32(selector & ~3)) }
        let long = d & (1 << 53) != 0 && efer & EFER.LMA != 0
        selectors.1 = selector
        csLong = long
        csDefault32 = long ? false : d & (1 << 54) != 0
        codePage = TLB.invalid  // the decode cache holds 64-bit code only: find the page anew
    }

    /// MOV to ES, SS, DS, FS, GS: flat segments (base 0) except FS and GS, whose base comes
    /// from the descriptor (0 for a null selector); a move to SS holds off interrupts for one
    /// instruction.
    func loadSegment(_ index: Int, _ selector: UInt16) throws(CPUFault) {
        guard index != 1 else { throw .ud }
        var base: UInt64 = 0
        if selector & ~3 != 0 {
            let d = try descriptor(selector)
            guard d & (1 << 47) != 0 else { throw CPUFault(index == 2 ? 12 : 11, UInt32(selector & ~3)) }
            base = (d >> 16) & 0xFF_FFFF | ((d >> 56) & 0xFF) << 24
        } else if index == 2 && !mode64 {
            throw .gp()
        }
        switch index {
        case 0: selectors.0 = selector
        case 2:
            selectors.2 = selector
            interruptShadow = true
        case 3: selectors.3 = selector
        case 4:
            selectors.4 = selector
            fsBase = base
        default:
            selectors.5 = selector
            gsBase = base
        }
    }

    /// LTR: the TSS descriptor (16 bytes in long mode) gives the base the IST stacks come from.
    func loadTaskRegister(_ selector: UInt16) throws(CPUFault) {
        guard selector & ~3 != 0 else { throw .gp() }
        let low = try descriptor(selector)
        let type = (low >> 40) & 0xF
        guard type == 9 else { throw .gp(UInt32(selector & ~3)) }  // an available TSS
        var base = (low >> 16) & 0xFF_FFFF | ((low >> 56) & 0xFF) << 24
        if longMode { base |= (try read(gdtBase &+ UInt64(selector & ~7) &+ 8, 8) & 0xFFFF_FFFF) << 32 }
        try write(gdtBase &+ UInt64(selector & ~7) &+ 5, 1, ((low >> 40) & 0xFF) | 2)  // busy
        trSelector = selector
        trBase = base
        trLimit = UInt32(low & 0xFFFF) | UInt32((low >> 48) & 0xF) << 16
    }

    // MARK: Control registers and MSRs

    func writeControlRegister(_ n: Int, _ value: UInt64) throws(CPUFault) {
        switch n {
        case 0:
            var v = value | CR0.ET
            if v & CR0.PG != 0 && v & CR0.PE == 0 { throw .gp() }
            if v & CR0.PG != 0 && cr0 & CR0.PG == 0 {
                if efer & EFER.LME != 0 {
                    guard cr4 & CR4.PAE != 0 else { throw .gp() }
                    efer |= EFER.LMA
                } else {
                    // Legacy 32-bit paging (with or without PAE) is not modelled: no PVH guest needs it.
                    exitPending = true
                    pendingExit = .shutdown("32-bit paging without long mode is not modelled by the SoftCPU")
                    return
                }
            }
            if v & CR0.PG == 0 {
                guard !csLong else { throw .gp() }  // paging stays on in 64-bit code
                efer &= ~EFER.LMA
            }
            v &= 0xFFFF_FFFF
            cr0 = v
            flushTLB()
        case 2: cr2 = value
        case 3:
            cr3 = value
            flushTLB()
        case 4:
            if longMode && value & CR4.PAE == 0 { throw .gp() }
            cr4 = value
            flushTLB()
        case 8: cr8 = value & 0xF
        default: throw .ud
        }
    }

    enum MSR {
        static let tsc: UInt32 = 0x10, apicBase: UInt32 = 0x1B, miscEnable: UInt32 = 0x1A0, pat: UInt32 = 0x277
        static let efer: UInt32 = 0xC000_0080, star: UInt32 = 0xC000_0081, lstar: UInt32 = 0xC000_0082
        static let cstar: UInt32 = 0xC000_0083, sfmask: UInt32 = 0xC000_0084
        static let fsBase: UInt32 = 0xC000_0100, gsBase: UInt32 = 0xC000_0101, kernelGSBase: UInt32 = 0xC000_0102
        static let hypercallPage: UInt32 = 0x4000_0000
    }

    func readMSR(_ msr: UInt32) throws(CPUFault) -> UInt64 {
        switch msr {
        case MSR.tsc: return tsc
        case MSR.apicBase: return 0xFEE0_0900
        case MSR.miscEnable: return 1
        case MSR.pat: return pat
        case MSR.efer: return efer
        case MSR.star: return star
        case MSR.lstar: return lstar
        case MSR.cstar: return cstar
        case MSR.sfmask: return sfmask
        case MSR.fsBase: return fsBase
        case MSR.gsBase: return gsBase
        case MSR.kernelGSBase: return kernelGSBase
        case MSR.hypercallPage: return 0  // as on the KVM engine: the page is write-only
        default: throw .gp()
        }
    }

    /// Returns false for an MSR the runner owns (the hypercall page).
    func writeMSR(_ msr: UInt32, _ value: UInt64) throws(CPUFault) -> Bool {
        func canonical(_ v: UInt64) -> Bool { let top = v >> 47; return top == 0 || top == 0x1_FFFF }
        switch msr {
        case MSR.tsc: tscOffset = value &- (tsc &- tscOffset)
        case MSR.apicBase, MSR.miscEnable: break
        case MSR.pat: pat = value
        case MSR.efer:
            guard value & ~(EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE) == 0 else { throw .gp() }
            let lme = value & EFER.LME
            if cr0 & CR0.PG != 0 && lme != efer & EFER.LME { throw .gp() }  // LME changes only with paging off
            efer = (value & ~EFER.LMA) | (efer & EFER.LMA)
            flushTLB()
        case MSR.star: star = value
        case MSR.lstar: guard canonical(value) else { throw .gp() }; lstar = value
        case MSR.cstar: guard canonical(value) else { throw .gp() }; cstar = value
        case MSR.sfmask: sfmask = value & 0xFFFF_FFFF
        case MSR.fsBase: guard canonical(value) else { throw .gp() }; fsBase = value
        case MSR.gsBase: guard canonical(value) else { throw .gp() }; gsBase = value
        case MSR.kernelGSBase: guard canonical(value) else { throw .gp() }; kernelGSBase = value
        case MSR.hypercallPage: return false
        default: throw .gp()
        }
        return true
    }

    // MARK: Interrupts and exceptions

    /// Delivers `vector` through the long-mode IDT: a 64-bit interrupt or trap gate, the
    /// frame (SS, RSP, RFLAGS, CS, RIP and the error code) on the current stack or the gate's
    /// IST stack, aligned to 16 bytes; interrupt gates clear IF. RIP is the return address:
    /// the faulting instruction for faults, the next one for INT n and interrupts.
    func deliver(vector: UInt8, errorCode: UInt32?, software: Bool) throws(CPUFault) {
        guard longMode else {
            throw CPUFault(8, 0)
        }
        let v = UInt64(vector)
        let gateCode = UInt32(v * 8 + 2)
        guard v * 16 + 15 <= UInt64(idtLimit) else { throw .gp(gateCode) }
        let low = try read(idtBase &+ v * 16, 8)
        let high = try read(idtBase &+ v * 16 &+ 8, 8)
        let type = (low >> 40) & 0xF
        guard type == 0xE || type == 0xF else { throw .gp(gateCode) }
        if software && (low >> 45) & 3 < UInt64(cpl) { throw .gp(gateCode) }
        guard low & (1 << 47) != 0 else { throw CPUFault(11, gateCode) }
        let target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | (high & 0xFFFF_FFFF) << 32
        let selector = UInt16(truncatingIfNeeded: low >> 16)
        let ist = (low >> 32) & 7
        guard cpl == 0 else { throw .gp(gateCode) }  // user mode is not modelled (see Docs/softcpu.md)
        var sp = regs[4]
        if ist != 0 { sp = try read(trBase &+ 0x24 &+ (ist - 1) * 8, 8) }
        sp &= ~0xF
        let (oldSS, oldSP, oldFlags, oldCS, oldIP) = (UInt64(selectors.2), regs[4], rflags, UInt64(selectors.1), rip)
        let count = errorCode == nil ? 5 : 6
        let newSP = sp &- UInt64(count * 8)
        try probeWrite(newSP, count * 8)
        let savedCS = (selectors.1, csLong, csDefault32)
        try loadCS(selector)
        do {
            try write(sp &- 8, 8, oldSS)
            try write(sp &- 16, 8, oldSP)
            try write(sp &- 24, 8, oldFlags)
            try write(sp &- 32, 8, oldCS)
            try write(sp &- 40, 8, oldIP)
            if let errorCode { try write(newSP, 8, UInt64(errorCode)) }
        } catch {
            (selectors.1, csLong, csDefault32) = savedCS
            throw error
        }
        regs[4] = newSP
        var f = rflags & ~(Flags.TF | Flags.NT | Flags.RF)
        if type == 0xE { f &= ~Flags.IF }
        rflags = f
        rip = target
        interruptShadow = false
    }

    /// IRET: in 64-bit mode pops RIP, CS, RFLAGS, RSP and SS (8 bytes each with REX.W, 4
    /// without); in 32-bit mode RIP, CS and RFLAGS.
    func interruptReturn() throws(CPUFault) {
        let size = rex & 8 != 0 ? 8 : (operandOverride ? 2 : 4)
        let sp = mode64 ? regs[4] : regs[4] & 0xFFFF_FFFF
        let newIP = try read(sp, size)
        let cs = UInt16(truncatingIfNeeded: try read(sp &+ UInt64(size), size))
        let flags = try read(sp &+ UInt64(2 * size), size)
        var newSP = sp &+ UInt64(3 * size)
        var ss = selectors.2
        if mode64 {
            newSP = try read(sp &+ UInt64(3 * size), size)
            ss = UInt16(truncatingIfNeeded: try read(sp &+ UInt64(4 * size), size))
        }
        guard cs & 3 == 0 else { throw .gp(UInt32(cs & ~3)) }  // returning to user mode is not modelled
        try loadCS(cs)
        selectors.2 = ss
        regs[4] = newSP
        rflags = size == 8 ? flags : (rflags & ~0xFFFF_FFFF) | (flags & 0xFFFF_FFFF)
        rip = mode64 ? newIP : newIP & 0xFFFF_FFFF
    }

    // MARK: SSE2 (data movement and integer logic)

    /// The XMM registers, 16 × 16 bytes, kept with the CPU (allocated once).
    var xmm: UnsafeMutableRawPointer { xmmStorage }

    /// MOVUPS/MOVAPS/MOVDQU/MOVDQA loads and stores, MOVD/MOVQ, PXOR/XORPS/PAND/POR/PANDN,
    /// MOVNTDQ/MOVNTPS; false for anything else (#UD through the caller).
    func sse(_ op: UInt8, _ repPrefix: UInt8) throws(CPUFault) -> Bool {
        let prefix66 = operandOverride
        switch (op, prefix66, repPrefix) {
        case (0x10, _, 0), (0x28, _, 0), (0x6F, true, 0), (0x6F, false, 0xF3):  // 128-bit loads
            try decodeModRM()
            try loadXMM(aligned: op == 0x28 || (op == 0x6F && prefix66))
        case (0x11, _, 0), (0x29, _, 0), (0x7F, true, 0), (0x7F, false, 0xF3), (0x2B, _, 0), (0xE7, true, 0):
            try decodeModRM()
            try storeXMM(aligned: op != 0x11 && !(op == 0x7F && !prefix66))
        case (0x57, _, 0), (0xEF, true, 0), (0x54, _, 0), (0xDB, true, 0), (0x56, _, 0), (0xEB, true, 0), (0x55, _, 0), (0xDF, true, 0):
            try decodeModRM()
            let (a0, a1) = xmmValue(modrmReg)
            let (b0, b1) = try xmmOperand(aligned: true)
            let r: (UInt64, UInt64)
            switch op {
            case 0x57, 0xEF: r = (a0 ^ b0, a1 ^ b1)
            case 0x54, 0xDB: r = (a0 & b0, a1 & b1)
            case 0x56, 0xEB: r = (a0 | b0, a1 | b1)
            default: r = (~a0 & b0, ~a1 & b1)
            }
            setXMM(modrmReg, r)
        case (0x6E, true, 0):  // MOVD/MOVQ xmm, r/m
            let size = rex & 8 != 0 ? 8 : 4
            try decodeModRM()
            setXMM(modrmReg, (try readRM(size), 0))
        case (0x7E, true, 0):  // MOVD/MOVQ r/m, xmm
            let size = rex & 8 != 0 ? 8 : 4
            try decodeModRM()
            try writeRM(size, xmmValue(modrmReg).0 & sizeMask(size))
        case (0x7E, false, 0xF3):  // MOVQ xmm, xmm/m64
            try decodeModRM()
            let v = modrmIsRegister ? xmmValue(modrmRM).0 : try read(effectiveAddress, 8)
            setXMM(modrmReg, (v, 0))
        case (0xD6, true, 0):  // MOVQ xmm/m64, xmm
            try decodeModRM()
            if modrmIsRegister { setXMM(modrmRM, (xmmValue(modrmReg).0, 0)) } else { try write(effectiveAddress, 8, xmmValue(modrmReg).0) }
        default:
            return false
        }
        finish()
        return true
    }

    func xmmValue(_ r: Int) -> (UInt64, UInt64) {
        (xmm.load(fromByteOffset: r * 16, as: UInt64.self), xmm.load(fromByteOffset: r * 16 + 8, as: UInt64.self))
    }

    func setXMM(_ r: Int, _ v: (UInt64, UInt64)) {
        xmm.storeBytes(of: v.0, toByteOffset: r * 16, as: UInt64.self)
        xmm.storeBytes(of: v.1, toByteOffset: r * 16 + 8, as: UInt64.self)
    }

    func xmmOperand(aligned: Bool) throws(CPUFault) -> (UInt64, UInt64) {
        if modrmIsRegister { return xmmValue(modrmRM) }
        if aligned && effectiveAddress & 0xF != 0 { throw .gp() }
        return (try read(effectiveAddress, 8), try read(effectiveAddress &+ 8, 8))
    }

    func loadXMM(aligned: Bool) throws(CPUFault) {
        setXMM(modrmReg, try xmmOperand(aligned: aligned))
    }

    func storeXMM(aligned: Bool) throws(CPUFault) {
        let v = xmmValue(modrmReg)
        if modrmIsRegister { setXMM(modrmRM, v); return }
        if aligned && effectiveAddress & 0xF != 0 { throw .gp() }
        try probeWrite(effectiveAddress, 16)
        try write(effectiveAddress, 8, v.0)
        try write(effectiveAddress &+ 8, 8, v.1)
    }
}
