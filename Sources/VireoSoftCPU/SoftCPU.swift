import Glibc
import Synchronization
import VireoABI
import VireoCore

/// Why ``SoftCPU/run(budget:)`` returned: the engine's exits, the same events the KVM engine
/// sees from KVM_RUN. After every exit RIP already points past the instruction.
public enum SoftCPUExit: Equatable, Sendable {
    /// The instruction budget ran out (the runner checks events and timers, then resumes).
    case budget
    /// `out`: `size` bytes of `value` to `port`. `length` is the instruction's length (a
    /// hypercall continuation steps back over it).
    case portOut(port: UInt16, size: Int, value: UInt32, length: Int)
    /// `in`: the runner answers with ``SoftCPU/completePortIn(_:)``.
    case portIn(port: UInt16, size: Int)
    /// `hlt` with interrupts enabled: the vCPU sleeps until an interrupt.
    case halt
    /// `vmcall` or `vmmcall`: a hypercall trap (number in EAX, arguments as for the page).
    case hypercall(length: Int)
    /// `wrmsr` to an MSR the CPU does not own (the hypercall-page MSR); the runner answers
    /// with ``SoftCPU/completeMSRWrite(accepted:)``.
    case writeMSR(msr: UInt32, value: UInt64)
    /// The CPU shut down (a triple fault, `hlt` with interrupts disabled, a mode the engine
    /// does not model): the domain has crashed. The text says why.
    case shutdown(String)
}

/// A fault raised while executing an instruction: delivered through the guest's IDT.
public struct CPUFault: Error, Equatable, Sendable {
    public var vector: UInt8
    public var errorCode: UInt32?
    public init(_ vector: UInt8, _ errorCode: UInt32? = nil) {
        self.vector = vector
        self.errorCode = errorCode
    }
    static let de = CPUFault(0), ud = CPUFault(6), nm = CPUFault(7)
    static func gp(_ code: UInt32 = 0) -> CPUFault { CPUFault(13, code) }
    static func ss(_ code: UInt32 = 0) -> CPUFault { CPUFault(12, code) }
}

