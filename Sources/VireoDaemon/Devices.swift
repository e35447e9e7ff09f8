import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoBackends
import VireoStore
import VireoToolstack

/// A disk's or a vif's backend that vireod holds for one run of a domain: those of the config
/// are handed to ``EmbeddedHost/run`` (which creates and serves each on a thread of its own),
/// those attached later the daemon starts itself. Either way the daemon can take one away
/// while the domain runs (`block-detach`, `network-detach`) and knows when its thread is done.
final class AttachedDevice: BackendService, @unchecked Sendable {  // immutable but for the atomics
    /// "vbd" or "vif": the device class in XenStore paths.
    let kind: String
    /// The device's handle: the disk's device number, the vif's devid.
    let devid: UInt32
    let name: String
    /// The backend until the device is let go: the run that served a config's device keeps
    /// this wrapper to its end, so the backend (and a TAP it holds) must not live as long.
    private let held: Mutex<(any BackendService)?>
    let backendPath: String
    let frontendPath: String
    /// Undoes the host side beyond the backend (a switch port), once.
    private let release: (@Sendable () -> Void)?
    private let phase = Atomic<Int>(0)  // 0: not run yet, 1: running, 2: its run returned
    private let released = Atomic<Bool>(false)

    init(kind: String, devid: UInt32, backend: any BackendService, backendPath: String, frontendPath: String,
         release: (@Sendable () -> Void)? = nil) {
        self.kind = kind
        self.devid = devid
        name = backend.name
        held = Mutex(backend)
        self.backendPath = backendPath
        self.frontendPath = frontendPath
        self.release = release
    }

    var key: String { "\(kind)/\(devid)" }
    /// The backend, while the device is held (nil once ``stopAndWait()`` let it go).
    var backend: (any BackendService)? { held.withLock { $0 } }
    func create() throws(BackendError) {
        guard let backend else { throw BackendError("\(name): detached") }
        try backend.create()
    }
    func run() {
        phase.store(1, ordering: .releasing)
        backend?.run()
        phase.store(2, ordering: .releasing)
    }
    func stop() { backend?.stop() }

    /// Stops the backend, waits until its run (if it was started) has returned, then lets the
    /// host side go and drops the backend (a TAP closes with it, leaving its bridge).
    func stopAndWait() {
        backend?.stop()
        while phase.load(ordering: .acquiring) == 1 { usleep(1000) }
        if !released.exchange(true, ordering: .acquiringAndReleasing) { release?() }
        held.withLock { $0 = nil }
    }
}

extension Daemon {
    /// How long a detach waits for the frontend to close, unless told: libxl's
    /// LIBXL_DESTROY_TIMEOUT.
    public static let detachTimeout = 10.0

    // MARK: Building a run's devices

    /// A disk's blkback for `domain`, counting into `io`.
    func diskDevice(_ disk: DomainSpec.Disk, domain: UInt16, io: IOCounters) throws(BackendError) -> AttachedDevice {
        let backend = try BlockBackend(path: disk.target, readOnly: disk.readOnly, frontend: DomainID(domain), device: disk.device,
                                       counters: io, store: host.store, grants: host.grants, host: host.host)
        return AttachedDevice(kind: "vbd", devid: disk.device, backend: backend, backendPath: backend.backendPath,
                              frontendPath: backend.frontendPath)
    }

    /// A vif's netback for `domain`, its host side attached: a port of the in-process switch
    /// `switch=NAME`, else a TAP named `vifname=` or, as xl names it, `vifDOMID.DEVID`, added
    /// to the Linux bridge `bridge=` when one is named (as Xen's vif-bridge script does).
    func vifDevice(_ vif: DomainSpec.Vif, domain: UInt16, io: IOCounters) throws(BackendError) -> AttachedDevice {
        let devid = vif.devid ?? 0
        let spec = try Self.network(vif, domain: Int(domain))
        let backend = try NetBackend(frontend: DomainID(domain), handle: devid,
                                     configuration: .init(mac: spec.mac, rateBytesPerSecond: spec.rateBytesPerSecond),
                                     counters: io, store: host.store, grants: host.grants, host: host.host)
        var release: (@Sendable () -> Void)?
        switch spec.hostSide {
        case .tap(let name):
            let tap = try TapDevice(name: name)
            if let bridge = vif.bridge { try tap.addToBridge(bridge) }
            backend.attach(tap)
        case .networkSwitch(let name):
            let port = host.networkSwitch(named: name).connect(backend)
            release = { port.remove() }
        }
        return AttachedDevice(kind: "vif", devid: devid, backend: backend, backendPath: backend.backendPath,
                              frontendPath: backend.frontendPath, release: release)
    }

