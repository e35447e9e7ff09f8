import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoKVM
import VireoLinux

/// Where a domain's upcall hook leads: created before the domain (the hook is given at
/// creation) and pointed at the runner once it exists.
public final class UpcallRouter: Sendable {
    private let target = Mutex<(@Sendable (Int) -> Void)?>(nil)
    public init() {}
    public func connect(_ hook: @escaping @Sendable (Int) -> Void) { target.withLock { $0 = hook } }
    public func upcall(_ vcpu: Int) { target.withLock { $0 }?(vcpu) }
}

/// A sleeping vCPU's wake-up word (a futex): events, timers and kicks set it.
final class VCPUWaker: @unchecked Sendable {  // the word is only touched atomically
    private let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    private let region: SharedRegion
    /// Whether the owner is inside a ``VCPUServices`` sleep (it looks at events and timers
    /// again before it next runs guest code, so waking it needs no engine kick).
    let inSleep = Atomic<Bool>(false)

    init() {
        word.initialize(to: 0)
        region = .unsafe(UnsafeMutableRawPointer(word), count: 4)
    }

    deinit { word.deallocate() }

    func wake() {
        region.storeRelease32(1, at: 0)
        _ = vireo_futex_wake(word, Int32.max)
    }

    /// Clears the word; then `ready()` is checked; then sleeps while the word stays 0 (a wake
    /// between the check and the sleep sets it, and the sleep returns at once).
    func wait(until ready: () -> Bool, timeoutNanoseconds: Int64) {
        region.storeRelease32(0, at: 0)
        Barrier.full()
        if ready() { return }
        _ = vireo_futex_wait(word, 0, timeoutNanoseconds)
    }
}

/// Runs one domain's vCPUs on KVM, one host thread each: the engine half of Vireo for a
/// domain. Exits are handled as DESIGN.md describes: the hypercall page's I/O exits go to the
/// dispatcher, the hypercall-page MSR installs the page, HLT and SCHEDOP_block sleep until an
/// event or a timer, event upcalls are injected as the guest's callback vector (no LAPIC EOI).
public final class KVMDomainRunner: DomainRunner, @unchecked Sendable {  // vCPU state is per thread
    public let built: BuiltDomain
    public var domain: Domain { built.domain }
    private let vm: VMBox
    private let vcpus: [KVMVirtualCPU]
    private let services: VCPUServices
    private let failure = Mutex<String?>(nil)

    final class VMBox: @unchecked Sendable {
        let vm: KVMVirtualMachine
        init(_ vm: consuming KVMVirtualMachine) { self.vm = vm }
    }

    /// The guest TSC's rate (KVM_GET_TSC_KHZ), for pvclock; 0 when KVM cannot say.
    private let tscHz: UInt64

    /// Publishes vCPU `index`'s pvclock record from the guest's current TSC (one KVM_GET_MSRS).
    private func publishTime(_ index: Int) {
        guard tscHz > 0, let tsc = try? vcpus[index].readMSR(0x10) else { return }
        domain.publishTime(vcpu: index, guestTSC: tsc, tscHz: tscHz)
    }

    /// Why the run ended, beyond the guest's own shutdown reason (a triple fault, an exit the
    /// engine cannot handle, an error from KVM).
    public var failureDescription: String? { failure.withLock { $0 } }
    public var exits: Int { control.exitCount.load(ordering: .relaxed) }
    /// Hypercalls the guest made (through the hypercall page).
    public var hypercalls: Int { control.hypercallCount.load(ordering: .relaxed) }

    // MARK: Pause and CPU time (for the daemon)

    private let control = RunControl()

    /// Stops the vCPUs between exits until ``unpause()``; timers and events still queue. (A
    /// kick makes a running vCPU exit at once: immediate_exit plus a signal.)
    public func pause() {
        control.pause()
        for cpu in vcpus { cpu.kick() }
    }

    public func unpause() { control.unpause() }

    public var isPaused: Bool { control.isPaused }

    /// KVM vCPUs are host threads the host's scheduler runs; they block on HLT and
    /// SCHEDOP_block/poll and wake on events as SoftCPU vCPUs do. A weight or cap other than the
    /// defaults puts them in a cgroup of their own with the host's cpu controller (cgroup v2
    /// `cpu.weight`/`cpu.max`, else v1 `cpu.shares`/`cpu.cfs_quota_us`: ``HostCPUController``),
    /// made at the first such setting and removed when the domain ends; where the host has
    /// neither, it is refused naming why.
    public var creditParameters: CreditParameters { shares.parameters }

    public func setCredit(weight: Int?, cap: Int?) throws(CreditError) {
        let current = shares.parameters
        try CreditScheduler.check(weight: weight ?? current.weight, cap: cap ?? current.cap)
        try shares.set(weight: weight, cap: cap)
    }

