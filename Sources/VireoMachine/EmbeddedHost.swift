import Foundation
import Synchronization
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoKVM
import VireoStore

/// The embedded default of `vireo run`: everything one domain needs in one process, no daemon.
/// The host's own domain (Xen's dom0) with a dispatcher thread for its events, the XenStore
/// serving the guest's store ring (found through the reserved grant, as a backend would), the
/// toolstack's nodes for the domain, and the engine's runner (KVM or the SoftCPU).
public final class EmbeddedHost: @unchecked Sendable {  // fields are set once; the thread owns the loop
    public let hub = EventChannels()
    public let grants = GrantTables()
    public let host: HostEventDomain
    public let store: XenStore
    private let rings: XenStoreGuestRings
    private let mappings = Mappings()
    private var dispatcher: HostEventDispatcher?
    private let switches = Mutex<[String: NetworkSwitch]>([:])

    /// The in-process switch called `name` (made on first use): every vif of every domain this
    /// host runs with `--net switch:NAME` is a port of the same one, so two domains run on two
    /// threads of one process reach each other through it.
    public func networkSwitch(named name: String) -> NetworkSwitch {
        switches.withLock { s in
            if let existing = s[name] { return existing }
            let created = NetworkSwitch(name: name)
            s[name] = created
            return created
        }
    }

    final class Mappings: Sendable { let byDomain = Mutex<[DomainID: GrantMappingHolder]>([:]) }

    /// Keeps a grant mapping alive for as long as a backend uses the page.
    final class GrantMappingHolder: @unchecked Sendable {
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }

