import Foundation
import Testing
import VireoABI
@testable import VireoCore

/// `SimulatedGuest.waitForEvents` halts as a vCPU does: asleep until the hub raises the guest's
/// upcall, which wakes it (the benchmarks' threaded frontends sleep there).
@Suite struct SimulatedGuestHaltTests {
    /// Two guests joined by an interdomain channel: `one` sends on `onePort`, `two` receives on `twoPort`.
    private static func pair() throws -> (one: SimulatedGuest, two: SimulatedGuest, onePort: EventPort, twoPort: EventPort) {
        let hub = EventChannels(), grants = GrantTables()
        let one = try SimulatedGuest(id: DomainID(1), ramPages: 16, hub: hub, grantTables: grants)
        let two = try SimulatedGuest(id: DomainID(2), ramPages: 16, hub: hub, grantTables: grants)
        let twoPort = try two.allocUnbound(remote: one.id)
        let onePort = try one.bindInterdomain(remoteDomain: two.id, remotePort: twoPort)
        return (one, two, onePort, twoPort)
    }

    @Test func aHaltedGuestWakesOnAnEventSentFromAnotherThread() throws {
        let p = try Self.pair()
        for round in 0..<20 {
            let sender = Thread { [one = p.one, port = p.onePort] in
                usleep(UInt32(1000 + round * 200))
                try? one.notify(port)
            }
            sender.start()
            // The timeout is far beyond the send: only the event can end this wait with the port.
            let ports = p.two.waitForEvents(timeout: .seconds(30))
            #expect(ports == [p.twoPort], "round \(round)")
            while !sender.isFinished { usleep(100) }
        }
        #expect(p.two.upcallCount >= 20)
    }

    @Test func anEventSentBeforeTheWaitIsTakenAtOnceAndNothingPendingTimesOutEmpty() throws {
        let p = try Self.pair()
        try p.one.notify(p.onePort)
        #expect(p.two.waitForEvents(timeout: .seconds(30)) == [p.twoPort])
        // Taken: the next wait finds nothing and returns empty when its timeout passes.
        #expect(p.two.waitForEvents(timeout: .milliseconds(20)).isEmpty)
        #expect(p.two.takePendingEvents().isEmpty)
    }
}
