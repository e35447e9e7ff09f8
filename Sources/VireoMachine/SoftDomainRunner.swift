import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoKVM
import VireoSoftCPU

/// Runs one domain's vCPUs on the SoftCPU, Vireo's own x86-64 interpreter, on the threads of
/// a ``CreditScheduler`` (shared with other domains, or a private pool of one thread per vCPU
/// up to the host's cores), with the KVM runner's behaviour: the hypercall page's port exits (and `vmcall`/
/// `vmmcall`) go to the dispatcher, the hypercall-page MSR installs the page, HLT and
/// SCHEDOP_block give up the thread until an event or a timer wakes the vCPU, event upcalls arrive as the guest's callback
/// vector (no LAPIC EOI), and each vCPU's pvclock follows its virtual TSC (1 GHz).
public final class SoftDomainRunner: DomainRunner, @unchecked Sendable {  // each SoftCPU is used by its own thread
    public let built: BuiltDomain
    public var domain: Domain { built.domain }
    private let cpus: [SoftCPU]
    private let services: VCPUServices
    private let failure = Mutex<String?>(nil)
    private let retired = Atomic<UInt64>(0)
    private let scheduler: CreditScheduler
    private let privatePool: Bool
    /// The domain's place in the scheduler: its weight, cap and CPU time.
    public let scheduled: ScheduledDomain
    private let vcpus: VCPUTable

    /// Each vCPU's entry in the scheduler (added at boot or VCPUOP_up) and what its step keeps
    /// between calls; the scheduler never runs two steps of one vCPU at a time.
    private final class VCPUTable: @unchecked Sendable {  // entries behind the mutex; progress touched by one step at a time
        let entries: Mutex<[ScheduledVCPU?]>
        let progress: [Progress]
        init(count: Int) {
            entries = Mutex(Array(repeating: nil, count: count))
            progress = (0..<count).map { _ in Progress() }
        }
        func wake(_ index: Int) { entries.withLock { $0[index] }?.wake() }
    }

    private final class Progress {
        var started = false
        var counted: UInt64 = 0
        /// HLT, SCHEDOP_block or SCHEDOP_poll in progress: the vCPU runs again when ready.
        var sleeping: (ports: [EventPort]?, deadline: UInt64?)?
    }

    /// Instructions between looks at events, timers and the domain's state.
    public static let slice = 1 << 16

    /// Why the run ended beyond the guest's own shutdown reason (a triple fault, HLT with
    /// interrupts off, a mode the SoftCPU does not model).
    public var failureDescription: String? { failure.withLock { $0 } }
    /// Guest instructions retired by every vCPU so far.
    public var instructions: UInt64 { retired.load(ordering: .relaxed) }

    // MARK: Pause and counters (for the daemon)

    private let control = RunControl()
    /// Exits of the SoftCPU to this runner (port I/O, hypercalls, HLT, MSRs), not slices.
    public var exits: Int { control.exitCount.load(ordering: .relaxed) }
    public var hypercalls: Int { control.hypercallCount.load(ordering: .relaxed) }
    /// The host CPU time the scheduler gave the vCPUs.
    public var cpuTimeNanoseconds: UInt64 { scheduled.cpuTimeNanoseconds }
    public var isPaused: Bool { control.isPaused }

    /// Stops the vCPUs at their next slice or exit until ``unpause()``.
    public func pause() {
        control.pause()
        for cpu in cpus { cpu.kick() }
    }

    public func unpause() {
        control.unpause()
        services.wakeAll()  // the parked vCPUs are blocked in the scheduler
    }

    /// The weight and cap in force.
    public var creditParameters: CreditParameters {
        let (weight, cap) = scheduled.parameters
        return CreditParameters(weight: weight, cap: cap)
    }

    /// Sets the weight and cap (nil keeps one); takes effect at once.
    public func setCredit(weight: Int?, cap: Int?) throws(CreditError) {
        try scheduled.set(weight: weight, cap: cap)
    }

