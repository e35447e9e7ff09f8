// The guest's half of the 2-level event channel ABI. This file stays free of Foundation and
// Glibc (it needs only SharedRegion, VireoABI and the C headers), so a bare-metal guest can
// compile it unchanged; the host uses it too, for its own domain and for simulated guests.
import VireoABI
import VireoHypercalls

/// Byte offsets of the 2-level event channel fields in shared_info and vcpu_info
/// (`vireo/xen.h`, `vireo/event_channel.h`). `EventChannelLayoutTests` checks each against the
/// C layout, so they cannot drift from the header.
public enum TwoLevelLayout {
    /// Ports in the 2-level ABI: 64 words of 64 bits (`VIREO_EVTCHN_2L_NR_CHANNELS`).
    public static let portCount = Int(VIREO_EVTCHN_2L_NR_CHANNELS)
    /// Bits in one pending/mask word, and words in each bitmap.
    public static let bitsPerWord = 64
    /// Bytes of shared_info the event code touches (the whole structure).
    public static let sharedInfoSize = 3136
    /// `shared_info.evtchn_pending[0]`.
    public static let pendingOffset = 2048
    /// `shared_info.evtchn_mask[0]`.
    public static let maskOffset = 2560
    /// Bytes in each of the two bitmaps (64 words of 8 bytes).
    public static let bitmapBytes = 512
    /// Bytes of one vcpu_info record.
    public static let vcpuInfoSize = 64
    /// vCPUs whose vcpu_info has a slot in shared_info (`VIREO_XEN_LEGACY_MAX_VCPUS`).
    public static let legacyVcpuSlots = Int(VIREO_XEN_LEGACY_MAX_VCPUS)
    /// `vcpu_info.evtchn_upcall_pending` (one byte).
    public static let upcallPendingOffset = 0
    /// `vcpu_info.evtchn_upcall_mask` (one byte).
    public static let upcallMaskOffset = 1
    /// `vcpu_info.evtchn_pending_sel` (one 64-bit word).
    public static let pendingSelOffset = 8

    /// The word of the pending/mask bitmaps holding `port`, and the port's bit in it.
    @inlinable @inline(__always)
    public static func position(of port: UInt32) -> (word: Int, bit: Int) {
        (Int(port / 64), Int(port % 64))
    }
}

/// What a guest does with its event channel bits: masking, unmasking, and the receive loop of
/// an upcall handler (`vireo/event_channel.h`, "Receive" and "Masking and unmasking").
///
/// The state lives in shared memory the host writes concurrently; every access here is an
/// atomic operation in the order the protocol requires. Ports are the guest's own, so an
/// out-of-range port is a programming error and traps.
public struct GuestEventState: Sendable {
    /// The domain's shared_info page.
    public let sharedInfo: SharedRegion
    /// vcpu_info records moved out of shared_info (`VCPUOP_register_vcpu_info`), by vCPU.
    private var movedVcpuInfo: [SharedRegion?] = []

    public init(sharedInfo: SharedRegion) {
        precondition(sharedInfo.count >= TwoLevelLayout.sharedInfoSize, "shared_info region too small")
        self.sharedInfo = sharedInfo
    }

    /// Uses `region` as `vcpu`'s vcpu_info from now on, after the guest has moved it there
    /// with `VCPUOP_register_vcpu_info`.
    public mutating func useVcpuInfo(_ region: SharedRegion, forVcpu vcpu: Int) {
        precondition(vcpu >= 0 && region.count >= TwoLevelLayout.vcpuInfoSize, "bad vcpu_info placement")
        if movedVcpuInfo.count <= vcpu { movedVcpuInfo.append(contentsOf: repeatElement(nil, count: vcpu + 1 - movedVcpuInfo.count)) }
        movedVcpuInfo[vcpu] = region.slice(offset: 0, count: TwoLevelLayout.vcpuInfoSize)
    }

    /// `vcpu`'s vcpu_info: where it was moved, else its slot in shared_info, else nil (a vCPU
    /// from 32 up that has not registered one receives no upcalls).
    public func vcpuInfo(_ vcpu: Int) -> SharedRegion? {
        precondition(vcpu >= 0, "negative vCPU")
        if vcpu < movedVcpuInfo.count, let moved = movedVcpuInfo[vcpu] { return moved }
        guard vcpu < TwoLevelLayout.legacyVcpuSlots else { return nil }
        return sharedInfo.slice(offset: vcpu * TwoLevelLayout.vcpuInfoSize, count: TwoLevelLayout.vcpuInfoSize)
    }

    @inline(__always)
    private func position(_ port: EventPort) -> (word: Int, bit: Int) {
        precondition(port.rawValue < UInt32(TwoLevelLayout.portCount), "port beyond the 2-level ABI")
        return TwoLevelLayout.position(of: port.rawValue)
    }

    // MARK: Per-port bits

