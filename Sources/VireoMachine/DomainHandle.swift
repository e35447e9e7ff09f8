import Synchronization
import VireoHypervisor

/// Controls one run of a domain from other threads: given to ``EmbeddedHost/run(config:kernel:commandLine:disks:devices:consoleLog:consoleRate:consoleInput:handle:console:)``,
/// it is attached once the domain's vCPUs exist and detached when they have stopped. A request
/// made before the attach (a destroy or pause while the domain is being built) takes effect
/// at the attach. One handle per run: a restarted domain gets a new one.
public final class DomainHandle: Sendable {
    private struct State {
        var runner: (any DomainRunner)?
        var paused = false
        var destroyed = false
        var started = false
        var finishedExits = 0
        var finishedHypercalls = 0
        var finishedCPUNanoseconds: UInt64 = 0
        var credit: CreditParameters?
    }

    private let state = Mutex(State())

    public init() {}

    func attach(_ runner: any DomainRunner) {
        let (paused, destroyed) = state.withLock { state in
            state.runner = runner
            state.started = true
            return (state.paused, state.destroyed)
        }
        if paused { runner.pause() }
        if destroyed { runner.stop(.poweroff) }
        if let credit = state.withLock({ $0.credit }) { try? runner.setCredit(weight: credit.weight, cap: credit.cap) }
    }

    func detach() {
        state.withLock { state in
            if let runner = state.runner {
                state.finishedExits += runner.exits
                state.finishedHypercalls += runner.hypercalls
                state.finishedCPUNanoseconds &+= runner.cpuTimeNanoseconds
            }
            state.runner = nil
        }
    }

    /// Whether the domain's vCPUs exist (between the attach and the detach).
    public var isRunning: Bool { state.withLock { $0.runner != nil } }

    /// Whether the vCPUs were ever created in this run (stays true after they stop).
    public var hasStarted: Bool { state.withLock { $0.started } }

    /// Stops the vCPUs between exits; they stay parked until ``unpause()``.
    public func pause() {
        state.withLock { state -> (any DomainRunner)? in
            state.paused = true
            return state.runner
        }?.pause()
    }

    public func unpause() {
        state.withLock { state -> (any DomainRunner)? in
            state.paused = false
            return state.runner
        }?.unpause()
    }

    /// Ends the domain now (xl destroy): its vCPUs stop at their next exit, a paused one too.
    public func destroy() {
        state.withLock { state -> (any DomainRunner)? in
            state.destroyed = true
            return state.runner
        }?.stop(.poweroff)
    }

    /// The weight and cap in force (those set before the vCPUs exist, else the defaults, until then).
    public var creditParameters: CreditParameters {
        state.withLock { state in state.runner?.creditParameters ?? state.credit ?? CreditParameters() }
    }

    /// Sets the weight and/or cap (nil keeps it): at once when the vCPUs run, else at the attach.
    /// - Throws: ``CreditError`` naming the value out of range or why the engine cannot apply it.
    public func setCredit(weight: Int?, cap: Int?) throws(CreditError) {
        let runner = state.withLock { $0.runner }
        let current = runner?.creditParameters ?? state.withLock({ $0.credit }) ?? CreditParameters()
        let wanted = CreditParameters(weight: weight ?? current.weight, cap: cap ?? current.cap)
        try CreditScheduler.check(weight: wanted.weight, cap: wanted.cap)
        try runner?.setCredit(weight: weight, cap: cap)
        state.withLock { $0.credit = wanted }
    }

    public var destroyRequested: Bool { state.withLock { $0.destroyed } }

    /// KVM exits taken so far in this run.
    public var exits: Int {
        state.withLock { $0.finishedExits + ($0.runner?.exits ?? 0) }
    }

    /// Hypercalls made so far in this run.
    public var hypercalls: Int {
        state.withLock { $0.finishedHypercalls + ($0.runner?.hypercalls ?? 0) }
    }

    /// Host CPU time of the vCPU threads so far in this run.
    public var cpuTimeNanoseconds: UInt64 {
        state.withLock { $0.finishedCPUNanoseconds &+ ($0.runner?.cpuTimeNanoseconds ?? 0) }
    }
}