    public init() throws {
        // The host's end of every domain's store and console channels (and one per backend
        // ring) is a port of dom0: the 2-level ABI's whole 4096, not a guest's default 1024,
        // which ran out at 511 idle domains.
        host = try HostEventDomain(hub: hub, portLimit: EventChannels.maxPortLimit)
        store = XenStore()
        let grants = self.grants, mappings = self.mappings, hostID = host.id
        // The store page of a domain, through its reserved grant (GNTTAB_RESERVED_XENSTORE).
        rings = XenStoreGuestRings(store: store, host: host) { domain, _ in
            guard let table = grants.table(for: domain) else { throw GrantStatus.badDomain }
            let holder = GrantMappingHolder(try table.map(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_XENSTORE)), by: hostID, readOnly: false))
            let region = try holder.mapping.sharedRegion()
            mappings.byDomain.withLock { $0[domain] = holder }
            return region
        }
        dispatcher = HostEventDispatcher(host, name: "vireo-dom0-events", poll: .milliseconds(200))
    }

    /// Stops the host's event thread.
    public func shutdown() {
        dispatcher?.stop()
    }

    deinit { shutdown() }

    /// What one run ended with.
    public struct Outcome: Sendable {
        public var reason: ShutdownReason
        public var failure: String?
    }

    /// A virtual disk: a raw image file served by blkback as device `device` (51712 = xvda).
    public struct Disk: Sendable {
        public var path: String
        public var readOnly: Bool
        public var device: UInt32
        /// The logical sector size the guest sees: 512 or 4096 (`sector-size`).
        public var sectorSize: Int
        public init(path: String, readOnly: Bool = false, device: UInt32 = 51712, sectorSize: Int = 512) {
            self.path = path
            self.readOnly = readOnly
            self.device = device
            self.sectorSize = sectorSize
        }
    }

    /// Builds, introduces and runs one domain to its end: the XenStore gets the toolstack's
    /// nodes (`/local/domain/ID/name`, `domid`) and serves the guest's ring from the start;
    /// each disk's backend is created (its XenStore nodes written, InitWait) before the guest
    /// starts and served on its own thread until the domain ends.
    ///
    /// The console: console_io output goes to `console`, and the console ring's backend
    /// (``ConsoleBackend``, rate-limited by `consoleRate`) sends the ring's output there too and,
    /// given `consoleLog`, appends it to that file. It serves the ring from before the guest
    /// starts until the domain ends, draining it once more after the guest stops. Given
    /// `consoleInput`, what can be read from that descriptor goes into the ring's `in` side.
    ///
    /// Networks: each spec becomes vif handle 0, 1, ... (netback, Docs/network.md), its TAP
    /// opened or its switch port plugged in before the guest starts, served on its own thread
    /// until the domain ends, then unplugged.
    ///
    /// `devices` are further backends for the domain (built on this host's ``store``,
    /// ``grants`` and ``host`` for frontend `config.id`): created with the disks' and served
    /// the same way, each on its own thread.
    ///
    /// SoftCPU vCPUs run on `scheduler` (the daemon's pool shared by its domains) or, without
    /// one, on a private pool; `credit` is the domain's weight and cap (Docs/scheduling.md). On
    /// KVM a weight or cap other than the defaults goes to the host's cpu cgroup
    /// (``HostCPUController``), or is refused naming why where it has none (``CreditError/unsupported(_:)``).
    ///
    /// `handle`, when given, controls the running domain from other threads (pause, unpause,
    /// destroy) and reports its exits and CPU time: what the daemon holds for each domain.
    /// - Throws: ``BackendError`` naming the image when a disk cannot be opened, the console
    ///   log when it cannot be opened, or the TAP when it cannot be opened.
    public func run(config: DomainConfig, kernel: [UInt8], commandLine: String, disks: [Disk] = [],
                    networks: [NetworkSpec] = [], devices: [any BackendService] = [],
                    consoleLog: String? = nil, consoleRate: ConsoleBackend.RateLimit = .standard,
                    consoleInput: Int32? = nil, engine: ExecutionEngine = .kvm, handle: DomainHandle? = nil,
                    scheduler: CreditScheduler? = nil, credit: CreditParameters = CreditParameters(),
                    console: @escaping @Sendable ([UInt8]) -> Void) throws -> Outcome {
        // Open the images first: a missing file fails before any domain exists.
        var backends: [any BackendService] = []
        for disk in disks {
            backends.append(try BlockBackend(path: disk.path, readOnly: disk.readOnly, frontend: config.id, device: disk.device,
                                             sectorSize: disk.sectorSize, store: store, grants: grants, host: host))
        }
        // The TAPs next, for the same reason; a vif's backend needs the domain's ID only.
        var switchPorts: [NetworkSwitch.Port] = []
        defer { for port in switchPorts { port.remove() } }
        for (handle, spec) in networks.enumerated() {
            let backend = try NetBackend(frontend: config.id, handle: UInt32(handle),
                                         configuration: .init(mac: spec.mac, rateBytesPerSecond: spec.rateBytesPerSecond),
                                         store: store, grants: grants, host: host)
            switch spec.hostSide {
            case .tap(let name): backend.attach(try TapDevice(name: name))
            case .networkSwitch(let name): switchPorts.append(networkSwitch(named: name).connect(backend))
            }
            backends.append(backend)
        }
        let router = UpcallRouter()
        let built = try DomainBuilder.build(config: config, kernel: kernel, commandLine: commandLine, hub: hub,
                                            grantTables: grants, backend: host.id, console: console,
                                            upcall: { router.upcall($0) })
        defer {
            try? store.releaseDomain(built.domain.id)
            mappings.byDomain.withLock { _ = $0.removeValue(forKey: built.domain.id) }
            built.domain.destroy()
        }
        // The console ring's backend: stopped (and its last output drained) before the domain dies.
        let consoleBackend = try ConsoleBackend(frontend: built.domain.id, port: built.consolePort, grants: grants, host: host,
                                                logPath: consoleLog, rateLimit: consoleRate, sink: console,
                                                log: { FileHandle.standardError.write(Data("vireo: \($0)\n".utf8)) })
        // One thread serves both directions (console input, when given, is read on it too).
        let consoleThread = Thread { consoleBackend.run(input: consoleInput) }
        consoleThread.name = "vireo-console-\(built.domain.id.rawValue)"
        consoleThread.start()
        defer {
            consoleBackend.stop()
            while !consoleThread.isFinished { usleep(1000) }
        }
        try store.introduceDomain(built.domain.id, frame: built.storeFrame, port: built.storePort)
        // The toolstack's nodes for the domain, written as dom0 (xl writes these too). The
        // value of a write is the payload after the path's NUL, without a terminator.
        let toolstack = store.connect(domain: host.id)
        defer { store.disconnect(toolstack) }
        let home = "/local/domain/\(built.domain.id.rawValue)"
        for (key, value) in [("name", config.name), ("domid", "\(built.domain.id.rawValue)")] {
            let reply = store.request(XenStoreMessage(type: .write, payload: Array("\(home)/\(key)".utf8) + [0] + Array(value.utf8)),
                                      from: toolstack)
            guard reply?.type == .write else { throw DomainBuilder.Failure.setup("XenStore refused \(home)/\(key): \(String(describing: reply))") }
        }
        backends += devices
        var servers: [Thread] = []
        defer {
            for backend in backends { backend.stop() }
            for thread in servers { while !thread.isFinished { usleep(1000) } }
        }
        for backend in backends {
            try backend.create()
            let thread = Thread { backend.run() }
            thread.name = "vireo-\(backend.name)"
            thread.start()
            servers.append(thread)
        }
        let runner: any DomainRunner
        switch engine {
        case .kvm:
            runner = try KVMDomainRunner(built: built, router: router)
            try runner.setCredit(weight: credit.weight, cap: credit.cap)
        case .soft:
            runner = try SoftDomainRunner(built: built, router: router, scheduler: scheduler, credit: credit)
        }
        handle?.attach(runner)
        defer { handle?.detach() }
        let reason = runner.run()
        return Outcome(reason: reason, failure: runner.failureDescription)
    }
}