/// One CPUID leaf as the guest sees it.
public struct CPUIDLeaf: Equatable, Sendable {
    public var function: UInt32, index: UInt32, significantIndex: Bool
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
    public init(function: UInt32, index: UInt32 = 0, significantIndex: Bool = false,
                eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.significantIndex = significantIndex
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// The general registers by their encoding numbers.
public enum GPR: Int, CaseIterable, Sendable {
    case rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
}

/// Vireo's x86-64 interpreter: one virtual CPU over a domain's guest memory. It starts in the
/// PVH entry state (32-bit protected mode, paging off), follows the guest into long mode with
/// 4-level paging, and delivers exceptions and interrupts through the guest's IDT. Port I/O,
/// HLT, `vmcall` and the hypercall-page MSR come back to the runner as ``SoftCPUExit`` values.
///
/// One thread runs a SoftCPU at a time (the vCPU's own); ``kick()`` may be called from any.
/// The execution loop allocates nothing: registers and the TLB live in memory allocated once.
public final class SoftCPU: @unchecked Sendable {  // owned by its vCPU thread; kick is atomic
    public let memory: GuestMemory
    /// The general registers, indexed by ``GPR``; after them, the words native code
    /// exchanges with the run loop (``NativeSlot``): the pointer native code gets.
    let regs: UnsafeMutablePointer<UInt64>
    public var rip: UInt64 = 0
    /// RFLAGS apart from the arithmetic flags while they are lazy (see ``rflags``).
    var flagsStored: UInt64 = 0x2
    // Lazy arithmetic flags: the last flag-setting operation, evaluated on demand.
    var lazyOp: LazyOp = .none
    var lazyDst: UInt64 = 0, lazySrc: UInt64 = 0, lazyRes: UInt64 = 0
    var lazySize: Int = 4
    /// For adc/sbb the carry in; for inc/dec the carry flag they keep.
    var lazyCarry: UInt64 = 0

    // System state.
    public internal(set) var cr0: UInt64 = 0x11
    public internal(set) var cr2: UInt64 = 0
    public internal(set) var cr3: UInt64 = 0
    public internal(set) var cr4: UInt64 = 0
    var cr8: UInt64 = 0
    public internal(set) var efer: UInt64 = 0
    var fsBase: UInt64 = 0, gsBase: UInt64 = 0, kernelGSBase: UInt64 = 0
    var star: UInt64 = 0, lstar: UInt64 = 0, cstar: UInt64 = 0, sfmask: UInt64 = 0, pat: UInt64 = 0x0007_0406_0007_0406
    public internal(set) var gdtBase: UInt64 = 0, gdtLimit: UInt16 = 0
    public internal(set) var idtBase: UInt64 = 0, idtLimit: UInt16 = 0
    var trSelector: UInt16 = 0, trBase: UInt64 = 0, trLimit: UInt32 = 0x67
    /// Segment selectors: ES, CS, SS, DS, FS, GS (the encoding order).
    var selectors: (UInt16, UInt16, UInt16, UInt16, UInt16, UInt16) = (0x10, 0x08, 0x10, 0x10, 0x10, 0x10)
    /// CS.L and CS.D of the code segment in use.
    var csLong = false, csDefault32 = true
    /// TSC = host nanoseconds since `tscEpoch` plus `tscOffset` (1 GHz, see ``tscHz``).
    let tscEpoch: UInt64
    var tscOffset: UInt64 = 0
    /// The virtual TSC's rate: one tick per nanosecond, which pvclock records describe.
    public static let tscHz: UInt64 = 1_000_000_000

    /// One instruction's grace after STI or a move to SS: no interrupt is taken before it.
    var interruptShadow = false
    /// Set while delivering an exception (a second fault becomes #DF, a third shuts down).
    var delivering = 0

    /// The CPUID leaves the guest sees (base leaves plus the hypervisor's, see ``init``).
    public var cpuidLeaves: [CPUIDLeaf]

    /// Instructions retired (a REP string instruction counts once per iteration).
    public internal(set) var instructions: UInt64 = 0
    /// Instructions the run loop handed to the full decoder (not run from the decode cache).
    var fullDecodes: UInt64 = 0
    /// Whether hot blocks run as native host code (SoftCPUNative.swift): on by default where
    /// the host can (x86-64 with BMI2), off with `VIREO_SOFTCPU_NATIVE=0`.
    public var nativeTier = SoftCPU.nativeTierDefault()
    /// Runs of a block from the cache before it is translated, and the fewest native entries
    /// worth a call for a block that does not loop (tests use 1 and 1: everything translated).
    var nativeThreshold: UInt8 = 64, nativeMinimumEntries = 3
    /// Blocks translated, passes of native code run and the instructions they retired (for
    /// tests and diagnostics).
    var nativeTranslations: UInt64 = 0, nativeRuns: UInt64 = 0, nativeRetired: UInt64 = 0

    /// Instructions the engine does not implement: bytes and address, each logged once by
    /// the runner through this hook (cold path).
    public var unimplemented: (@Sendable (_ rip: UInt64, _ bytes: [UInt8]) -> Void)?
    var loggedUnimplemented: Set<UInt64> = []

    // Exit plumbing: an instruction that leaves the loop sets these.
    var exitPending = false
    var pendingExit: SoftCPUExit = .budget
    var pendingPortIn: (size: Int, valid: Bool) = (0, false)
    var pendingMSRWrite: (msr: UInt32, valid: Bool) = (0, false)

    /// Set by another thread to end ``run(budget:)`` early.
    private let kicked = Atomic<Bool>(false)

    // The instruction being decoded (see SoftCPUExecute.swift).
    var fetchPointer: UnsafeMutableRawPointer
    var fetchAvailable = 0
    var fetchPosition = 0
    var fetchFault = CPUFault(14, 0)
    let fetchScratch: UnsafeMutableRawPointer
    let xmmStorage: UnsafeMutableRawPointer
    var rex: UInt8 = 0
    var rexPresent = false
    var operandOverride = false
    var lockPrefix = false
    var addressSize = 4
    var segmentBase: UInt64 = 0
    var modrmReg = 0
    var modrmRM = 0
    var modrmIsRegister = true
    var effectiveAddress: UInt64 = 0
    /// The page the last instruction was fetched from and its host address (TLB.invalid when
    /// none): most instructions follow one on the same page, and skip the TLB.
    var codePage: UInt64 = TLB.invalid
    var codeHost: UnsafeMutableRawPointer
    /// The guest-physical address of `codePage` when it is RAM (the decode cache's key),
    /// else ``DecodeCache/invalid``: code elsewhere is decoded each time.
    var codeFrameAddress: UInt64 = DecodeCache.invalid

    /// Instructions decoded once per guest-physical address (see SoftCPUDecodeCache.swift).
    let decodeCache: DecodeCache

    // The TLB (see SoftCPUMemory.swift).
    let tlb: TLB
    /// Bumped (by any thread) when guest-physical pages move: the TLB is flushed before the
    /// next instruction.
    private let physmapGeneration = Atomic<UInt64>(0)
    private var seenGeneration: UInt64 = 0
    /// Pages for guest-physical addresses that are not memory: reads float high, writes go
    /// nowhere, as on the KVM engine (no devices).
    let floatingPage: UnsafeMutableRawPointer
    let sinkPage: UnsafeMutableRawPointer

    /// A CPU in Xen's PVH entry state: EIP = `entry`, EBX = `startInfo`, 32-bit protected mode
    /// with flat segments, paging off. `vcpu` appears in CPUID.1:EBX (the initial APIC id).
    public init(memory: GuestMemory, vcpu: UInt32 = 0, hypervisorLeaves: [CPUIDLeaf] = []) {
        self.memory = memory
        // The 16 registers, then the native tier's context words (``NativeSlot``).
        regs = .allocate(capacity: NativeSlot.words)
        regs.initialize(repeating: 0, count: NativeSlot.words)
        tlb = TLB()
        regs[NativeSlot.tlbBase] = UInt64(UInt(bitPattern: tlb.base))
        decodeCache = DecodeCache(ramFrames: Int(memory.ramFrames))
        fetchScratch = .allocate(byteCount: 32, alignment: 16)
        fetchScratch.initializeMemory(as: UInt8.self, repeating: 0, count: 32)
        fetchPointer = fetchScratch
        codeHost = fetchScratch
        xmmStorage = .allocate(byteCount: 256, alignment: 16)
        xmmStorage.initializeMemory(as: UInt8.self, repeating: 0, count: 256)
        floatingPage = .allocate(byteCount: 4096, alignment: 4096)
        floatingPage.initializeMemory(as: UInt8.self, repeating: 0xFF, count: 4096)
        sinkPage = .allocate(byteCount: 4096, alignment: 4096)
        sinkPage.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        tscEpoch = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        cpuidLeaves = Self.baseLeaves(vcpu: vcpu) + hypervisorLeaves
    }

    deinit {
        regs.deallocate()
        fetchScratch.deallocate()
        xmmStorage.deallocate()
        floatingPage.deallocate()
        sinkPage.deallocate()
    }

    // MARK: Register access for runners and tests

    public subscript(_ r: GPR) -> UInt64 {
        get { regs[r.rawValue] }
        set { regs[r.rawValue] = newValue }
    }

    /// RFLAGS with the lazy arithmetic flags evaluated.
    public var rflags: UInt64 {
        get { (flagsStored & ~Flags.arithmetic) | arithmeticFlags() | 0x2 }
        set {
            flagsStored = (newValue & Flags.writable) | 0x2
            lazyOp = .none
        }
    }

    public var interruptFlag: Bool { flagsStored & Flags.IF != 0 }
    /// Whether an external interrupt can be taken now (IF set, no STI/MOV SS shadow).
    public var readyForInterrupt: Bool { interruptFlag && !interruptShadow }
    public var longMode: Bool { efer & EFER.LMA != 0 }
    /// The current privilege level (CS.RPL).
    public var cpl: Int { Int(selectors.1 & 3) }
    public var csSelector: UInt16 { selectors.1 }

    /// The guest TSC now.
    public var tsc: UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return (UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)) &- tscEpoch &+ tscOffset
    }

