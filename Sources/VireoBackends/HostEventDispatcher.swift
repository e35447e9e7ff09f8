import Foundation
import Synchronization
import VireoCore

/// Runs a host domain's event dispatch (the handlers of the ports its backends bound) on a
/// thread of its own until ``stop()``: the loop every host that serves backends needs.
public final class HostEventDispatcher: Sendable {
    private let host: HostEventDomain
    private let poll: Duration
    private let stopping = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)

    /// Starts the thread, named `name`; `poll` bounds how long one dispatch waits.
    public init(_ host: HostEventDomain, name: String, poll: Duration = .milliseconds(50)) {
        self.host = host
        self.poll = poll
        let thread = Thread { [self] in
            while !stopping.load(ordering: .acquiring) { _ = host.dispatch(timeout: poll) }
            finished.store(true, ordering: .releasing)
        }
        thread.name = name
        thread.start()
    }

    /// Ends the loop and waits for the thread. Idempotent.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        host.interrupt()
        while !finished.load(ordering: .acquiring) { usleep(1000) }
    }

    deinit { stop() }
}
