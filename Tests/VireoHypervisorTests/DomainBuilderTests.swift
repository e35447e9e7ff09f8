import Testing
import VireoABI
import VireoCore
import VireoHypercalls
@testable import VireoHypervisor

@Suite struct DomainBuilderTests {
    @Test func consoleAndStoreRingsAreReadyBeforeTheGuestRuns() throws {
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let built = try DomainBuilder.build(
            config: DomainConfig(id: DomainID(1), name: "hello", memoryBytes: 8 << 20), kernel: ELFBuilder.hello().build(),
            commandLine: "quiet", hub: hub, grantTables: grants, console: { _ in }, upcall: { _ in })
        let d = built.domain
        #expect(built.consoleFrame == GuestFrame(2046) && built.storeFrame == GuestFrame(2047))
        #expect(d.param(VIREO_HVM_PARAM_CONSOLE_PFN) == 2046)
        #expect(d.param(VIREO_HVM_PARAM_STORE_PFN) == 2047)
        #expect(d.param(VIREO_HVM_PARAM_STORE_EVTCHN) == UInt64(built.storePort.rawValue))
        // The backend finds the pages through the reserved grants and binds the channels.
        let console = try d.grantTable.map(GrantRef(0), by: .zero, readOnly: false)
        try console.store(UInt8(0x42), at: 1024)
        #expect(try d.memory.load(UInt8.self, at: GuestPhysicalAddress(2046 * 4096 + 1024)) == 0x42)
        let store = try d.grantTable.map(GrantRef(1), by: .zero, readOnly: false)
        _ = store.isValid
        let status = try hub.status(caller: .zero, domain: d.id, port: built.storePort)
        #expect(status.binding == .unbound(remote: .zero))
        let backendPort = try host.bindInterdomain(remoteDomain: d.id, remotePort: built.consolePort)
        try hub.send(caller: d.id, port: built.consolePort)
        #expect(host.poll() == [backendPort])
        // The memory map the guest gets marks the two pages reserved.
        let map = PVHLoader.memoryMap(ramSize: 8 << 20, reserved: d.reservedRanges)
        #expect(map.last.map { [$0.addr, $0.size, UInt64($0.type)] } == [2046 * 4096, 8192, 2])
    }

    @Test func badImagesAndSizesAreRefusedAndLeaveNothingBehind() throws {
        let hub = EventChannels(), grants = GrantTables()
        _ = try HostEventDomain(hub: hub)
        #expect(throws: DomainBuilder.Failure.self) {
            try DomainBuilder.build(config: DomainConfig(id: DomainID(1), name: "x", memoryBytes: 8 << 20),
                                    kernel: [1, 2, 3], hub: hub, grantTables: grants, console: { _ in }, upcall: { _ in })
        }
        var noEntry = ELFBuilder.hello()
        noEntry.entryNote = nil
        #expect(throws: DomainBuilder.Failure.self) {
            try DomainBuilder.build(config: DomainConfig(id: DomainID(1), name: "x", memoryBytes: 8 << 20),
                                    kernel: noEntry.build(), hub: hub, grantTables: grants, console: { _ in }, upcall: { _ in })
        }
        #expect(!hub.isRegistered(DomainID(1)) && grants.table(for: DomainID(1)) == nil, "a failed build leaves no domain")
        #expect(throws: DomainBuilder.Failure.self) {
            try DomainBuilder.build(config: DomainConfig(id: DomainID(1), name: "x", memoryBytes: 1 << 20),
                                    kernel: ELFBuilder.hello().build(), hub: hub, grantTables: grants, console: { _ in }, upcall: { _ in })
        }
    }
}