    /// The state Xen's PVH entry promises (Hypercalls/include/vireo/hvm/start_info.h).
    public func setPVHEntryState(entry: UInt32, startInfo: UInt32) {
        for i in 0..<16 { regs[i] = 0 }
        regs[GPR.rbx.rawValue] = UInt64(startInfo)
        rip = UInt64(entry)
        rflags = 0x2
        cr0 = CR0.PE | CR0.ET; cr2 = 0; cr3 = 0; cr4 = 0; efer = 0
        selectors = (0x10, 0x08, 0x10, 0x10, 0x10, 0x10)
        csLong = false; csDefault32 = true
        gdtBase = 0; gdtLimit = 0; idtBase = 0; idtLimit = 0
        trSelector = 0x18; trBase = 0; trLimit = 0x67
        fsBase = 0; gsBase = 0
        flushTLB()
    }

    /// A secondary vCPU's start (VCPUOP_initialise): flat segments, straight into long mode
    /// (`long`) or 32-bit protected mode, with the given control registers.
    public func setStartState(long: Bool, cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) {
        self.cr0 = cr0; self.cr3 = cr3; self.cr4 = cr4
        self.efer = long ? efer | EFER.LMA | EFER.LME : efer
        selectors = (0x10, 0x08, 0x10, 0x10, 0x10, 0x10)
        csLong = long; csDefault32 = !long
        flushTLB()
    }

