import Synchronization
import VireoABI
import VireoCore
import VireoKVM

/// The guest-physical map as KVM sees it: RAM in as many slots as it takes to leave holes where
/// special frames (shared_info, grant frames) sit, and one slot per placed special frame.
/// Guests place these frames where they like, often on a RAM page of their own (Linux puts
/// shared_info in a page of its kernel image), so a placement inside RAM splits the RAM slots
/// and a frame moving away joins them again.
final class KVMPhysmap: @unchecked Sendable {  // all state sits behind `state`
    private let vm: KVMDomainRunner.VMBox
    private let memory: GuestMemory

    private struct State {
        var holes: Set<UInt64> = []
        var placed: [Int: UInt64] = [:]
        var ramSlots: [UInt32] = [KVMVirtualMachine.ramSlot]
        var freeSlots: [UInt32] = Array((firstRAMSlot..<firstRAMSlot + 4096).reversed())
    }
    private let state = Mutex(State())

    /// Special frame `i` uses slot 1 + i; RAM pieces use slots from here up.
    static let firstRAMSlot: UInt32 = 1024

    init(vm: KVMDomainRunner.VMBox, memory: GuestMemory) {
        self.vm = vm
        self.memory = memory
    }

    /// Maps special frame `index` at guest frame `frame` (moving it if it was placed before).
    func place(_ index: Int, at frame: GuestFrame) throws {
        guard index >= 0, index < memory.specialFrameCount else {
            throw KVMError.invalidArgument("special frame \(index) of \(memory.specialFrameCount)")
        }
        guard frame.rawValue < 1 << 40 else { throw KVMError.invalidArgument("guest frame \(frame) out of range") }
        let page = UInt64(GuestMemory.pageSize)
        let specialSlot = UInt32(1 + index)
        try state.withLock { (s: inout State) throws in
            var holesChanged = false
            if let old = s.placed.removeValue(forKey: index) {
                try vm.vm.removeMemoryRegion(slot: specialSlot)
                if old < memory.ramFrames { s.holes.remove(old); holesChanged = true }
            }
            if frame.rawValue < memory.ramFrames && !s.holes.contains(frame.rawValue) {
                s.holes.insert(frame.rawValue)
                holesChanged = true
            }
            if holesChanged { try rebuildRAM(&s) }
            try vm.vm.setMemoryRegion(slot: specialSlot, guestPhysical: GuestPhysicalAddress(frame.rawValue * page), size: page,
                                      host: memory.hostBase + Int(memory.ramSize) + index * GuestMemory.pageSize)
            s.placed[index] = frame.rawValue
        }
    }

    /// RAM as slots around the holes. Removing first keeps slots from overlapping; a vCPU
    /// touching RAM in between would fault, so this runs from the vCPU making the hypercall.
    private func rebuildRAM(_ s: inout State) throws {
        for slot in s.ramSlots {
            try vm.vm.removeMemoryRegion(slot: slot)
            if slot != KVMVirtualMachine.ramSlot { s.freeSlots.append(slot) }
        }
        s.ramSlots = []
        let page = UInt64(GuestMemory.pageSize)
        var start: UInt64 = 0
        for hole in s.holes.sorted() + [memory.ramFrames] {
            if hole > start {
                guard let slot = s.freeSlots.popLast() else { throw KVMError.invalidArgument("out of KVM memory slots") }
                try vm.vm.setMemoryRegion(slot: slot, guestPhysical: GuestPhysicalAddress(start * page), size: (hole - start) * page,
                                          host: memory.hostBase + Int(start * page))
                s.ramSlots.append(slot)
            }
            start = hole + 1
        }
    }

    /// RAM slots in use (for tests and diagnostics).
    var ramSlotCount: Int { state.withLock { $0.ramSlots.count } }
}
