import Testing
import VireoABI
import VireoCore
import VireoMachine

/// The host domain of an EmbeddedHost (vireod's, shared by every domain it runs) has room for
/// the two ports (XenStore, console) each of a thousand live domains binds in it.
@Suite struct EmbeddedHostDensityTests {
    @Test func theHostDomainHoldsTwoPortsForEachOfAThousandDomains() throws {
        let host = try EmbeddedHost()
        defer { host.shutdown() }
        var ports: [EventPort] = []
        for domain in 1...1000 {
            for _ in 0..<2 { ports.append(try host.host.allocUnbound(remote: DomainID(UInt16(domain)))) }
        }
        #expect(Set(ports).count == 2000)
        // The 2-level ABI's bound is the limit: port 0 is never handed out, so 4095 in all.
        while ports.count < EventChannels.maxPortLimit - 1 { ports.append(try host.host.allocUnbound(remote: DomainID(1))) }
        #expect(throws: XenError.ENOSPC) { try host.host.allocUnbound(remote: DomainID(1)) }
    }
}