    /// Long mode with flat segments, as ``setStartState`` but keeping the descriptor tables:
    /// for code the host places itself (tests, benchmarks).
    public func setDescriptorTables(gdt: (base: UInt64, limit: UInt16), idt: (base: UInt64, limit: UInt16)) {
        (gdtBase, gdtLimit) = gdt
        (idtBase, idtLimit) = idt
    }

    // MARK: Running

    /// Runs up to `budget` instructions, or until an exit. Faults go to the guest's IDT.
    public func run(budget: Int) -> SoftCPUExit {
        let generation = physmapGeneration.load(ordering: .acquiring)
        if generation != seenGeneration {
            seenGeneration = generation
            flushTLB()
        }
        // Whatever the host or another vCPU wrote since the last slice is seen: cached
        // decodes from before are dropped (O(1)).
        decodeCache.flush()
        var left = budget
        // Set when the budget ends inside a block: the rest of the slice (fewer instructions
        // than that block) goes through the full decoder, whose flags are exact after every
        // instruction (a block's entries skip flags that a later entry overwrites).
        var stepsOnly = false
        running: while left > 0 {
            // Blocks of decoded instructions, each run straight through with no lookup between
            // its instructions. None of them exits, opens an interrupt shadow or changes RIP
            // before its last access that can fault, so a fault needs no restart bookkeeping.
            // RIP stays in a register (`pc`) meanwhile.
            if !interruptShadow, !stepsOnly {
                var pc = rip
                var view = cacheView()
                blocks: while left > 0 {
                    var found = blockHead(at: pc, view)
                    if found == nil, pc & ~0xFFF != view.page, enterCodePage(pc) {
                        // A branch to another page: its blocks, without the full decoder.
                        view = cacheView()
                        found = blockHead(at: pc, view)
                    }
                    guard let (head, gpa) = found else { break }
                    if head.pointee.tag != gpa | view.generation {
                        buildBlock(head, gpa: gpa)
                        view = cacheView()
                    }
                    let block = head.pointee
                    if block.count == 0 { break }
                    if Int(block.retired) > left {
                        stepsOnly = true
                        break
                    }
                    if nativeTier {
                        if block.native == NativeCode.none, countHit(head) {
                            head.pointee.native = translateNative(head, linear: pc)
                            if decodeCache.generation != view.generation {
                                // The code buffer was full: it and the cache were emptied.
                                view = cacheView()
                                continue
                            }
                        }
                        let native = head.pointee.native
                        if native > NativeCode.never, nativeLinear(native) == pc {
                            // Native code: it never faults or writes cached code (both exit
                            // to the entries at that instruction), so the view stays valid.
                            let (next, retired) = runNative(head, left: left)
                            if retired > 0 || next != pc {
                                left -= retired
                                pc = next
                                if kicked.load(ordering: .relaxed) {
                                    rip = pc
                                    break running
                                }
                                continue
                            }
                            // It left at its first instruction (a TLB miss there): the
                            // entries run it, filling the TLB or faulting.
                        }
                    }
                    let first = view.entries + Int(block.start)
                    let end = first + Int(block.count)
                    let start = pc
                    var outcome = runEntries(first, end, from: pc, generation: view.generation)
                    // A loop whose back edge returns to the block's start runs it again
                    // without a lookup while the budget covers it whole.
                    // (A loop is hot: once it has run often enough, or when it has native code
                    // (its first access missed the TLB), its next pass goes through the lookup,
                    // which translates it or runs its code.)
                    while outcome.fault == nil, outcome.pc == start, outcome.entry == end,
                          Int(block.retired) * 2 <= left, decodeCache.generation == view.generation,
                          !(nativeTier && head.pointee.native != NativeCode.never
                            && (head.pointee.native != NativeCode.none || countHit(head))) {
                        left -= Int(block.retired)
                        outcome = runEntries(first, end, from: start, generation: view.generation)
                    }
                    pc = outcome.pc
                    if let fault = outcome.fault {
                        rip = pc
                        left -= Int(outcome.entry.pointee.through)
                        if let stop = raise(fault) {
                            instructions &+= UInt64(budget - left)
                            return stop
                        }
                        pc = rip
                        view = cacheView()
                    } else {
                        left -= Int((outcome.entry - 1).pointee.through)
                        if decodeCache.generation != view.generation {
                            // A write flushed the cache (this block's page, perhaps): what
                            // follows is looked up, and decoded, anew.
                            view = cacheView()
                        }
                    }
                    if kicked.load(ordering: .relaxed) {
                        rip = pc
                        break running
                    }
                }
                rip = pc
                if left <= 0 { break }
            }
            let start = rip
            let shadow = interruptShadow
            fullDecodes &+= 1
            do {
                try step()
            } catch {
                rip = start
                if let stop = raise(error) { return stop }
            }
            if shadow { interruptShadow = false }
            left -= 1
            if exitPending {
                exitPending = false
                instructions &+= UInt64(budget - left)
                return pendingExit
            }
            if left & 0x3FF == 0, kicked.load(ordering: .relaxed) { break }
        }
        kicked.store(false, ordering: .relaxed)
        instructions &+= UInt64(budget - left)
        return .budget
    }