    public func isPending(_ port: EventPort) -> Bool {
        let (word, bit) = position(port)
        return sharedInfo.testBit(bit, inWordAt: TwoLevelLayout.pendingOffset + word * 8)
    }

    public func isMasked(_ port: EventPort) -> Bool {
        let (word, bit) = position(port)
        return sharedInfo.testBit(bit, inWordAt: TwoLevelLayout.maskOffset + word * 8)
    }

    /// Clears the port's pending bit; returns whether it was set.
    @discardableResult
    public func clearPending(_ port: EventPort) -> Bool {
        let (word, bit) = position(port)
        return sharedInfo.testAndClearBit(bit, inWordAt: TwoLevelLayout.pendingOffset + word * 8)
    }

    /// Masks the port: the host keeps setting its pending bit but makes no upcall for it.
    public func mask(_ port: EventPort) {
        let (word, bit) = position(port)
        _ = sharedInfo.testAndSetBit(bit, inWordAt: TwoLevelLayout.maskOffset + word * 8)
    }

    /// Unmasks the port. Returns true when the port turned out to be pending: an event
    /// arrived while it was masked and no upcall was made for it, so the guest must ask the
    /// host to make one with `EVTCHNOP_unmask`. In that case the mask bit is set again first,
    /// because the host's unmask re-raises the event only when it is the one to clear the
    /// mask bit (Xen's 2-level rule).
    public func unmask(_ port: EventPort) -> Bool {
        let (word, bit) = position(port)
        let maskWord = TwoLevelLayout.maskOffset + word * 8
        // Clear before testing pending: a send that lands after the clear sees the port
        // unmasked and raises the upcall itself; one that landed before is caught below.
        _ = sharedInfo.testAndClearBit(bit, inWordAt: maskWord)
        guard sharedInfo.testBit(bit, inWordAt: TwoLevelLayout.pendingOffset + word * 8) else { return false }
        _ = sharedInfo.testAndSetBit(bit, inWordAt: maskWord)
        return true
    }

    /// Unmasks the port and, when it was pending, calls `askHost` (which issues
    /// `EVTCHNOP_unmask` for the port).
    public func unmask(_ port: EventPort, askHost: (EventPort) -> Void) {
        if unmask(port) { askHost(port) }
    }

    // MARK: The receive loop

    /// Whether the host has flagged an upcall for `vcpu` that the guest has not yet taken.
    public func upcallPending(vcpu: Int) -> Bool {
        guard let info = vcpuInfo(vcpu) else { return false }
        return info.loadAcquire8(at: TwoLevelLayout.upcallPendingOffset) != 0
    }

    /// One pass of an upcall handler on `vcpu`: acknowledges the upcall, takes the selector,
    /// and for each selected word clears and reports every pending, unmasked port, in
    /// ascending order. Returns how many ports were reported. A port that becomes pending
    /// during the pass raises the upcall flag again (the next pass finds it).
    @discardableResult
    public func scanPending(vcpu: Int, _ handle: (EventPort) -> Void) -> Int {
        scanPending(vcpu: vcpu, within: { _ in ~0 }, handle)
    }

    /// ``scanPending(vcpu:_:)`` taking only the ports whose bits `within(word)` has set: the
    /// others stay pending, for a scan by the vCPU they notify (the host domain's immediate
    /// pass takes only its immediate ports this way).
    @discardableResult
    public func scanPending(vcpu: Int, within: (_ word: Int) -> UInt64, _ handle: (EventPort) -> Void) -> Int {
        guard let info = vcpuInfo(vcpu) else { return 0 }
        // 1. Acknowledge first, so an event arriving during the scan raises the flag again.
        info.storeRelease8(0, at: TwoLevelLayout.upcallPendingOffset)
        // 2. Take the selector; the exchange is a full barrier, ordering step 1 before it.
        var selector = info.exchange64(0, at: TwoLevelLayout.pendingSelOffset)
        var reported = 0
        while selector != 0 {
            let word = selector.trailingZeroBitCount
            selector &= selector - 1
            let pendingWord = TwoLevelLayout.pendingOffset + word * 8
            var bits = sharedInfo.loadAcquire64(at: pendingWord)
                & ~sharedInfo.loadAcquire64(at: TwoLevelLayout.maskOffset + word * 8) & within(word)
            while bits != 0 {
                let bit = bits.trailingZeroBitCount
                bits &= bits - 1
                // 3. Clear before handling, so a send during the handler sets it again.
                if sharedInfo.testAndClearBit(bit, inWordAt: pendingWord) {
                    handle(EventPort(UInt32(word * TwoLevelLayout.bitsPerWord + bit)))
                    reported += 1
                }
            }
        }
        return reported
    }

    /// ``scanPending(vcpu:_:)`` collecting the ports.
    public func scanPending(vcpu: Int) -> [EventPort] {
        var ports: [EventPort] = []
        scanPending(vcpu: vcpu) { ports.append($0) }
        return ports
    }
}