    /// One vif as the network side's spec (`switch:NAME` or `tap:IFNAME`, `mac=`, `rate=`).
    static func network(_ vif: DomainSpec.Vif, domain: Int) throws(BackendError) -> NetworkSpec {
        var text = vif.switchName.map { "switch:\($0)" } ?? "tap:\(vif.vifname ?? "vif\(domain).\(vif.devid ?? 0)")"
        if let mac = vif.mac { text += ",mac=\(mac)" }
        if let rate = vif.rate { text += ",rate=\(rate)" }
        return try NetworkSpec(parsing: text)
    }

    /// Gives every vif without a `devid` the lowest one free, in order (xl's rule).
    static func assignDevids(_ vifs: inout [DomainSpec.Vif]) throws(APIError) {
        var used = Set(vifs.compactMap(\.devid))
        guard used.count == vifs.compactMap(\.devid).count else { throw .badRequest("vif: two vifs have the same devid", field: "vif") }
        for index in vifs.indices where vifs[index].devid == nil {
            guard let free = (0..<256).first(where: { !used.contains(UInt32($0)) }) else {
                throw .badRequest("vif: no devid is free (at most 256 vifs)", field: "vif")
            }
            vifs[index].devid = UInt32(free)
            used.insert(UInt32(free))
        }
    }

    /// After a run: every device still attached stops (their nodes go; a restart publishes
    /// them anew), and no device can be attached until the next run starts.
    func stopDevices(_ managed: Managed) {
        let devices = lock.withLock { () -> [AttachedDevice] in
            managed.devicesOpen = false
            defer { managed.devices = [:] }
            return Array(managed.devices.values)
        }
        for device in devices { device.stop() }
        for device in devices {
            device.stopAndWait()
            removeNodes(device)
        }
    }

    func removeNodes(_ device: AttachedDevice) {
        for path in [device.backendPath, device.frontendPath] {
            _ = host.store.request(XenStoreMessage(.rm, path), from: toolstack)
        }
    }

    // MARK: Detaching the Xen way

    /// How a detach went: the frontend closed, or it was forced.
    public enum Detach: String, Sendable {
        case closed, forced
    }