    /// Runs block entries from `first` up to `end` straight through from RIP `start`,
    /// stopping early after a taken Jcc or a write that flushed the cache. Returns the next
    /// RIP and the entry after the last one run; on a fault, the faulting instruction's RIP,
    /// its entry and the fault. (Values, not `inout`: RIP and the entry stay in registers.)
    @inline(never)
    func runEntries(_ first: UnsafeMutablePointer<DecodedInstruction>, _ end: UnsafeMutablePointer<DecodedInstruction>,
                    from start: UInt64, generation: UInt64)
        -> (pc: UInt64, entry: UnsafeMutablePointer<DecodedInstruction>, fault: CPUFault?) {
        var e = first, pc = start
        var stop = false
        do {
            repeat {
                pc = try executeDecoded(e, at: pc, generation, &stop)
                e += 1
            } while e < end && !stop
        } catch {
            return (pc, e, error)
        }
        return (pc, e, nil)
    }

    /// Makes ``run(budget:)`` return soon (from any thread).
    public func kick() { kicked.store(true, ordering: .relaxed) }

    /// The guest-physical map changed (a special frame placed): translations are dropped
    /// before any vCPU's next instruction (from any thread).
    public func physmapChanged() { physmapGeneration.add(1, ordering: .releasing) }

    /// Completes an `in` with `value` (the low bytes of its size go to AL/AX/EAX).
    public func completePortIn(_ value: UInt32) {
        guard pendingPortIn.valid else { return }
        pendingPortIn.valid = false
        switch pendingPortIn.size {
        case 1: setReg8Low(0, UInt64(value))
        case 2: regs[0] = (regs[0] & ~0xFFFF) | UInt64(value & 0xFFFF)
        default: regs[0] = UInt64(value)
        }
    }

    /// Completes a `wrmsr` that exited: a refused write raises #GP at the instruction.
    public func completeMSRWrite(accepted: Bool, instructionLength: Int = 2) {
        guard pendingMSRWrite.valid else { return }
        pendingMSRWrite.valid = false
        if !accepted {
            rip &-= UInt64(instructionLength)
            _ = raise(.gp())
        }
    }

    /// Delivers external interrupt `vector` (the event-channel callback vector) if the CPU
    /// can take it now; false when IF is clear or an STI shadow is in force.
    @discardableResult
    public func injectInterrupt(vector: UInt8) -> Bool {
        guard readyForInterrupt else { return false }
        do {
            try deliver(vector: vector, errorCode: nil, software: false)
            return true
        } catch {
            _ = raise(error)
            return true
        }
    }