    /// The domain's cgroup directory while it has one (a weight or cap was set), else nil.
    public var cpuCgroupDirectory: String? { shares.directory }

    private let shares: DomainCPUShares

    /// The host CPU time the domain's vCPU threads have used so far.
    public var cpuTimeNanoseconds: UInt64 { control.cpuTimeNanoseconds }

    /// Creates the KVM VM and vCPUs for `built` and puts vCPU 0 in the PVH entry state.
    /// Whether /dev/kvm opens and offers what the runner needs (for `--engine auto`).
    public static var kvmUsable: Bool {
        guard let kvm = try? KVMSystem() else { return false }
        return (try? kvm.requireCapabilities()) != nil
    }

    public init(built: BuiltDomain, router: UpcallRouter) throws(KVMError) {
        let kvm = try KVMSystem()
        try kvm.requireCapabilities()
        let vm = try kvm.makeVirtualMachine(memory: built.domain.memory)
        let supported = try kvm.supportedCPUID()
        var vcpus: [KVMVirtualCPU] = []
        for id in 0..<built.domain.config.vcpus {
            let vcpu = try vm.makeVirtualCPU(id: UInt32(id))
            try vcpu.setCPUID(XenCPUID.guestCPUID(supported: supported, vcpu: UInt32(id), domain: built.domain.id))
            vcpus.append(vcpu)
        }
        try vcpus[0].setPVHEntryState(entry: built.boot.entry, startInfo: GuestPhysicalAddress(UInt64(built.boot.startInfo)))
        self.built = built
        self.vm = VMBox(vm)
        self.vcpus = vcpus
        let cpus = vcpus
        self.services = VCPUServices(domain: built.domain, vcpus: cpus.count) { cpus[$0].kick() }
        // Special frames the guest places (shared_info, grant frames) become KVM slots, inside
        // RAM too (the RAM slots are split around them).
        let physmap = KVMPhysmap(vm: self.vm, memory: built.domain.memory)
        built.domain.setPhysmapHook { index, frame in try physmap.place(index, at: frame) }
        self.tscHz = (try? vcpus[0].tscKilohertz()).map { $0 * 1000 } ?? 0
        self.shares = DomainCPUShares(domain: built.domain.id)
        router.connect(services.wake)
    }

    /// Runs vCPU 0 on the calling thread until the domain shuts down (other vCPUs wait for
    /// VCPUOP_up, which Vireo does not offer yet, so only vCPU 0 runs). Returns the reason.
    public func run() -> ShutdownReason {
        domain.setVCPUUpHook { [weak self] index, start in self?.startSecondary(index, start) }
        let reason = control.run(services, boot: { runVCPU(0) }, stopAll: stopAll)
        domain.setVCPUUpHook(nil)
        shares.end()  // every vCPU thread has left the cgroup
        return reason
    }

    /// Wakes and kicks every vCPU, so each sees the domain's end.
    private func stopAll() {
        control.wakeParked()
        services.wakeAll()
    }

    /// VCPUOP_up: puts the vCPU in its initial state and runs it on a thread of its own.
    private func startSecondary(_ index: Int, _ start: VCPUStart) {
        let cpu = vcpus[index]
        do {
            var s = PVHEntry.specialRegisters(from: try cpu.specialRegisters())
            (s.cr0, s.cr3, s.cr4, s.efer) = (start.cr0, start.cr3, start.cr4, start.efer)
            if start.mode == .long {
                var cs = s.cs
                cs.longMode = true
                cs.defaultSize32 = false
                s.cs = cs
            }
            try cpu.setSpecialRegisters(s)
            var r = X86Registers()
            (r.rax, r.rcx, r.rdx, r.rbx) = (start.rax, start.rcx, start.rdx, start.rbx)
            (r.rsp, r.rbp, r.rsi, r.rdi) = (start.rsp, start.rbp, start.rsi, start.rdi)
            (r.rip, r.rflags) = (start.rip, start.rflags)
            cpu.registers = r
        } catch {
            return crash("starting vCPU \(index): \(error)")
        }
        control.startSecondary(index) { [self] in
            runVCPU(index)
            stopAll()
        }
    }


    /// Stops the domain from another thread (the reason is recorded; the vCPU stops soon).
    public func stop(_ reason: ShutdownReason) {
        domain.shutDown(reason)
        stopAll()
    }

    private func crash(_ why: String) {
        failure.withLock { if $0 == nil { $0 = why } }
        domain.shutDown(.crash)
    }

