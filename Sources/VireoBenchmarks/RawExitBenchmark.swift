import VireoABI
import VireoBench
import VireoCore
import VireoKVM

/// `vireo bench exit`: the raw cost of a guest exit to Vireo on KVM — a guest looping on
/// `out %al, $0x80` makes one I/O exit per iteration, and Vireo does nothing but re-enter.
/// This is the floor every hypercall (an I/O exit from the hypercall page) sits on, and the
/// baseline `vireo bench hypercall` compares against. Its own baseline, measured in the same
/// run, is the cheapest KVM round trip there is: KVM_CHECK_EXTENSION on the VM fd.
public struct RawExitBenchmark: Benchmark {
    public let name = "exit"
    public let summary = "KVM I/O exit round trips/s (guest `out` loop, no work per exit) beside trivial KVM ioctls/s"

    public init() {}

    /// The guest: `1: out %al, $0x80; jmp 1b`, at 0x1000.
    static let loop: [UInt8] = [0xE6, 0x80, 0xEB, 0xFC]
    static let port: UInt16 = 0x80
    /// A second guest, for the guest's own speed: `1: dec %ecx; jnz 1b; out %al, $0x81`, at 0x1100.
    static let countdown: [UInt8] = [0x49, 0x75, 0xFD, 0xE6, 0x81]

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        if let reason = KVMSystem.unavailableReason() {
            throw BenchmarkError.unavailable(name: name, reason: reason)
        }
        let memory = try GuestMemory(ramBytes: 64 * 1024)
        try memory.write(Self.loop, at: GuestPhysicalAddress(0x1000))
        try memory.write(Self.countdown, at: GuestPhysicalAddress(0x1100))
        let kvm = try KVMSystem()
        let vm = try kvm.makeVirtualMachine(memory: memory)
        let vcpu = try vm.makeVirtualCPU(id: 0)
        try vcpu.setCPUID(XenCPUID.guestCPUID(supported: kvm.supportedCPUID(), vcpu: 0, domain: DomainID(1)))
        try vcpu.setPVHEntryState(entry: 0x1000, startInfo: GuestPhysicalAddress(0))

        let batch = 1000
        let seconds = options.phaseSeconds
        let rounds = options.quick ? 1 : 3
        var exitRates: [Measure.Rate] = [], ioctlRates: [Measure.Rate] = [], getRegsRates: [Measure.Rate] = []
        for round in 0..<rounds {
            options.log("exit: round \(round + 1)/\(rounds): I/O exits, exits + KVM_GET_REGS, KVM_CHECK_EXTENSION")
            exitRates.append(try Measure.rate(seconds: seconds) {
                try Self.exits(vcpu, batch)
            })
            // The cost sync regs saves: the same exits, each followed by a KVM_GET_REGS.
            getRegsRates.append(try Measure.rate(seconds: seconds) {
                var n: UInt64 = 0
                while n < UInt64(batch) {
                    n += try Self.exits(vcpu, 1)
                    _ = try vcpu.registersByIoctl()
                }
                return n
            })
            ioctlRates.append(try Measure.rate(seconds: seconds) {
                for _ in 0..<batch { _ = try vm.checkExtension(.syncRegisters) }
                return UInt64(batch)
            })
        }
        // How fast guest code itself runs (2 instructions per iteration, no exits): on hosts
        // where KVM emulates (kvm_pvm) this is millions, not billions, per second.
        options.log("exit: guest instruction rate (dec/jnz loop)")
        let iterations: UInt64 = options.quick ? 20_000 : 400_000
        var regs = vcpu.registers
        regs.rip = 0x1100
        regs.rcx = iterations
        vcpu.registers = regs
        let loopStart = Measure.now()
        while true {
            let exit = try vcpu.run()
            if exit == .interrupted { continue }
            guard case .port(let access) = exit, access.port == 0x81 else {
                throw BenchmarkError.unavailable(name: name, reason: "unexpected guest exit \(exit)")
            }
            break
        }
        let instructionsPerSecond = Double(2 * iterations) * 1e9 / Double(Measure.now() - loopStart)

        let exit = Measure.median(exitRates), ioctl = Measure.median(ioctlRates), getRegs = Measure.median(getRegsRates)
        func microseconds(_ rate: Measure.Rate) -> JSONValue {
            .number((rate.nanosecondsPerOperation / 10).rounded() / 100)
        }
        return BenchmarkResult(
            bench: name, value: exit.perSecond.rounded(), unit: "round trips/s",
            baseline: ioctl.perSecond.rounded(), baselineName: "KVM_CHECK_EXTENSION round trips on the VM fd",
            // No goal: this is the floor other benchmarks are measured against; the ratio says
            // how many trivial ioctls one exit costs (1/ratio), us_per_exit is the figure to watch.
            extra: [
                ("us_per_exit", microseconds(exit)),
                ("us_per_ioctl", microseconds(ioctl)),
                ("us_per_exit_with_get_regs", microseconds(getRegs)),
                ("exits_measured", .integer(Int64(exit.operations))),
                ("guest_instructions_per_s", .number(instructionsPerSecond.rounded())),
            ])
    }

    /// Nanoseconds per raw I/O exit round trip (this benchmark's `out` loop on a fresh bare
    /// vCPU, batches of 1000 for `seconds`): the baseline other benchmarks set beside theirs.
    public static func nanosecondsPerExit(seconds: Double) throws -> Double {
        let memory = try GuestMemory(ramBytes: 64 * 1024)
        try memory.write(loop, at: GuestPhysicalAddress(0x1000))
        let kvm = try KVMSystem()
        let vm = try kvm.makeVirtualMachine(memory: memory)
        let vcpu = try vm.makeVirtualCPU(id: 0)
        try vcpu.setCPUID(XenCPUID.guestCPUID(supported: kvm.supportedCPUID(), vcpu: 0, domain: DomainID(1)))
        try vcpu.setPVHEntryState(entry: 0x1000, startInfo: GuestPhysicalAddress(0))
        return try Measure.rate(seconds: seconds) { try exits(vcpu, 1000) }.nanosecondsPerOperation
    }

    /// Runs `count` guest exits; each must be the loop's `out`.
    static func exits(_ vcpu: KVMVirtualCPU, _ count: Int) throws -> UInt64 {
        var done = 0
        while done < count {
            switch try vcpu.run() {
            case .port(let access) where access.port == port: done += 1
            case .interrupted: continue
            case let other: throw BenchmarkError.unavailable(name: "exit", reason: "unexpected guest exit \(other)")
            }
        }
        return UInt64(count)
    }
}