    /// Delivers an exception; a fault while delivering becomes #DF, one more shuts down.
    /// Returns the shutdown exit when the CPU cannot go on.
    func raise(_ fault: CPUFault) -> SoftCPUExit? {
        guard longMode else {
            return shutdown("exception \(fault.vector) outside long mode at RIP 0x\(String(rip, radix: 16)) (no IDT is modelled there)")
        }
        if fault.vector == 14 { /* cr2 was set by the walker */ }
        var current = fault
        var depth = 0
        while true {
            do {
                try deliver(vector: current.vector, errorCode: current.errorCode, software: false)
                return nil
            } catch {
                depth += 1
                if depth >= 2 || current.vector == 8 {
                    return shutdown("triple fault (vector \(fault.vector), then \(error.vector)) at RIP 0x\(String(rip, radix: 16))")
                }
                current = CPUFault(8, 0)
            }
        }
    }

    func shutdown(_ why: String) -> SoftCPUExit {
        exitPending = false
        return .shutdown(why)
    }

    // MARK: CPUID

    /// The base leaves: an x86-64 CPU with long mode, NX, CMOV, CX8, TSC, MSR, PAE, PGE, PAT,
    /// SSE and SSE2 (data movement and integer logic only), and the hypervisor bit.
    static func baseLeaves(vcpu: UInt32) -> [CPUIDLeaf] {
        func word(_ s: String) -> UInt32 { Array(s.utf8).enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) } }
        let edx1: UInt32 = 1 << 4 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 13 | 1 << 15 | 1 << 16 | 1 << 19 | 1 << 25 | 1 << 26
        return [
            CPUIDLeaf(function: 0, eax: 7, ebx: word("Vire"), ecx: word("oCPU"), edx: word("Soft")),
            CPUIDLeaf(function: 1, eax: 0x0006_0F00, ebx: (vcpu & 0xFF) << 24 | 1 << 16 | 8 << 8, ecx: 1 << 31, edx: edx1),
            CPUIDLeaf(function: 7, significantIndex: true),
            CPUIDLeaf(function: 0x8000_0000, eax: 0x8000_0008),
            CPUIDLeaf(function: 0x8000_0001, ecx: 1, edx: 1 << 11 | 1 << 20 | 1 << 29),
            CPUIDLeaf(function: 0x8000_0008, eax: 0x3028),
        ]
    }

    func cpuid(_ function: UInt32, _ index: UInt32) -> (UInt32, UInt32, UInt32, UInt32) {
        for leaf in cpuidLeaves where leaf.function == function && (!leaf.significantIndex || leaf.index == index) {
            return (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)
        }
        return (0, 0, 0, 0)
    }

    // MARK: Unimplemented instructions

    /// #UD for an instruction the engine lacks; its bytes are reported once per address.
    func unimplementedInstruction() -> CPUFault {
        if loggedUnimplemented.count < 64, !loggedUnimplemented.contains(rip) {
            loggedUnimplemented.insert(rip)
            var bytes: [UInt8] = []
            for i in 0..<15 {
                guard let b = try? peekCode(rip &+ UInt64(i)) else { break }
                bytes.append(b)
            }
            unimplemented?(rip, bytes)
        }
        return .ud
    }
}

enum CR0 {
    static let PE: UInt64 = 1, MP: UInt64 = 2, EM: UInt64 = 4, TS: UInt64 = 8, ET: UInt64 = 0x10
    static let WP: UInt64 = 1 << 16, PG: UInt64 = 1 << 31
}

enum CR4 {
    static let PAE: UInt64 = 1 << 5, PGE: UInt64 = 1 << 7
}

enum EFER {
    static let SCE: UInt64 = 1, LME: UInt64 = 1 << 8, LMA: UInt64 = 1 << 10, NXE: UInt64 = 1 << 11
}

enum Flags {
    static let CF: UInt64 = 1, PF: UInt64 = 4, AF: UInt64 = 0x10, ZF: UInt64 = 0x40, SF: UInt64 = 0x80
    static let TF: UInt64 = 0x100, IF: UInt64 = 0x200, DF: UInt64 = 0x400, OF: UInt64 = 0x800
    static let NT: UInt64 = 0x4000, RF: UInt64 = 0x1_0000, AC: UInt64 = 0x4_0000, ID: UInt64 = 0x20_0000
    static let arithmetic: UInt64 = CF | PF | AF | ZF | SF | OF
    /// Bits software may change (IOPL kept at 0, VM/VIF/VIP clear).
    static let writable: UInt64 = arithmetic | TF | IF | DF | NT | RF | AC | ID
}
