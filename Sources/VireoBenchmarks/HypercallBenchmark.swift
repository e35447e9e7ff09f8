import VireoABI
import VireoBench
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoKVM
import VireoMachine

/// `vireo bench hypercall`: the cost of a no-op hypercall through Vireo (the `hypercalls`
/// sample guest on the KVM engine: hypercall page stub, I/O exit, register read through the run
/// area, dispatch, result, re-entry) beside a raw I/O exit loop of the same instruction shape on
/// a bare KVM vCPU in the same run (`xor; call stub; dec; jnz` with the stub `mov; out; ret`,
/// nothing done per exit). Both are measured in µs per iteration; the ratio is Vireo's overhead.
public struct HypercallBenchmark: Benchmark {
    public let name = "hypercall"
    public let summary = "µs per no-op hypercall through Vireo, beside a raw I/O exit loop of the same shape on a bare vCPU"

    public init() {}

    /// The bare loop at 0x1000 and its stub at 0x1100 (64-bit code).
    static let loop: [UInt8] = [0x31, 0xFF, 0xFF, 0xD3, 0xFF, 0xC9, 0x75, 0xF8, 0xE6, 0x81, 0xF4]
    static let stub: [UInt8] = [0xB8, 0x11, 0, 0, 0, 0xE7, UInt8(HypercallPage.port), 0xC3]

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        if let reason = KVMSystem.unavailableReason() {
            throw BenchmarkError.unavailable(name: name, reason: reason)
        }
        let kernel = try BenchmarkGuests.image("hypercalls", benchmark: name, log: options.log)
        let small = options.quick ? 200 : 2_000
        let large = options.quick ? 2_000 : 40_000
        let rounds = options.quick ? 1 : 3

        var vireo: [Double] = [], raw: [Double] = []
        for round in 0..<rounds {
            options.log("hypercall: round \(round + 1)/\(rounds): Vireo (\(small) and \(large) hypercalls), raw loop")
            let t1 = try Self.vireoRun(kernel, count: small)
            let t2 = try Self.vireoRun(kernel, count: large)
            vireo.append(Double(t2 - t1) / Double(large - small) / 1000)
            raw.append(try Self.rawLoop(iterations: large) / 1000)
        }
        let value = vireo.sorted()[vireo.count / 2], baseline = raw.sorted()[raw.count / 2]
        return BenchmarkResult(
            bench: name, value: value, unit: "µs per hypercall", baseline: baseline,
            baselineName: "raw I/O exit loop of the same shape on a bare KVM vCPU (µs per iteration)",
            goal: "ratio <= 1.15",
            extra: [
                ("hypercalls_per_s", .number((1e6 / value).rounded())),
                ("raw_exits_per_s", .number((1e6 / baseline).rounded())),
                ("hypercalls_measured", .integer(Int64(large - small))),
                ("guest", .string("hypercalls sample: xen_version(XENVER_version) in a 4-instruction loop")),
            ])
    }

    /// Nanoseconds the `hypercalls` guest takes to run `count` hypercalls and power off,
    /// measured from the first entry to the shutdown (domain creation excluded).
    static func vireoRun(_ kernel: [UInt8], count: Int) throws -> UInt64 {
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let router = UpcallRouter()
        let built = try DomainBuilder.build(
            config: DomainConfig(id: DomainID(1), name: "hypercalls", memoryBytes: 16 << 20), kernel: kernel,
            commandLine: "n=\(count)", hub: hub, grantTables: grants, console: { _ in }, upcall: { router.upcall($0) })
        defer { built.domain.destroy() }
        let runner = try KVMDomainRunner(built: built, router: router)
        let start = Measure.now()
        let reason = runner.run()
        let elapsed = Measure.now() - start
        withExtendedLifetime(host) {}
        guard reason == .poweroff else {
            throw BenchmarkError.unavailable(name: "hypercall", reason: "the guest ended with \(reason): \(runner.failureDescription ?? "")")
        }
        return elapsed
    }

    /// Nanoseconds per iteration of the bare loop: each `out` exits, the host re-enters at once.
    static func rawLoop(iterations: Int) throws -> Double {
        let memory = try GuestMemory(ramBytes: 2 << 20)
        try memory.write(loop, at: GuestPhysicalAddress(0x1000))
        try memory.write(stub, at: GuestPhysicalAddress(0x1100))
        let kvm = try KVMSystem()
        let vm = try kvm.makeVirtualMachine(memory: memory)
        let vcpu = try vm.makeVirtualCPU(id: 0)
        try vcpu.setCPUID(XenCPUID.guestCPUID(supported: kvm.supportedCPUID(), vcpu: 0, domain: DomainID(1)))
        try vcpu.setPVHEntryState(entry: 0x1000, startInfo: GuestPhysicalAddress(0))
        try LongModeSetup.enter(memory, vcpu, rip: 0x1000)
        var regs = vcpu.registers
        regs.rbx = 0x1100
        regs.rcx = UInt64(iterations)
        vcpu.registers = regs
        let start = Measure.now()
        var exits = 0
        while true {
            switch try vcpu.run() {
            case .port(let access) where access.port == HypercallPage.port: exits += 1
            case .port(let access) where access.port == 0x81:
                guard exits == iterations else {
                    throw BenchmarkError.unavailable(name: "hypercall", reason: "raw loop made \(exits) exits, expected \(iterations)")
                }
                return Double(Measure.now() - start) / Double(iterations)
            case .interrupted: continue
            case let other: throw BenchmarkError.unavailable(name: "hypercall", reason: "raw loop: unexpected exit \(other)")
            }
        }
    }
}