    /// libxl's device removal: a frontend that is connected (or connecting) is asked to close
    /// (the backend's `online` = 0, `state` = Closing, which the frontend's watch on its
    /// backend sees); the wait ends when its `state` is Closed (or gone), or after `timeout`
    /// seconds (then the device is forced). A frontend that never went past Initialising has
    /// nothing to close.
    func askToClose(_ device: AttachedDevice, timeout: Double) -> Detach {
        func frontState() -> UInt32? {
            guard let reply = host.store.request(XenStoreMessage(.read, device.frontendPath + "/state"), from: toolstack),
                  reply.error == nil else { return nil }
            let text = reply.text
            return text.utf8.count <= 2 ? UInt32(text) ?? 0 : 0
        }
        let idle: Set<UInt32> = [XenbusBackendState.unknown, XenbusBackendState.initialising, XenbusBackendState.closed]
        guard let first = frontState(), !idle.contains(first) else { return .closed }
        for (key, value) in [("online", "0"), ("state", "\(XenbusBackendState.closing)")] {
            let payload = Array("\(device.backendPath)/\(key)".utf8) + [0] + Array(value.utf8)
            _ = host.store.request(XenStoreMessage(type: .write, payload: payload), from: toolstack)
        }
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            guard let state = frontState(), state != XenbusBackendState.closed else { return .closed }
            usleep(10_000)
        } while Date() < deadline
        return .forced
    }

    /// Takes `key` ("vbd/51728", "vif/1") away from the running domain: the frontend is asked
    /// to close first (``askToClose(_:timeout:)``), then the backend stops, its host side goes (a
    /// disk image is synced, a switch port removed, a TAP closed) and both sides' nodes are
    /// removed; `update` takes it out of the spec. - Throws: 404 (field `field`) when the
    /// domain has no such device.
    private func detach(_ managed: Managed, key: String, timeout: Double, what: String, field: String,
                        update: (inout DomainSpec) -> Void) throws(APIError) -> (DomainInfo, Detach) {
        let device = try locked { () throws(APIError) -> AttachedDevice in
            guard let device = managed.devices.removeValue(forKey: key) else {
                throw .notFound("domain '\(managed.record.spec.name)' has no \(what)", field: field)
            }
            return device
        }
        let outcome = askToClose(device, timeout: timeout)
        device.stopAndWait()
        if device.kind == "vbd" {
            let disks = lock.withLock { managed.record.spec.disks.filter { $0.device == device.devid } }
            flushDisks(DomainSpec(name: "", kernel: "", disks: disks))
        }
        removeNodes(device)
        if outcome == .forced {
            logger.warning("the frontend did not close in time: device forced away",
                           metadata: ["id": "\(managed.record.id)", "device": "\(key)", "timeout": "\(timeout)"])
        }
        logger.info("device detached", metadata: ["id": "\(managed.record.id)", "device": "\(key)", "how": "\(outcome.rawValue)"])
        let updated = lock.withLock {
            update(&managed.record.spec)
            persist(managed.record)
            return info(locked: managed)
        }
        return (updated, outcome)
    }

    /// Records `device` on the domain and, through `add`, in its spec, and persists the spec.
    /// Call with the lock held; ``start(_:on:what:field:undo:)`` undoes it if the device fails.
    private func record(_ device: AttachedDevice, on managed: Managed, spec add: (inout DomainSpec) -> Void) {
        managed.devices[device.key] = device
        add(&managed.record.spec)
        persist(managed.record)
    }

    /// Starts `device`, already recorded on the domain and in its spec (persisted); if it does
    /// not start, the record is undone (`undo` takes it out of the spec). Under no lock.
    private func start(_ device: AttachedDevice, on managed: Managed, what: String, field: String,
                       undo: (inout DomainSpec) -> Void) throws(APIError) {
        do { try start(device, what: what, field: field) } catch {
            lock.withLock {
                managed.devices[device.key] = nil
                undo(&managed.record.spec)
                persist(managed.record)
            }
            throw error
        }
    }

    /// Starts a device the daemon attached to the running domain: publishes its nodes and
    /// serves it on a thread of its own. Under no lock.
    private func start(_ device: AttachedDevice, what: String, field: String) throws(APIError) {
        do { try device.create() } catch {
            device.stopAndWait()
            removeNodes(device)
            throw APIError(500, "\(what): cannot publish its XenStore nodes: \(error)", field: field)
        }
        let thread = Thread { device.run() }
        thread.name = "vireod-\(device.kind)\(device.devid)"
        thread.start()
    }

    // MARK: Disks

    /// `xl block-attach`: serves one more disk to the running domain. The backend publishes
    /// its nodes and the frontend's (`device/vbd/DEV`), as at create; a guest that watches
    /// its `device/vbd` sees the new disk. The disk joins the domain's spec, so a restart has it.
    /// - Throws: 400 (bad disk string or image, field `disk`), 404, 409 (not running, or the
    ///   device is in use).
    public func blockAttach(_ key: String, disk text: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "block-attach")
        let parsed: DomainSpec.Disk
        do { parsed = try DomainSpec.Disk.parse(text, source: "disk").disk } catch { throw .badRequest("\(error)", field: "disk") }
        guard parsed.target.hasPrefix("/") else {
            throw .badRequest("disk '\(text)': give the image's absolute path", field: "disk")
        }
        var status = stat()
        guard stat(parsed.target, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw .badRequest("disk '\(text)': '\(parsed.target)' is not an image file", field: "disk")
        }
        let id = managed.record.id
        let device = try locked { () throws(APIError) -> AttachedDevice in
            guard managed.handle != nil, managed.devicesOpen else { throw .conflict("domain '\(managed.record.spec.name)' stopped") }
            if let other = managed.record.spec.disks.first(where: { $0.device == parsed.device }) {
                throw .conflict("domain '\(managed.record.spec.name)' has a disk on \(other.vdev) already (\(other.target))")
            }
            let device: AttachedDevice
            do { device = try diskDevice(parsed, domain: id, io: managed.io) } catch {
                throw .badRequest("disk '\(text)': \(error)", field: "disk")
            }
            record(device, on: managed) { $0.disks.append(parsed) }
            return device
        }
        try start(device, on: managed, what: "disk '\(text)'", field: "disk") { $0.disks.removeAll { $0.device == parsed.device } }
        logger.info("disk attached", metadata: ["id": "\(id)", "vdev": "\(parsed.vdev)", "target": "\(parsed.target)"])
        return lock.withLock { info(locked: managed) }
    }

    /// `xl block-detach`: the frontend is asked to close the disk and given `timeout` seconds
    /// (then it is forced; 0 forces at once); the backend stops, the image is synced, and both
    /// sides' nodes are removed. Disks of the config and disks attached since alike.
    /// - Throws: 400 (bad vdev), 404 (no such disk, field `vdev`), 409 (not running).
    public func blockDetach(_ key: String, vdev: String, timeout: Double = detachTimeout) throws(APIError) -> (DomainInfo, Detach) {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "block-detach")
        guard let device = DomainSpec.Disk.deviceNumber(vdev) else {
            throw .badRequest("vdev '\(vdev)' is not a Xen disk name (xvda, xvdb, ... or a number)", field: "vdev")
        }
        return try detach(managed, key: "vbd/\(device)", timeout: timeout, what: "disk \(vdev)", field: "vdev") { spec in
            spec.disks.removeAll { $0.device == device }
        }
    }

    // MARK: Network interfaces

    /// `xl network-attach`: one more vif for the running domain, as an entry of xl.cfg's
    /// `vif` list. Its backend publishes its nodes and the frontend's (`device/vif/DEVID`)
    /// at once; a netfront watching `device/vif` connects as at boot. The vif joins the spec.
    /// - Throws: 400 (bad vif string, a TAP or bridge the host refuses; field `vif`), 404,
    ///   409 (not running, or the devid is in use).
    public func networkAttach(_ key: String, vif text: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "network-attach")
        var parsed: DomainSpec.Vif
        do { parsed = try DomainSpec.Vif.parse(text, source: "vif").vif } catch { throw .badRequest("\(error)", field: "vif") }
        let id = managed.record.id
        do { _ = try Self.network(parsed, domain: Int(id)) } catch { throw .badRequest("vif '\(text)': \(error.description)", field: "vif") }
        let device = try locked { () throws(APIError) -> AttachedDevice in
            guard managed.handle != nil, managed.devicesOpen else { throw .conflict("domain '\(managed.record.spec.name)' stopped") }
            let used = Set(managed.record.spec.vifs.compactMap(\.devid))
            if let devid = parsed.devid, used.contains(devid) {
                throw .conflict("domain '\(managed.record.spec.name)' has a vif with devid \(devid) already")
            }
            if parsed.devid == nil {
                guard let free = (0..<256).first(where: { !used.contains(UInt32($0)) }) else {
                    throw .conflict("domain '\(managed.record.spec.name)' has 256 vifs, the most")
                }
                parsed.devid = UInt32(free)
            }
            let device: AttachedDevice
            do { device = try vifDevice(parsed, domain: id, io: managed.io) } catch {
                throw .badRequest("vif '\(text)': \(error)", field: "vif")
            }
            record(device, on: managed) { $0.vifs.append(parsed) }
            return device
        }
        let devid = parsed.devid
        try start(device, on: managed, what: "vif '\(text)'", field: "vif") { $0.vifs.removeAll { $0.devid == devid } }
        logger.info("vif attached", metadata: ["id": "\(id)", "devid": "\(parsed.devid ?? 0)"])
        return lock.withLock { info(locked: managed) }
    }

    /// `xl network-detach DOMAIN DEVID|MAC`: as ``blockDetach(_:vdev:timeout:)`` for a vif,
    /// named by its devid or its MAC address. - Throws: 400 (neither a devid nor a MAC, field
    /// `device`), 404 (no such vif, field `device`), 409 (not running).
    public func networkDetach(_ key: String, device text: String, timeout: Double = detachTimeout) throws(APIError) -> (DomainInfo, Detach) {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "network-detach")
        let mac = EthernetAddress(parsing: text)
        guard UInt32(text) != nil || mac != nil else {
            throw .badRequest("device '\(text)': give a vif's devid (0, 1, ...) or its MAC address", field: "device")
        }
        let devid = try locked { () throws(APIError) -> UInt32 in
            let id = managed.record.id
            let match = managed.record.spec.vifs.first { vif in
                if let number = UInt32(text) { return vif.devid == number }
                return Self.mac(of: vif, domain: id) == mac
            }
            guard let devid = match?.devid else {
                throw .notFound("domain '\(managed.record.spec.name)' has no vif \(text)", field: "device")
            }
            return devid
        }
        return try detach(managed, key: "vif/\(devid)", timeout: timeout, what: "vif \(text)", field: "device") { spec in
            spec.vifs.removeAll { $0.devid == devid }
        }
    }

    /// The vif's MAC address: the config's, else the one netback generates.
    static func mac(of vif: DomainSpec.Vif, domain: UInt16) -> EthernetAddress {
        vif.mac.flatMap(EthernetAddress.init(parsing:)) ?? .generated(domain: domain, handle: vif.devid ?? 0)
    }
}

extension Daemon {
    /// Raises the soft limit on open descriptors to the hard limit: each live domain holds a
    /// few (its guest memory's memfd, console log, console-input pipe, its backends' wake pipes),
    /// so a thousand domains need more than the usual soft limit of 1024. Returns the new
    /// limit when it was raised.
    public static func raiseDescriptorLimit() -> UInt64? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return nil }
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        return UInt64(limit.rlim_cur)
    }
}