    /// Creates a SoftCPU per vCPU (CPUID with Xen's leaves, as on KVM) and puts vCPU 0 in the
    /// PVH entry state. Unimplemented instructions are reported once each through `log`. The
    /// vCPUs run on `scheduler` with `credit`'s weight and cap; without one, on a private pool
    /// of one thread per vCPU (at most the host's cores), stopped when ``run()`` returns.
    public init(built: BuiltDomain, router: UpcallRouter, scheduler: CreditScheduler? = nil,
                credit: CreditParameters = CreditParameters(),
                log: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data("vireo: \($0)\n".utf8)) }) throws(CreditError) {
        self.built = built
        let domain = built.domain
        privatePool = scheduler == nil
        let scheduler = scheduler ?? CreditScheduler(threads: min(domain.config.vcpus, CreditScheduler.activeCores))
        self.scheduler = scheduler
        do {
            scheduled = try scheduler.addDomain(name: domain.config.name, weight: credit.weight, cap: credit.cap)
        } catch {
            if privatePool { scheduler.shutdown() }
            throw error
        }
        var made: [SoftCPU] = []
        for id in 0..<domain.config.vcpus {
            let leaves = XenCPUID.leaves(vcpu: UInt32(id), domain: domain.id).map {
                CPUIDLeaf(function: $0.function, index: $0.index, significantIndex: $0.flags & 1 != 0,
                          eax: $0.eax, ebx: $0.ebx, ecx: $0.ecx, edx: $0.edx)
            }
            let cpu = SoftCPU(memory: domain.memory, vcpu: UInt32(id), hypervisorLeaves: leaves)
            cpu.unimplemented = { rip, bytes in
                log("SoftCPU: vCPU \(id) met an instruction it does not implement at RIP 0x\(String(rip, radix: 16)): "
                    + bytes.map { String(format: "%02x", $0) }.joined(separator: " ") + " (raising #UD)")
            }
            made.append(cpu)
        }
        let cpus = made
        cpus[0].setPVHEntryState(entry: built.boot.entry, startInfo: UInt32(truncatingIfNeeded: built.boot.startInfo))
        self.cpus = cpus
        let vcpus = VCPUTable(count: cpus.count)
        self.vcpus = vcpus
        self.services = VCPUServices(domain: domain, vcpus: cpus.count) { index in
            cpus[index].kick()
            vcpus.wake(index)
        }
        // A special frame placed over (or beside) RAM changes what an address means: every
        // vCPU drops its translations before its next instruction.
        domain.setPhysmapHook { _, _ in for cpu in cpus { cpu.physmapChanged() } }
        router.connect(services.wake)
    }

    /// Runs vCPU 0 (others join on VCPUOP_up) on the scheduler until the domain shuts down,
    /// the calling thread waiting. Returns the reason.
    public func run() -> ShutdownReason {
        domain.setVCPUUpHook { [weak self] index, start in self?.startSecondary(index, start) }
        // No timer thread: a running vCPU fires due timers at each step (at most a slice
        // late), a blocked one is woken by the scheduler at the earliest deadline, and a timer
        // armed or disarmed makes the blocked vCPUs look again (their wake-up time changed).
        let vcpus = self.vcpus
        domain.setTimerHook { for index in vcpus.progress.indices { vcpus.wake(index) } }
        let reason = control.run(services, timerThread: false, boot: {
            schedule(0)
            scheduled.waitForVCPUs()
        }, stopAll: stopAll)
        domain.setTimerHook(nil)
        domain.setVCPUUpHook(nil)
        domain.setPhysmapHook(nil)
        scheduled.remove()
        if privatePool { scheduler.shutdown() }
        return reason
    }

    private func schedule(_ index: Int) {
        let cpu = cpus[index]
        let entry = scheduled.makeVCPU(step: { [unowned self] in step(index) }, preempt: { cpu.kick() })
        vcpus.entries.withLock { $0[index] = entry }  // before it runs: every wake for it finds it
        entry.start()
    }

    /// Stops the domain from another thread.
    public func stop(_ reason: ShutdownReason) {
        domain.shutDown(reason)
        stopAll()
    }

    private func stopAll() {
        control.wakeParked()
        services.wakeAll()
    }

    private func crash(_ why: String) {
        failure.withLock { if $0 == nil { $0 = why } }
        domain.shutDown(.crash)
    }

    /// VCPUOP_up: the vCPU's initial state, then a thread of its own.
    private func startSecondary(_ index: Int, _ start: VCPUStart) {
        let cpu = cpus[index]
        cpu.setStartState(long: start.mode == .long, cr0: start.cr0, cr3: start.cr3, cr4: start.cr4, efer: start.efer)
        (cpu[.rax], cpu[.rcx], cpu[.rdx], cpu[.rbx]) = (start.rax, start.rcx, start.rdx, start.rbx)
        (cpu[.rsp], cpu[.rbp], cpu[.rsi], cpu[.rdi]) = (start.rsp, start.rbp, start.rsi, start.rdi)
        cpu.rip = start.rip
        cpu.rflags = start.rflags
        // The boot vCPU's descriptor tables: a secondary starts with the GDT the kernel loaded
        // (Xen's vcpu_hvm_context gives flat segments; the GDT is found when CS is reloaded).
        cpu.setDescriptorTables(gdt: (cpus[0].gdtBase, cpus[0].gdtLimit), idt: (0, 0))
        schedule(index)
    }

    private func publishTime(_ index: Int) {
        domain.publishTime(vcpu: index, guestTSC: cpus[index].tsc, tscHz: SoftCPU.tscHz)
    }

    /// One step of vCPU `index` on a pool thread: one instruction budget and the exit it ends
    /// with. It never sleeps: HLT, SCHEDOP_block and SCHEDOP_poll block the vCPU in the
    /// scheduler until it is ready (an event, a timer, the poll's deadline, a stop), a pause
    /// blocks it until the unpause.
    private func step(_ index: Int) -> CreditScheduler.Step {
        let cpu = cpus[index]
        let progress = vcpus.progress[index]
        if domain.shutdownReason != nil {
            stopAll()  // one vCPU ending ends them all, as before
            return .done
        }
        if control.isPaused { return .block(wakeAt: nil) }
        if !progress.started {
            progress.started = true
            progress.counted = cpu.instructions
            publishTime(index)
        }
        if let sleeping = progress.sleeping {
            switch services.checkSleep(vcpu: index, ports: sleeping.ports, deadline: sleeping.deadline) {
            case .sleep(let until):
                return .block(wakeAt: until.map { CreditScheduler.now() &+ ($0 &- min($0, domain.systemTime())) })
            case .ready:
                progress.sleeping = nil
                publishTime(index)  // time moved on while the vCPU slept
            }
        }
        // The timers that fell due while this vCPU ran (no timer thread watches them).
        if let next = domain.nextTimerDeadline, next <= domain.systemTime() {
            domain.fireDueTimers()
        }
        if let vector = services.upcallVector(index), cpu.readyForInterrupt {
            cpu.injectInterrupt(vector: vector)
        }
        let exit = cpu.run(budget: Self.slice)
        retired.add(cpu.instructions &- progress.counted, ordering: .relaxed)
        progress.counted = cpu.instructions
        if case .budget = exit { return .run }
        control.exitCount.add(1, ordering: .relaxed)
        switch exit {
        case .budget:
            break
        case .portOut(let port, let size, let value, let length):
            if port == HypercallPage.port {
                return hypercall(cpu, vcpu: index, length: length)
            } else if port == UInt16(VIREO_XEN_HVM_DEBUGCONS_IOPORT) {
                domain.writeConsole((0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * UInt32($0))) })
            }
        case .portIn:
            cpu.completePortIn(UInt32.max)  // no devices: reads float high, as on KVM
        case .halt:
            progress.sleeping = (nil, nil)
        case .hypercall(let length):
            return hypercall(cpu, vcpu: index, length: length)
        case .writeMSR(let msr, let value):
            let accepted = msr == VIREO_ABI_HYPERCALL_PAGE_MSR && HypercallPage.install(msrValue: value, in: domain.memory)
            cpu.completeMSRWrite(accepted: accepted)
        case .shutdown(let why):
            crash("vCPU \(index): \(why)")
        }
        return .run
    }

    private func hypercall(_ cpu: SoftCPU, vcpu: Int, length: Int) -> CreditScheduler.Step {
        control.hypercallCount.add(1, ordering: .relaxed)
        let call = VCPUServices.Call(number: cpu[.rax], longMode: cpu.longMode, userMode: cpu.cpl != 0,
                                     rdi: cpu[.rdi], rsi: cpu[.rsi], rdx: cpu[.rdx], r10: cpu[.r10], r8: cpu[.r8],
                                     rbx: cpu[.rbx], rcx: cpu[.rcx],
                                     paging: PagingMode(cr0: cpu.cr0, cr3: cpu.cr3, cr4: cpu.cr4, efer: cpu.efer))
        switch services.hypercallStep(call, vcpu: vcpu) {
        case .completion(.result(let result, _)):
            cpu[.rax] = result
        case .completion(.restart(let args)):
            if cpu.longMode {
                (cpu[.rdi], cpu[.rsi], cpu[.rdx]) = (args[0], args[1], args[2])
            } else {
                (cpu[.rbx], cpu[.rcx], cpu[.rdx]) = (args[0], args[1], args[2])
            }
            cpu.rip &-= UInt64(length)  // back onto the trapping instruction: the call runs again
        case .completion(.stop):
            break
        case .sleep(let result, let ports, let deadline):
            cpu[.rax] = result
            vcpus.progress[vcpu].sleeping = (ports, deadline)
        case .yield(let result):
            cpu[.rax] = result
            return .yield
        }
        return .run
    }
}

/// A domain's credit-scheduler parameters, as `xl sched-credit` shows them: weight (1...65535,
/// default 256) and cap (percent of one host CPU, 0 = none).
public struct CreditParameters: Sendable, Equatable, Codable {
    public var weight: Int
    public var cap: Int
    public init(weight: Int = CreditScheduler.defaultWeight, cap: Int = 0) {
        self.weight = weight
        self.cap = cap
    }
}