    private func runVCPU(_ index: Int) {
        // Into the domain's cgroup (when a weight or cap made one) before any guest code runs.
        do { try shares.enter(vcpu: index) } catch { return crash("vCPU \(index): \(error)") }
        defer { shares.leave(vcpu: index) }
        control.counting(vcpu: index) { runVCPULoop(index) }
    }

    private func runVCPULoop(_ index: Int) {
        let cpu = vcpus[index]
        publishTime(index)
        while domain.shutdownReason == nil {
            control.parkWhilePaused(domain)
            // Due timers are the timer thread's job (it fires them and kicks this vCPU).
            if let vector = services.upcallVector(index) {
                if cpu.readyForInterruptInjection {
                    do { try cpu.injectInterrupt(vector: vector) } catch { return crash("KVM_INTERRUPT: \(error)") }
                    cpu.requestInterruptWindow = false
                } else {
                    cpu.requestInterruptWindow = true
                }
            }
            let exit: KVMExit
            do { exit = try cpu.run() } catch { return crash("KVM_RUN: \(error)") }
            control.exitCount.add(1, ordering: .relaxed)
            switch exit {
            case .port(let access):
                handlePort(access, cpu: cpu, vcpu: index)
            case .halt:
                // HLT with interrupts off can never be woken (no NMIs here): the vCPU is gone.
                if !cpu.interruptFlag {
                    crash("vCPU \(index) halted with interrupts disabled")
                    continue
                }
                sleep(vcpu: index)
            case .writeMSR(let msr, let value, _):
                if msr == VIREO_ABI_HYPERCALL_PAGE_MSR && HypercallPage.install(msrValue: value, in: domain.memory) {
                    continue
                }
                cpu.failMSRAccess()
            case .readMSR:
                cpu.completeMSRRead(0)
            case .shutdown:
                crash("the guest triple-faulted (vCPU \(index), RIP 0x\(String(cpu.registers.rip, radix: 16)))")
            case .internalError(let suberror, let data):
                crash("KVM could not emulate an instruction (suberror \(suberror), \(data.map { "0x" + String($0, radix: 16) }));"
                      + " on this host guests must avoid SSE and x87")
            case .failedEntry(let reason, _):
                crash("KVM refused to enter the guest (hardware reason 0x\(String(reason, radix: 16)))")
            case .memory(let access):
                if !access.isWrite { cpu.completeMemoryRead(UInt64.max) }  // no devices: reads float high
            case .interruptWindowOpen, .interrupted, .debug:
                continue
            case .systemEvent, .other:
                crash("unexpected KVM exit \(exit)")
            }
        }
    }

    private func handlePort(_ access: KVMPortAccess, cpu: KVMVirtualCPU, vcpu: Int) {
        switch (access.direction, access.port) {
        case (.output, HypercallPage.port):
            hypercall(cpu: cpu, vcpu: vcpu)
        case (.output, UInt16(VIREO_XEN_HVM_DEBUGCONS_IOPORT)):
            domain.writeConsole(Array(cpu.portData))
        case (.input, _):
            cpu.completeInput(UInt32.max)
        default:
            break
        }
    }

    private func hypercall(cpu: KVMVirtualCPU, vcpu: Int) {
        control.hypercallCount.add(1, ordering: .relaxed)
        var regs = cpu.registers
        let sregs = cpu.syncedSpecialRegisters  // from the run area: no ioctl per hypercall
        let longMode = sregs.efer & (1 << 10) != 0
        let call = VCPUServices.Call(number: regs.rax, longMode: longMode, userMode: sregs.cs.selector & 3 != 0,
                                     rdi: regs.rdi, rsi: regs.rsi, rdx: regs.rdx, r10: regs.r10, r8: regs.r8,
                                     rbx: regs.rbx, rcx: regs.rcx,
                                     paging: PagingMode(cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer))
        switch services.hypercall(call, vcpu: vcpu) {
        case .result(let result, let slept):
            if slept { publishTime(vcpu) }  // time moved on while the vCPU slept
            regs.rax = result
            cpu.registers = regs
        case .restart(let args):
            if longMode {
                (regs.rdi, regs.rsi, regs.rdx) = (args[0], args[1], args[2])
            } else {
                (regs.rbx, regs.rcx, regs.rdx) = (args[0], args[1], args[2])
            }
            regs.rip &-= 2  // back onto `out %eax, $port`: the call runs again
            cpu.registers = regs
        case .stop:
            return
        }
    }

    /// Sleeps the vCPU until an event is pending for it, a timer fires or the domain stops.
    private func sleep(vcpu: Int) {
        defer { publishTime(vcpu) }  // time moved on while the vCPU slept
        services.sleep(vcpu: vcpu, ports: nil, deadline: nil)
    }
}
