import Foundation
import Synchronization
import VireoABI
import VireoBackends
import VireoBench
import VireoCore
import VireoKVM
import VireoMachine

/// `vireo bench evtchn`: event-channel ping-pong latency between a guest and a host backend.
/// The `evtchnping` sample binds an interdomain channel to a port the host allocated in its own
/// domain (named on its command line) and, round after round, sends an event (EVTCHNOP_send),
/// polls for the answer (SCHEDOP_poll) and clears it; the host's end is an echo run by a
/// ``HostEventDispatcher``, as backends' events are: the event wakes the dispatcher, whose
/// handler sends one back. The host times two runs of different lengths, so boot and shutdown
/// cancel out. value: ns per round trip on KVM; baseline: the raw KVM I/O exit round trip
/// (``RawExitBenchmark``'s `out` loop on a bare vCPU) measured in the same run; the SoftCPU's
/// figure is an extra field.
public struct EventChannelBenchmark: Benchmark {
    public let name = "evtchn"
    public let summary = "ns per event-channel round trip guest -> host echo -> guest (KVM; SoftCPU as an extra), beside a raw KVM exit"

    public init() {}

    /// The engine a ping-pong runs on.
    public enum Engine: String, Sendable { case kvm, soft }

    /// What one run of the guest gave: wall time from the first entry to the shutdown, and
    /// its console output.
    public struct Run: Sendable {
        public var nanoseconds: UInt64
        public var output: String
        public var echoed: Int
    }

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        if let reason = KVMSystem.unavailableReason() {
            throw BenchmarkError.unavailable(name: name, reason: "the baseline is a raw KVM exit: \(reason)")
        }
        let kernel = try BenchmarkGuests.image("evtchnping", benchmark: name, log: options.log)
        // On KVM the long run's extra 10 000 round trips take 0.2-0.6 s even where kvm_pvm
        // emulates the guest: far above the boot's jitter (tens of ms), which the difference
        // of the two runs must cancel.
        let kvmRounds = options.quick ? (20, 120) : (100, 10_100)
        let softRounds = options.quick ? (50, 550) : (500, 10_500)
        // Five rounds, each measuring every figure and the raw exit within the same seconds:
        // the medians hold against another process taking a core for part of one round.
        let repeats = options.quick ? 1 : 5
        var kvm: [Double] = [], soft: [Double] = [], raw: [Double] = [], kvmThread: [Double] = [], softThread: [Double] = []
        for round in 0..<repeats {
            options.log("evtchn: round \(round + 1)/\(repeats): KVM \(kvmRounds.1 - kvmRounds.0) round trips, SoftCPU \(softRounds.1 - softRounds.0), each with the echo immediate and on the dispatcher thread; raw exits")
            kvm.append(try Self.perRoundTrip(kernel, on: .kvm, rounds: kvmRounds, echo: .immediate))
            soft.append(try Self.perRoundTrip(kernel, on: .soft, rounds: softRounds, echo: .immediate))
            kvmThread.append(try Self.perRoundTrip(kernel, on: .kvm, rounds: kvmRounds, echo: .dispatcher))
            softThread.append(try Self.perRoundTrip(kernel, on: .soft, rounds: softRounds, echo: .dispatcher))
            raw.append(try RawExitBenchmark.nanosecondsPerExit(seconds: options.phaseSeconds))
        }
        func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
        let value = median(kvm), baseline = median(raw), softValue = median(soft)
        let kvmThreadValue = median(kvmThread), softThreadValue = median(softThread)
        return BenchmarkResult(
            bench: name, value: value.rounded(), unit: "ns per round trip", baseline: baseline.rounded(),
            baselineName: "raw KVM I/O exit round trip (guest `out` loop on a bare vCPU, nothing done per exit)",
            goal: "ratio <= 2.5",
            extra: [
                ("engine", .string("kvm")),
                ("soft_ns_per_round_trip", .number(softValue.rounded())),
                ("soft_ratio", .number((softValue / baseline * 100).rounded() / 100)),
                ("kvm_dispatcher_ns_per_round_trip", .number(kvmThreadValue.rounded())),
                ("kvm_dispatcher_ratio", .number((kvmThreadValue / baseline * 100).rounded() / 100)),
                ("soft_dispatcher_ns_per_round_trip", .number(softThreadValue.rounded())),
                ("round_ratios", .array(zip(kvm, raw).map { .number(($0 / $1 * 100).rounded() / 100) })),
                ("kvm_round_trips_measured", .integer(Int64(kvmRounds.1 - kvmRounds.0))),
                ("soft_round_trips_measured", .integer(Int64(softRounds.1 - softRounds.0))),
                ("guest", .string("evtchnping: EVTCHNOP_send, SCHEDOP_poll until pending, clear")),
                ("echo", .string("value and soft_*: the host's port is delivered immediately (its handler runs inside the guest's send, as backends' wake-ups do); *_dispatcher_*: the same echo relayed through dom0's dispatcher thread (two thread hand-offs per round trip)")),
            ])
    }

    /// Nanoseconds per round trip on `engine`: the difference of two runs of `rounds.0` and
    /// `rounds.1` round trips over the difference of their counts.
    static func perRoundTrip(
        _ kernel: [UInt8], on engine: Engine, rounds: (Int, Int), echo: HostEventDomain.Delivery
    ) throws -> Double {
        let short = try pingPong(kernel, on: engine, rounds: rounds.0, echo: echo)
        let long = try pingPong(kernel, on: engine, rounds: rounds.1, echo: echo)
        return Double(Int64(long.nanoseconds) - Int64(short.nanoseconds)) / Double(rounds.1 - rounds.0)
    }

    /// Boots `kernel` (the evtchnping sample) as domain 1 on `engine` beside a host domain whose
    /// port for it echoes every event, with `port=N rounds=M` on its command line; returns the
    /// run's time, output and the events the host echoed. Throws unless the guest powered off
    /// after printing its success line. `port` puts another number on the command line (a
    /// test's wrong one).
    public static func pingPong(
        _ kernel: [UInt8], on engine: Engine, rounds: Int, echo delivery: HostEventDomain.Delivery = .immediate,
        port given: UInt32? = nil
    ) throws -> Run {
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let echoed = Echoes()
        // The host's end of the channel, allocated for domain 1 before it exists (as a
        // toolstack does before it boots a guest); its handler runs as `delivery` says: on the
        // guest's vCPU thread inside its send (immediate, as backends' wake-ups do), or on the
        // dispatcher thread.
        let port = try host.allocUnbound(remote: DomainID(1), delivery: delivery) { port in
            echoed.count.add(1, ordering: .relaxed)
            try? host.send(port)
        }
        let dispatcher = HostEventDispatcher(host, name: "vireo-bench-evtchn-echo")
        defer { dispatcher.stop() }
        let run = try GuestBoot.run(
            kernel, name: "evtchnping", commandLine: "port=\(given ?? port.rawValue) rounds=\(rounds)",
            on: engine == .kvm ? .kvm : .soft, hub: hub, grants: grants)
        guard run.reason == .poweroff, run.output.contains("evtchnping: \(rounds) round trips ok\n") else {
            throw BenchmarkError.unavailable(
                name: "evtchn", reason: "evtchnping on \(engine.rawValue) ended with \(run.reason) \(run.failure ?? ""): \(run.output)")
        }
        return Run(nanoseconds: run.nanoseconds, output: run.output, echoed: echoed.count.load(ordering: .relaxed))
    }
}

/// Events the host's echo answered.
private final class Echoes: Sendable {
    let count = Atomic<Int>(0)
}
