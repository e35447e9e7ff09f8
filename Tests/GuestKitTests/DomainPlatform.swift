import Foundation
import GuestKit
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoStore

/// GuestKit's platform on the host: a real `Domain` whose hypercalls go through the real
/// `HypercallDispatcher` with paging off (addresses are guest-physical), so the frontends
/// under test drive the real hypervisor code. SCHEDOP_block waits here as an engine would:
/// it runs the host's event dispatch (the XenStore's ring service), fires due timers and
/// refreshes the pvclock until the guest has an upcall pending.
final class DomainPlatform: GuestPlatform {
    let domain: Domain
    let dispatcher: HypercallDispatcher
    let space: GuestAddressSpace
    let host: HostEventDomain?
    private var nextPage: UInt64 = 1 << 20
    static let tscHz: UInt64 = 1_000_000_000
    /// How long SCHEDOP_block waits before the test is declared stuck.
    var blockTimeout: Duration = .seconds(10)
    private(set) var blocks = 0

    init(domain: Domain, host: HostEventDomain? = nil) {
        self.domain = domain
        self.dispatcher = HypercallDispatcher(domain: domain)
        self.space = GuestAddressSpace(memory: domain.memory, mode: .off)
        self.host = host
    }

    func hypercall(_ number: UInt64, _ a1: UInt64, _ a2: UInt64, _ a3: UInt64, _ a4: UInt64, _ a5: UInt64) -> Int64 {
        var arguments = [a1, a2, a3, a4, a5]
        while true {
            switch dispatcher.dispatch(number, arguments, vcpu: 0, space: space) {
            case .result(let value): return value
            case .yield, .shutdown: return 0
            case .block, .poll:
                waitForUpcall()
                return 0
            case .restart(let next): arguments = next + Array(repeating: 0, count: max(0, 5 - next.count))
            }
        }
    }

    func memory(at address: UInt64, count: Int) -> SharedRegion {
        do {
            return try domain.memory.translate(GuestPhysicalAddress(address), count: count)
        } catch {
            fatalError("guest-physical \(address) (+\(count)) is not guest memory: \(error)")
        }
    }

    func allocatePage() -> UInt64 {
        let page = nextPage
        nextPage += UInt64(guestPageSize)
        return page
    }

    func timestampCounter() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Publishes vCPU 0's pvclock against this platform's counter (what an engine does on entry).
    func publishTime() {
        domain.publishTime(vcpu: 0, guestTSC: timestampCounter(), tscHz: Self.tscHz)
    }

    func upcallPending() -> Bool {
        guard let info = domain.vcpuInfoRegion(0) else { return false }
        return info.loadAcquire8(at: 0) != 0
    }

    private func waitForUpcall() {
        blocks += 1
        let deadline = ContinuousClock.now + blockTimeout
        while !upcallPending() {
            guard ContinuousClock.now < deadline else { fatalError("SCHEDOP_block: no event came") }
            if let host { _ = host.dispatch(timeout: .milliseconds(1)) } else { usleep(200) }
            domain.fireDueTimers()
        }
        publishTime()
    }
}

/// A domain with what the toolstack gives a guest (console and store pages, their reserved
/// grants and unbound ports to the host, the HVM params) and, on the host side, the XenStore
/// serving its ring through the real ring transport, as `EmbeddedHost` wires it.
final class TestMachine {
    let hub = EventChannels()
    let grants = GrantTables()
    let host: HostEventDomain
    let store = XenStore()
    let rings: XenStoreGuestRings
    let domain: Domain
    let platform: DomainPlatform
    let consoleFrame: GuestFrame, storeFrame: GuestFrame
    let consolePort: EventPort, storePort: EventPort
    private let storeMapping = Holder()

    final class Holder: Sendable { let boxes = Mutex<[GrantMappingBox]>([]) }

    final class GrantMappingBox: @unchecked Sendable {
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }

    init(name: String = "gk-guest", id: DomainID = DomainID(7), memory: UInt64 = 4 << 20) throws {
        host = try HostEventDomain(hub: hub)
        let grants = self.grants, hostID = host.id
        let holder = storeMapping
        rings = XenStoreGuestRings(store: store, host: host) { domain, _ in
            guard let table = grants.table(for: domain) else { throw GrantStatus.badDomain }
            let box = GrantMappingBox(try table.map(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_XENSTORE)), by: hostID, readOnly: false))
            holder.boxes.withLock { $0.append(box) }
            return try box.mapping.sharedRegion()
        }
        domain = try Domain(config: DomainConfig(id: id, name: name, memoryBytes: memory), hub: hub, grantTables: grants,
                            console: { _ in }, upcall: { _ in })
        let frames = memory / UInt64(guestPageSize)
        consoleFrame = GuestFrame(frames - 2)
        storeFrame = GuestFrame(frames - 1)
        let table = GuestGrantTable(frames: [try domain.grantTable.frameRegion(0)], reserved: 0)
        table.write(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_CONSOLE)), to: host.id, frame: consoleFrame, readOnly: false)
        table.write(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_XENSTORE)), to: host.id, frame: storeFrame, readOnly: false)
        consolePort = try hub.allocUnbound(caller: host.id, in: domain.id, remote: host.id)
        storePort = try hub.allocUnbound(caller: host.id, in: domain.id, remote: host.id)
        domain.setParam(VIREO_HVM_PARAM_CONSOLE_PFN, consoleFrame.rawValue)
        domain.setParam(VIREO_HVM_PARAM_CONSOLE_EVTCHN, UInt64(consolePort.rawValue))
        domain.setParam(VIREO_HVM_PARAM_STORE_PFN, storeFrame.rawValue)
        domain.setParam(VIREO_HVM_PARAM_STORE_EVTCHN, UInt64(storePort.rawValue))
        domain.publishWallclock()
        platform = DomainPlatform(domain: domain, host: host)
        try store.introduceDomain(domain.id, frame: storeFrame, port: storePort)
        try toolstackWrite("/local/domain/\(id.rawValue)/name", name)
        try toolstackWrite("/local/domain/\(id.rawValue)/domid", "\(id.rawValue)")
    }

    /// Writes a node as dom0 (the toolstack).
    func toolstackWrite(_ path: String, _ value: String) throws {
        let toolstack = store.connect(domain: host.id)
        defer { store.disconnect(toolstack) }
        let reply = store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: toolstack)
        guard reply?.type == .write else { throw GuestError.EIO }
    }

    /// Sets a node's permissions as dom0 ("n0\0r7": owner dom0, dom7 may read).
    func toolstackSetPermissions(_ path: String, _ permissions: String) throws {
        let toolstack = store.connect(domain: host.id)
        defer { store.disconnect(toolstack) }
        let reply = store.request(XenStoreMessage(type: .setPermissions, payload: Array(path.utf8) + [0] + Array(permissions.utf8) + [0]),
                                  from: toolstack)
        guard reply?.type == .setPermissions else { throw GuestError.EACCES }
    }

    func toolstackRead(_ path: String) -> String? {
        let toolstack = store.connect(domain: host.id)
        defer { store.disconnect(toolstack) }
        guard let reply = store.request(XenStoreMessage(type: .read, payload: Array(path.utf8) + [0]), from: toolstack),
              reply.type == .read else { return nil }
        return String(decoding: reply.payload, as: UTF8.self)
    }

    deinit {
        try? store.releaseDomain(domain.id)
        storeMapping.boxes.withLock { $0.removeAll() }
        domain.destroy()
    }
}
