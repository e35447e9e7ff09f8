import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoKVM
import VireoSoftCPU

/// Runs one domain's vCPUs on the SoftCPU, Vireo's own x86-64 interpreter, one host thread
/// each, with the KVM runner's behaviour: the hypercall page's port exits (and `vmcall`/
/// `vmmcall`) go to the dispatcher, the hypercall-page MSR installs the page, HLT and
/// SCHEDOP_block sleep until an event or a timer, event upcalls arrive as the guest's callback
/// vector (no LAPIC EOI), and each vCPU's pvclock follows its virtual TSC (1 GHz).
public final class SoftDomainRunner: DomainRunner, @unchecked Sendable {  // each SoftCPU is used by its own thread
    public let built: BuiltDomain
    public var domain: Domain { built.domain }
    private let cpus: [SoftCPU]
    private let services: VCPUServices
    private let failure = Mutex<String?>(nil)
    private let retired = Atomic<UInt64>(0)

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
    public var cpuTimeNanoseconds: UInt64 { control.cpuTimeNanoseconds }
    public var isPaused: Bool { control.isPaused }

    /// Stops the vCPUs at their next slice or exit until ``unpause()``.
    public func pause() {
        control.pause()
        for cpu in cpus { cpu.kick() }
    }

    public func unpause() { control.unpause() }

    /// Creates a SoftCPU per vCPU (CPUID with Xen's leaves, as on KVM) and puts vCPU 0 in the
    /// PVH entry state. Unimplemented instructions are reported once each through `log`.
    public init(built: BuiltDomain, router: UpcallRouter,
                log: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data("vireo: \($0)\n".utf8)) }) {
        self.built = built
        let domain = built.domain
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
        self.services = VCPUServices(domain: domain, vcpus: cpus.count) { cpus[$0].kick() }
        // A special frame placed over (or beside) RAM changes what an address means: every
        // vCPU drops its translations before its next instruction.
        domain.setPhysmapHook { _, _ in for cpu in cpus { cpu.physmapChanged() } }
        router.connect(services.wake)
    }

    /// Runs vCPU 0 on the calling thread until the domain shuts down (others start on
    /// VCPUOP_up, each on a thread of its own). Returns the reason.
    public func run() -> ShutdownReason {
        domain.setVCPUUpHook { [weak self] index, start in self?.startSecondary(index, start) }
        let reason = control.run(services, boot: { runVCPU(0) }, stopAll: stopAll)
        domain.setVCPUUpHook(nil)
        domain.setPhysmapHook(nil)
        return reason
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
        control.startSecondary(index) { [self] in
            runVCPU(index)
            stopAll()
        }
    }

    private func publishTime(_ index: Int) {
        domain.publishTime(vcpu: index, guestTSC: cpus[index].tsc, tscHz: SoftCPU.tscHz)
    }

    private func runVCPU(_ index: Int) {
        control.counting(vcpu: index) { runVCPULoop(index) }
    }

    private func runVCPULoop(_ index: Int) {
        let cpu = cpus[index]
        publishTime(index)
        var counted: UInt64 = 0
        defer { retired.add(cpu.instructions &- counted, ordering: .relaxed) }
        while domain.shutdownReason == nil {
            control.parkWhilePaused(domain)
            if let vector = services.upcallVector(index), cpu.readyForInterrupt {
                cpu.injectInterrupt(vector: vector)
            }
            let exit = cpu.run(budget: Self.slice)
            retired.add(cpu.instructions &- counted, ordering: .relaxed)
            counted = cpu.instructions
            if case .budget = exit { continue }
            control.exitCount.add(1, ordering: .relaxed)
            switch exit {
            case .budget:
                continue
            case .portOut(let port, let size, let value, let length):
                if port == HypercallPage.port {
                    hypercall(cpu, vcpu: index, length: length)
                } else if port == UInt16(VIREO_XEN_HVM_DEBUGCONS_IOPORT) {
                    domain.writeConsole((0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * UInt32($0))) })
                }
            case .portIn:
                cpu.completePortIn(UInt32.max)  // no devices: reads float high, as on KVM
            case .halt:
                defer { publishTime(index) }  // time moved on while the vCPU slept
                services.sleep(vcpu: index, ports: nil, deadline: nil)
            case .hypercall(let length):
                hypercall(cpu, vcpu: index, length: length)
            case .writeMSR(let msr, let value):
                let accepted = msr == VIREO_ABI_HYPERCALL_PAGE_MSR && HypercallPage.install(msrValue: value, in: domain.memory)
                cpu.completeMSRWrite(accepted: accepted)
            case .shutdown(let why):
                crash("vCPU \(index): \(why)")
            }
        }
    }

    private func hypercall(_ cpu: SoftCPU, vcpu: Int, length: Int) {
        control.hypercallCount.add(1, ordering: .relaxed)
        let call = VCPUServices.Call(number: cpu[.rax], longMode: cpu.longMode, userMode: cpu.cpl != 0,
                                     rdi: cpu[.rdi], rsi: cpu[.rsi], rdx: cpu[.rdx], r10: cpu[.r10], r8: cpu[.r8],
                                     rbx: cpu[.rbx], rcx: cpu[.rcx],
                                     paging: PagingMode(cr0: cpu.cr0, cr3: cpu.cr3, cr4: cpu.cr4, efer: cpu.efer))
        switch services.hypercall(call, vcpu: vcpu) {
        case .result(let result, let slept):
            if slept { publishTime(vcpu) }
            cpu[.rax] = result
        case .restart(let args):
            if cpu.longMode {
                (cpu[.rdi], cpu[.rsi], cpu[.rdx]) = (args[0], args[1], args[2])
            } else {
                (cpu[.rbx], cpu[.rcx], cpu[.rdx]) = (args[0], args[1], args[2])
            }
            cpu.rip &-= UInt64(length)  // back onto the trapping instruction: the call runs again
        case .stop:
            return
        }
    }
}
