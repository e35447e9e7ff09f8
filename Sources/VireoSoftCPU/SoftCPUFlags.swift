/// Lazy arithmetic flags: an instruction records its operands and result, and CF, PF, AF, ZF,
/// SF and OF are computed only when something reads them (a Jcc, SETcc, PUSHF...). Most
/// flag results are overwritten before anyone looks.
enum LazyOp: UInt8 {
    /// The flags are in `flagsStored`.
    case none
    case add, adc, sub, sbb, logic, inc, dec
    /// Shifts by a non-zero count (`lazySrc`); `lazyDst` is the value shifted.
    case shl, shr, sar
    /// A multiply: `lazyRes` the (truncated) product, `lazyCarry` 1 when it did not fit (CF
    /// and OF); SF, ZF and PF from the product, AF clear.
    case mul
}

@inline(__always) func sizeMask(_ size: Int) -> UInt64 { size == 8 ? ~0 : (1 << UInt64(size &* 8)) &- 1 }
@inline(__always) func signBit(_ size: Int) -> UInt64 { 1 << UInt64(size &* 8 &- 1) }
@inline(__always) func signExtend(_ v: UInt64, _ size: Int) -> UInt64 {
    let shift = UInt64(64 &- size &* 8)
    return UInt64(bitPattern: Int64(bitPattern: v << shift) >> shift)
}
@inline(__always) func parityFlag(_ v: UInt64) -> UInt64 {
    UInt8(truncatingIfNeeded: v).nonzeroBitCount & 1 == 0 ? Flags.PF : 0
}

extension SoftCPU {
    @inline(__always) func setLazy(_ op: LazyOp, _ dst: UInt64, _ src: UInt64, _ res: UInt64, _ size: Int) {
        lazyOp = op; lazyDst = dst; lazySrc = src; lazyRes = res; lazySize = size
    }

    /// Sets the arithmetic flags outright (from a computed value), ending laziness.
    @inline(__always) func setArithmeticFlags(_ bits: UInt64) {
        flagsStored = (flagsStored & ~Flags.arithmetic) | (bits & Flags.arithmetic)
        lazyOp = .none
    }

    /// Carry alone (cheaper than all six: adc, sbb, rcl, rcr and inc/dec need only it).
    @inline(__always) func carryFlag() -> UInt64 {
        let m = sizeMask(lazySize)
        switch lazyOp {
        case .none: return flagsStored & Flags.CF
        case .add: return lazyRes & m < lazyDst & m ? 1 : 0
        case .adc: return (lazyCarry != 0 ? lazyRes & m <= lazyDst & m : lazyRes & m < lazyDst & m) ? 1 : 0
        case .sub: return lazyDst & m < lazySrc & m ? 1 : 0
        case .sbb: return (lazyCarry != 0 ? lazyDst & m <= lazySrc & m : lazyDst & m < lazySrc & m) ? 1 : 0
        case .logic: return 0
        case .inc, .dec, .mul: return lazyCarry
        case .shl:
            let bits = UInt64(lazySize &* 8)
            return lazySrc <= bits ? (lazyDst >> (bits &- lazySrc)) & 1 : 0
        case .shr:
            return lazySrc <= UInt64(lazySize &* 8) ? (lazyDst >> (lazySrc &- 1)) & 1 : 0
        case .sar:
            return UInt64(bitPattern: Int64(bitPattern: signExtend(lazyDst & m, lazySize)) >> Int64(min(lazySrc &- 1, 63))) & 1
        }
    }

    /// CF, PF, AF, ZF, SF and OF now.
    func arithmeticFlags() -> UInt64 {
        if lazyOp == .none { return flagsStored & Flags.arithmetic }
        let m = sizeMask(lazySize), sign = signBit(lazySize)
        let res = lazyRes & m, dst = lazyDst & m, src = lazySrc & m
        var f: UInt64 = carryFlag()
        f |= parityFlag(res)
        if res == 0 { f |= Flags.ZF }
        if res & sign != 0 { f |= Flags.SF }
        switch lazyOp {
        case .add, .adc:
            f |= (dst ^ src ^ res) & 0x10
            if (dst ^ res) & (src ^ res) & sign != 0 { f |= Flags.OF }
        case .sub, .sbb:
            f |= (dst ^ src ^ res) & 0x10
            if (dst ^ src) & (dst ^ res) & sign != 0 { f |= Flags.OF }
        case .inc:
            f |= (dst ^ 1 ^ res) & 0x10
            if res == sign { f |= Flags.OF }
        case .dec:
            f |= (dst ^ 1 ^ res) & 0x10
            if dst == sign { f |= Flags.OF }
        case .shl:
            if (res & sign != 0) != (f & Flags.CF != 0) { f |= Flags.OF }
        case .shr:
            if dst & sign != 0 { f |= Flags.OF }
        case .mul:
            if lazyCarry != 0 { f |= Flags.OF }
        case .logic, .none, .sar:
            break
        }
        return f
    }

    /// Condition `cc` (the low nibble of Jcc/SETcc/CMOVcc): O, NO, B, AE, E, NE, BE, A, S, NS,
    /// P, NP, L, GE, LE, G. Compares evaluate straight from their operands.
    @inline(__always) func condition(_ cc: UInt8) -> Bool {
        let base = cc & 0xE
        var r: Bool
        if lazyOp == .sub {
            let m = sizeMask(lazySize)
            let d = lazyDst & m, s = lazySrc & m
            switch base {
            case 2: r = d < s
            case 4: r = d == s
            case 6: r = d <= s
            case 8: r = lazyRes & signBit(lazySize) != 0
            case 12: r = Int64(bitPattern: signExtend(d, lazySize)) < Int64(bitPattern: signExtend(s, lazySize))
            case 14: r = Int64(bitPattern: signExtend(d, lazySize)) <= Int64(bitPattern: signExtend(s, lazySize))
            default: return slowCondition(cc)
            }
        } else if lazyOp == .logic {
            let res = lazyRes & sizeMask(lazySize)
            let negative = res & signBit(lazySize) != 0
            switch base {
            case 0, 2: r = false
            case 4, 6: r = res == 0
            case 8, 12: r = negative
            case 14: r = res == 0 || negative
            default: return slowCondition(cc)
            }
        } else {
            return slowCondition(cc)
        }
        return cc & 1 != 0 ? !r : r
    }

    func slowCondition(_ cc: UInt8) -> Bool {
        let f = arithmeticFlags()
        let cf = f & Flags.CF != 0, zf = f & Flags.ZF != 0, sf = f & Flags.SF != 0, of = f & Flags.OF != 0
        let r: Bool
        switch cc & 0xE {
        case 0: r = of
        case 2: r = cf
        case 4: r = zf
        case 6: r = cf || zf
        case 8: r = sf
        case 10: r = f & Flags.PF != 0
        case 12: r = sf != of
        default: r = zf || sf != of
        }
        return cc & 1 != 0 ? !r : r
    }
}
