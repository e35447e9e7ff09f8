import Foundation
import Glibc
import Logging
import VireoABI
import VireoBackends
import VireoHypervisor
import VireoMachine
import VireoStore
import VireoToolstack

/// `vireod`'s core: a registry of domains, each run on its own thread through one shared
/// ``EmbeddedHost`` (one XenStore, one grant-table set, one host domain), their lifecycle as
/// xl.cfg's `on_poweroff`/`on_reboot`/`on_crash` say, and the state directory that outlives
/// the daemon. The control API (``ControlAPI``) is a thin layer over these methods.
public final class Daemon: @unchecked Sendable {  // mutable state only under `lock`
    public struct Options: Sendable {
        public var stateDirectory: URL
        /// How long `shutdown` (and SIGTERM) waits for a guest to power off before destroying it.
        public var shutdownTimeout: Double
        /// Recent console output kept per domain, in bytes.
        public var consoleBufferBytes: Int
        /// The per-domain console log file stops growing here (a guest cannot fill the disk).
        public var consoleLogLimit: Int
        public var maxDomains: Int
        /// Host threads of the SoftCPU domains' credit scheduler (nil: the active cores).
        public var schedulerThreads: Int?
        public init(stateDirectory: URL, shutdownTimeout: Double = 30, consoleBufferBytes: Int = 64 << 10,
                    consoleLogLimit: Int = 4 << 20, maxDomains: Int = 1024, schedulerThreads: Int? = nil) {
            self.stateDirectory = stateDirectory
            self.shutdownTimeout = shutdownTimeout
            self.consoleBufferBytes = consoleBufferBytes
            self.consoleLogLimit = consoleLogLimit
            self.maxDomains = maxDomains
            self.schedulerThreads = schedulerThreads
        }
    }

    /// One domain the daemon holds. Fields are guarded by the daemon's lock.
    final class Managed: @unchecked Sendable {
        var record: DomainRecord
        let console: ConsoleBuffer
        var handle: DomainHandle?
        /// Counters of earlier runs (restarts) in this daemon.
        var pastExits = 0
        var pastHypercalls = 0
        var pastCPUNanoseconds: UInt64 = 0
        /// Bumped on each run: a shutdown timeout only destroys the run it was set for.
        var generation = 0
        /// The write end of the pipe whose read end feeds the console ring's input (this run).
        var consoleInput: Int32 = -1
        /// Disks attached to the running domain (`block-attach`), by device number.
        var hotplugged: [UInt32: (backend: BlockBackend, thread: Thread)] = [:]
        var threadDone = true
        init(record: DomainRecord, consoleBytes: Int) {
            self.record = record
            console = ConsoleBuffer(capacity: consoleBytes)
        }
    }

    public let options: Options
    public let host: EmbeddedHost
    /// The pool of host threads every SoftCPU domain of this daemon runs on (Docs/scheduling.md).
    public let scheduler: CreditScheduler
    let logger: Logger
    private let lock = NSLock()
    private var domains: [UInt16: Managed] = [:]
    private var nextID: UInt16 = 1
    private var stopping = false
    /// The consoles of domains just forgotten: (id, name, output, when), newest last, at most 32.
    private var recentlyGone: [(id: UInt16, name: String, console: ConsoleBuffer, at: Date)] = []
    private let toolstack: XenStoreConnection
    public let started = Date()
    /// The kernel images the domains keep for restarts, one copy per distinct image.
    let kernels = KernelImages()

    var domainsDirectory: URL { options.stateDirectory.appendingPathComponent("domains") }
    var consoleDirectory: URL { options.stateDirectory.appendingPathComponent("console") }

    /// Opens the state directory (creating it) and loads the records found there: a domain
    /// recorded as running or paused is now `lost`, since the process that ran it is gone.
    public init(options: Options, logger: Logger = Logger(label: "vireod")) throws {
        self.options = options
        self.logger = logger
        for directory in [options.stateDirectory, options.stateDirectory.appendingPathComponent("domains"),
                          options.stateDirectory.appendingPathComponent("console")] {
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        }
        host = try EmbeddedHost()
        scheduler = CreditScheduler(threads: options.schedulerThreads ?? CreditScheduler.activeCores)
        toolstack = host.store.connect(domain: host.host.id)
        try loadRecords()
    }

    private func loadRecords() throws {
        let files = try FileManager.default.contentsOfDirectory(at: domainsDirectory, includingPropertiesForKeys: nil)
            .filter { $0.pathExtension == "json" }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        for file in files.sorted(by: { $0.path < $1.path }) {
            guard let data = try? Data(contentsOf: file), var record = try? decoder.decode(DomainRecord.self, from: data) else {
                logger.error("unreadable domain record; left in place", metadata: ["file": "\(file.path)"])
                continue
            }
            if [.running, .paused, .creating].contains(record.state) {
                logger.warning("domain was running under a daemon that is gone: lost",
                               metadata: ["domain": "\(record.spec.name)", "id": "\(record.id)"])
                record.state = .lost
                record.failure = "the daemon that ran it stopped without shutting it down"
            }
            let managed = Managed(record: record, consoleBytes: options.consoleBufferBytes)
            // What the console log kept, so `vireo console` still shows the end of it.
            if let log = FileHandle(forReadingAtPath: consoleLogURL(name: record.spec.name).path) {
                let size = (try? log.seekToEnd()) ?? 0
                try? log.seek(toOffset: size - min(size, UInt64(options.consoleBufferBytes)))
                if let tail = try? log.readToEnd() { managed.console.append(Array(tail)) }
                try? log.close()
            }
            domains[record.id] = managed
            nextID = max(nextID, record.id &+ 1)
            persist(managed.record)
        }
    }

    // MARK: Records on disk

    private func recordURL(_ id: UInt16) -> URL { domainsDirectory.appendingPathComponent("\(id).json") }

    /// Writes a record atomically (a crash leaves the old or the new file, never half of one).
    private func persist(_ record: DomainRecord) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        do {
            try encoder.encode(record).write(to: recordURL(record.id), options: .atomic)
        } catch {
            logger.error("cannot write the domain record", metadata: ["id": "\(record.id)", "error": "\(error)"])
        }
    }

    private func unpersist(_ id: UInt16) {
        try? FileManager.default.removeItem(at: recordURL(id))
    }

    /// The console log of a domain: the state directory's `console/NAME.log`.
    public func consoleLogURL(name: String) -> URL { consoleDirectory.appendingPathComponent("\(name).log") }

    /// Runs `body` under the lock, passing its typed error on.
    private func locked<T>(_ body: () throws(APIError) -> T) throws(APIError) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    // MARK: Looking up

    /// A domain by ID (decimal) or name. - Throws: 404 naming it.
    func find(_ key: String) throws(APIError) -> Managed {
        try locked { () throws(APIError) -> Managed in
            if let id = UInt16(key), let managed = domains[id] { return managed }
            if let managed = domains.values.first(where: { $0.record.spec.name == key }) { return managed }
            throw APIError.notFound("no domain '\(key)'", field: "domain")
        }
    }

    public func list() -> [DomainInfo] {
        lock.withLock { domains.keys.sorted().compactMap { domains[$0].map(info(locked:)) } }
    }

    public func info(_ key: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        return lock.withLock { info(locked: managed) }
    }

    private func info(locked managed: Managed) -> DomainInfo {
        let record = managed.record, spec = record.spec
        let cpu = managed.pastCPUNanoseconds &+ (managed.handle?.cpuTimeNanoseconds ?? 0)
        return DomainInfo(id: record.id, name: spec.name, state: record.state, memoryMiB: spec.memoryMiB, vcpus: spec.vcpus,
                          kernel: spec.kernel, cmdline: spec.cmdline, configFile: record.configFile, created: record.created,
                          cpuSeconds: Double(cpu) / 1e9, exits: managed.pastExits + (managed.handle?.exits ?? 0),
                          hypercalls: managed.pastHypercalls + (managed.handle?.hypercalls ?? 0),
                          consoleBytes: managed.console.endOffset, restarts: record.restarts,
                          lastShutdown: record.lastShutdown, failure: record.failure,
                          onPoweroff: spec.onPoweroff.rawValue, onReboot: spec.onReboot.rawValue, onCrash: spec.onCrash.rawValue,
                          disks: spec.disks.map { .init(vdev: $0.vdev, target: $0.target, access: $0.readOnly ? "ro" : "rw") })
    }

    // MARK: Creating

    /// A config's vifs as the embedded host's networks: `switch=NAME` a port of that in-process
    /// switch, else a TAP named `vifname=` or, as xl names it, `vifDOMID.HANDLE`; `mac=` and
    /// `rate=` as given.
    static func networks(_ vifs: [DomainSpec.Vif], domain: Int) throws(BackendError) -> [NetworkSpec] {
        var networks: [NetworkSpec] = []
        for (handle, vif) in vifs.enumerated() {
            var text = vif.switchName.map { "switch:\($0)" } ?? "tap:\(vif.vifname ?? "vif\(domain).\(handle)")"
            if let mac = vif.mac { text += ",mac=\(mac)" }
            if let rate = vif.rate { text += ",rate=\(rate)" }
            networks.append(try NetworkSpec(parsing: text))
        }
        return networks
    }

    /// Creates and starts a domain from an xl.cfg file's text; returns once its guest runs
    /// (or the build failed, which removes it again and is the error).
    /// - Throws: 400 naming the file, line and column or the bad key; 409 for a name in use;
    ///   503 when no engine can run it or the daemon is stopping.
    public func create(config: String, file: String?) throws(APIError) -> (DomainInfo, [String]) {
        let fileName = file ?? "<request>"
        let parsed: (spec: DomainSpec, warnings: [ConfigWarning])
        do { parsed = try DomainSpec.parse(config, file: fileName) } catch { throw .badRequest("\(error)", field: "config") }
        var spec = parsed.spec
        var warnings = parsed.warnings.map(\.description)
        // Relative paths in the file are relative to the file, as the operator wrote them there.
        let base = file.flatMap { $0.hasPrefix("/") ? URL(fileURLWithPath: $0).deletingLastPathComponent() : nil }
        func resolve(_ path: String) -> String {
            guard !path.hasPrefix("/"), let base else { return path }
            return base.appendingPathComponent(path).standardizedFileURL.path
        }
        spec.kernel = resolve(spec.kernel)
        for index in spec.disks.indices { spec.disks[index].target = resolve(spec.disks[index].target) }
        guard (2...65536).contains(spec.memoryMiB) else {
            throw .badRequest("\(fileName): memory = \(spec.memoryMiB): give 2 to 65536 MiB", field: "memory")
        }
        guard (1...128).contains(spec.vcpus) else { throw .badRequest("\(fileName): vcpus = \(spec.vcpus): give 1 to 128", field: "vcpus") }
        guard spec.name.utf8.count <= 64, !spec.name.contains("/"), UInt16(spec.name) == nil else {
            throw .badRequest("\(fileName): name '\(spec.name)': at most 64 bytes, no '/', not a number", field: "name")
        }
        if spec.engine == .kvm {
            guard access("/dev/kvm", R_OK | W_OK) == 0 else {
                throw APIError(503, "\(fileName): engine = \"kvm\", but /dev/kvm is not usable here (use soft or auto)")
            }
        }
        guard let kernel = FileManager.default.contents(atPath: spec.kernel) else {
            throw .badRequest("\(fileName): kernel: cannot read '\(spec.kernel)'", field: "kernel")
        }
        for disk in spec.disks {
            var info = stat()
            guard stat(disk.target, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
                throw .badRequest("\(fileName): disk '\(disk.vdev)': '\(disk.target)' is not a readable image file", field: "disk")
            }
        }
        do { _ = try Self.networks(spec.vifs, domain: 1) } catch {
            throw .badRequest("\(fileName): vif: \(error.description)", field: "vif")
        }
        for vif in spec.vifs where vif.bridge != nil {
            warnings.append("\(fileName): vif: bridge=\(vif.bridge ?? "") is not applied by vireod yet: the vif gets its TAP; "
                            + "add it to the bridge yourself (ip link set TAP master BRIDGE)")
        }
        let managed: Managed = try locked { () throws(APIError) -> Managed in
            guard !stopping else { throw APIError(503, "vireod is stopping") }
            if let other = domains.values.first(where: { $0.record.spec.name == spec.name }) {
                throw .conflict("a domain named '\(spec.name)' exists (id \(other.record.id), \(other.record.state.rawValue))")
            }
            guard domains.count < options.maxDomains else { throw .conflict("vireod holds \(options.maxDomains) domains, its limit") }
            let id = try allocateID()
            let record = DomainRecord(id: id, spec: spec, configFile: fileName, state: .creating, created: Date(),
                                      lastShutdown: nil, failure: nil, restarts: 0)
            let managed = Managed(record: record, consoleBytes: options.consoleBufferBytes)
            managed.threadDone = false
            domains[id] = managed
            persist(record)
            return managed
        }
        logger.info("creating domain", metadata: ["domain": "\(spec.name)", "id": "\(managed.record.id)", "file": "\(fileName)"])
        let firstRun = FirstRun()
        let image = kernels.share(Array(kernel))  // one copy for every domain of the same image
        let thread = Thread { [self] in lifecycle(managed, kernel: image, firstRun: firstRun) }
        thread.name = "vireod-dom\(managed.record.id)"
        thread.start()
        if let failure = firstRun.wait() {
            throw .badRequest("\(fileName): cannot start domain '\(spec.name)': \(failure)")
        }
        return (lock.withLock { info(locked: managed) }, warnings)
    }

    /// Lowest free ID from `nextID` on, wrapping before Xen's reserved IDs. Under the lock.
    private func allocateID() throws(APIError) -> UInt16 {
        let limit = DomainID.firstReserved.rawValue
        for _ in 1..<limit {
            let id = nextID
            nextID = nextID &+ 1 >= limit ? 1 : nextID &+ 1
            if domains[id] == nil { return id }
        }
        throw .conflict("no domain ID is free")
    }

    /// The first run's start (nil) or its failure, told to `create`.
    final class FirstRun: @unchecked Sendable {
        private let condition = NSCondition()
        private var result: String??
        func report(_ failure: String?) {
            condition.withLock {
                if result == nil { result = .some(failure) }
                condition.broadcast()
            }
        }
        func wait() -> String? {
            condition.withLock {
                while result == nil { condition.wait() }
                return result!
            }
        }
    }

    // MARK: The lifecycle thread

    /// Runs the domain until it is gone or kept stopped: each run on the shared host, then
    /// its on_* action (destroy: forget; restart: run again; preserve: keep the record).
    private func lifecycle(_ managed: Managed, kernel image: KernelImage, firstRun: FirstRun) {
        let kernel = image.bytes
        let id = managed.record.id
        var recentRestarts: [Date] = []
        var first = true
        let logFD = openConsoleLog(name: managed.record.spec.name)
        defer { if logFD >= 0 { close(logFD) } }
        let logLimit = options.consoleLogLimit
        final class Count: @unchecked Sendable { var value = 0 }  // under logLock
        let logged = Count()
        while true {
            let handle = DomainHandle()
            let spec: DomainSpec = lock.withLock {
                managed.handle = handle
                managed.generation += 1
                return managed.record.spec
            }
            let console = managed.console
            let logLock = NSLock()
            // Console input: what the API is given goes down this pipe into the ring's `in`
            // side; non-blocking, so a guest that does not read cannot hold a request.
            var input: [Int32] = [-1, -1]
            if pipe(&input) == 0 {
                for fd in input { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
                _ = fcntl(input[1], F_SETFL, fcntl(input[1], F_GETFL) | O_NONBLOCK)
                lock.withLock { managed.consoleInput = input[1] }
            }
            let watcher = Thread { [self] in
                // The run is "started" once its vCPUs exist (however briefly: a guest may die at
                // once); tell create, then record it.
                while !handle.hasStarted {
                    if lock.withLock({ managed.handle !== handle }) { return }
                    usleep(500)
                }
                lock.withLock {
                    guard managed.handle === handle else { return }
                    managed.record.state = .running
                    persist(managed.record)
                }
                firstRun.report(nil)
            }
            watcher.start()
            let outcome: EmbeddedHost.Outcome
            do {
                outcome = try host.run(
                    config: DomainConfig(id: DomainID(id), name: spec.name, memoryBytes: UInt64(spec.memoryMiB) << 20, vcpus: spec.vcpus),
                    kernel: kernel, commandLine: spec.cmdline,
                    disks: spec.disks.map { EmbeddedHost.Disk(path: $0.target, readOnly: $0.readOnly, device: $0.device) },
                    networks: try Self.networks(spec.vifs, domain: Int(id)),
                    consoleInput: input[0] >= 0 ? input[0] : nil,
                    engine: spec.engine == .kvm ? .kvm : spec.engine == .soft ? .soft : ExecutionEngine.automatic, handle: handle,
                    scheduler: scheduler, credit: CreditParameters(weight: spec.cpuWeight ?? CreditScheduler.defaultWeight, cap: spec.cap ?? 0),
                    console: { bytes in
                        console.append(bytes)
                        guard logFD >= 0 else { return }
                        logLock.withLock {
                            let room = max(0, logLimit - logged.value)
                            let part = bytes.prefix(room)
                            if !part.isEmpty { part.withUnsafeBytes { _ = write(logFD, $0.baseAddress, $0.count) } }
                            logged.value += part.count
                        }
                    })
            } catch {
                let failure = "\(error)"
                closeInput(managed, input)
                lock.withLock { managed.handle = nil }
                while !watcher.isFinished { usleep(500) }
                if first {
                    logger.error("domain failed to start", metadata: ["id": "\(id)", "error": "\(failure)"])
                    lock.withLock {
                        domains[id] = nil
                        managed.threadDone = true
                    }
                    unpersist(id)
                    firstRun.report(failure)
                    return
                }
                finish(managed, state: .crashed, reason: "restart failed", failure: failure)
                return
            }
            while !watcher.isFinished { usleep(500) }
            closeInput(managed, input)
            first = false
            firstRun.report(nil)
            stopHotplugged(managed)
            flushDisks(lock.withLock { managed.record.spec })
            let destroyed = handle.destroyRequested
            let (stopping, generation) = lock.withLock { () -> (Bool, Int) in
                managed.pastExits += handle.exits
                managed.pastHypercalls += handle.hypercalls
                managed.pastCPUNanoseconds &+= handle.cpuTimeNanoseconds
                managed.handle = nil
                return (self.stopping, managed.generation)
            }
            _ = generation
            let reason = destroyed ? "destroyed" : "\(outcome.reason)"
            logger.info("domain stopped", metadata: ["id": "\(id)", "reason": "\(reason)",
                                                     "failure": "\(outcome.failure ?? "")"])
            if stopping {
                // Stopped with the daemon: kept, so the next daemon shows it (never forgotten).
                finish(managed, state: .shutdown, reason: reason, failure: "stopped with vireod")
                return
            }
            if destroyed {
                forget(managed)
                return
            }
            let action: DomainSpec.Action
            switch outcome.reason {
            case .poweroff: action = spec.onPoweroff
            case .reboot: action = spec.onReboot
            case .crash: action = spec.onCrash
            default: action = spec.onPoweroff
            }
            switch action {
            case .destroy, .coredumpDestroy:
                forget(managed)
                return
            case .preserve:
                finish(managed, state: outcome.reason == .crash ? .crashed : .shutdown, reason: reason, failure: outcome.failure)
                return
            case .restart, .renameRestart, .coredumpRestart, .softReset:
                // A guest that dies at once forever would spin: at most 10 restarts a minute.
                let now = Date()
                recentRestarts = recentRestarts.filter { now.timeIntervalSince($0) < 60 } + [now]
                if recentRestarts.count > 10 {
                    finish(managed, state: .crashed, reason: reason, failure: "restarted more than 10 times in a minute; stopped")
                    return
                }
                lock.withLock {
                    managed.record.restarts += 1
                    managed.record.lastShutdown = reason
                    managed.record.failure = outcome.failure
                    managed.record.state = .creating
                    persist(managed.record)
                }
                logger.info("restarting domain", metadata: ["id": "\(id)", "reason": "\(reason)"])
            }
        }
    }

    /// After a run (its input thread has ended): both ends of its console-input pipe closed.
    private func closeInput(_ managed: Managed, _ input: [Int32]) {
        lock.withLock { managed.consoleInput = -1 }
        for fd in input where fd >= 0 { close(fd) }
    }

    private func finish(_ managed: Managed, state: DomainState, reason: String, failure: String?) {
        lock.withLock {
            managed.record.state = state
            managed.record.lastShutdown = reason
            managed.record.failure = failure
            managed.threadDone = true
            persist(managed.record)
        }
    }

    private func forget(_ managed: Managed) {
        let id = managed.record.id
        lock.withLock {
            managed.threadDone = true
            if domains[id] === managed { domains[id] = nil }
            keepConsole(locked: managed)
        }
        unpersist(id)
        logger.info("domain gone", metadata: ["id": "\(id)", "domain": "\(managed.record.spec.name)"])
    }

    /// Keeps a forgotten domain's console readable for a minute. Under the lock.
    private func keepConsole(locked managed: Managed) {
        let now = Date()
        recentlyGone.removeAll { now.timeIntervalSince($0.at) > 60 || $0.id == managed.record.id }
        recentlyGone.append((managed.record.id, managed.record.spec.name, managed.console, now))
        if recentlyGone.count > 32 { recentlyGone.removeFirst(recentlyGone.count - 32) }
    }

    private func openConsoleLog(name: String) -> Int32 {
        let fd = open(consoleLogURL(name: name).path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o640)
        if fd < 0 { logger.warning("cannot open the console log", metadata: ["domain": "\(name)"]) }
        return fd
    }

    /// After a run: every writable disk image is synced to stable storage (fdatasync through a
    /// descriptor of our own flushes the file's dirty pages, whoever wrote them).
    private func flushDisks(_ spec: DomainSpec) {
        for disk in spec.disks where !disk.readOnly {
            let fd = open(disk.target, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            if fdatasync(fd) != 0 { logger.error("fdatasync failed", metadata: ["disk": "\(disk.target)"]) }
            close(fd)
        }
    }

    // MARK: Operations

    private func requireRunning(_ managed: Managed, for verb: String) throws(APIError) -> DomainHandle {
        try locked { () throws(APIError) -> DomainHandle in
            guard !stopping else { throw APIError(503, "vireod is stopping") }
            guard [.running, .paused].contains(managed.record.state), let handle = managed.handle else {
                throw .conflict("domain '\(managed.record.spec.name)' is \(managed.record.state.rawValue); \(verb) needs it running")
            }
            return handle
        }
    }

    /// Writes `control/shutdown` in the guest's XenStore home, as xl does; the guest's own
    /// watch sees it. - Throws: 500 when the store refuses.
    private func request(_ managed: Managed, _ value: String) throws(APIError) {
        let path = "/local/domain/\(managed.record.id)/control/shutdown"
        let reply = host.store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: toolstack)
        guard reply?.type == .write else { throw APIError(500, "the XenStore refused \(path): \(reply?.error.map { "\($0)" } ?? "no reply")") }
    }

    /// Asks the guest to power off; destroys it if it has not stopped after `timeout` seconds.
    public func shutdown(_ key: String, timeout: Double? = nil) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        let handle = try requireRunning(managed, for: "shutdown")
        handle.unpause()
        lock.withLock { if managed.record.state == .paused { managed.record.state = .running } }
        try request(managed, "poweroff")
        let wait = timeout ?? options.shutdownTimeout
        DispatchQueue.global().asyncAfter(deadline: .now() + wait) { [self] in
            if lock.withLock({ managed.handle === handle }) {
                logger.warning("domain did not shut down in time: destroyed", metadata: ["id": "\(managed.record.id)"])
                handle.destroy()
            }
        }
        logger.info("shutdown requested", metadata: ["id": "\(managed.record.id)"])
        return lock.withLock { info(locked: managed) }
    }

    /// Asks the guest to reboot (`control/shutdown` = "reboot"); what follows is its on_reboot.
    public func reboot(_ key: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        let handle = try requireRunning(managed, for: "reboot")
        handle.unpause()
        lock.withLock { if managed.record.state == .paused { managed.record.state = .running } }
        try request(managed, "reboot")
        logger.info("reboot requested", metadata: ["id": "\(managed.record.id)"])
        return lock.withLock { info(locked: managed) }
    }

    /// The domain's weight and cap (`xl sched-credit -d`): those in force while it runs, else
    /// those its next run gets.
    public func schedCredit(_ key: String) throws(APIError) -> SchedCredit {
        let managed = try find(key)
        return lock.withLock { schedCredit(locked: managed) }
    }

    private func schedCredit(locked managed: Managed) -> SchedCredit {
        let spec = managed.record.spec
        let credit = managed.handle?.creditParameters
            ?? CreditParameters(weight: spec.cpuWeight ?? CreditScheduler.defaultWeight, cap: spec.cap ?? 0)
        return SchedCredit(id: managed.record.id, name: spec.name, weight: credit.weight, cap: credit.cap)
    }

    /// Sets the weight and/or cap (`xl sched-credit -d D -w W -c C`): at once on a running
    /// SoftCPU domain, and recorded for its later runs.
    /// - Throws: 400 naming `weight` or `cap` when out of range; 409 naming the field when the
    ///   domain's engine cannot apply it (KVM).
    public func setSchedCredit(_ key: String, weight: Int?, cap: Int?) throws(APIError) -> SchedCredit {
        let managed = try find(key)
        if let weight, !CreditScheduler.weights.contains(weight) {
            throw .badRequest("weight \(weight): give 1 to 65535", field: "weight")
        }
        if let cap, !CreditScheduler.caps.contains(cap) {
            throw .badRequest("cap \(cap): give 0 (none) to 12800 percent of one CPU", field: "cap")
        }
        return try locked { () throws(APIError) -> SchedCredit in
            if let handle = managed.handle {
                do throws(CreditError) {
                    try handle.setCredit(weight: weight, cap: cap)
                } catch {
                    // The engine refused (KVM): name the field that asked for what it cannot do.
                    let field = switch error {
                    case .weight: "weight"
                    case .cap: "cap"
                    case .unsupported: cap != nil && cap != 0 ? "cap" : "weight"
                    }
                    throw APIError(409, "domain '\(managed.record.spec.name)': \(error)", field: field)
                }
            }
            if let weight { managed.record.spec.cpuWeight = weight }
            if let cap { managed.record.spec.cap = cap }
            persist(managed.record)
            return schedCredit(locked: managed)
        }
    }

    public func pause(_ key: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "pause")
        return try setPaused(managed, true)
    }

    public func unpause(_ key: String) throws(APIError) -> DomainInfo {
        try setPaused(try find(key), false)
    }

    /// Pauses a running domain or unpauses a paused one, and records it. - Throws: 409 when it
    /// is not in the state the change starts from.
    private func setPaused(_ managed: Managed, _ paused: Bool) throws(APIError) -> DomainInfo {
        let from: DomainState = paused ? .running : .paused
        return try locked { () throws(APIError) -> DomainInfo in
            guard managed.record.state == from, let handle = managed.handle else {
                throw .conflict("domain '\(managed.record.spec.name)' is \(managed.record.state.rawValue), not \(from.rawValue)")
            }
            if paused { handle.pause() } else { handle.unpause() }
            managed.record.state = paused ? .paused : .running
            persist(managed.record)
            return info(locked: managed)
        }
    }

    /// Ends a domain now and forgets it; a kept record (shut down, crashed, lost) is removed.
    /// - Throws: 409 while it is being created.
    public func destroy(_ key: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        let (handle, snapshot) = try locked { () throws(APIError) -> (DomainHandle?, DomainInfo) in
            if managed.record.state == .creating { throw .conflict("domain '\(managed.record.spec.name)' is being created") }
            return (managed.handle, info(locked: managed))
        }
        if let handle {
            handle.destroy()
            // Its thread forgets it once the vCPUs and backends have stopped.
            let deadline = Date().addingTimeInterval(20)
            while !lock.withLock({ managed.threadDone }) && Date() < deadline { usleep(1000) }
            guard lock.withLock({ managed.threadDone }) else { throw APIError(500, "domain \(snapshot.id) did not stop within 20 s") }
        }
        lock.withLock {
            if domains[managed.record.id] === managed { domains[managed.record.id] = nil }
            keepConsole(locked: managed)
        }
        unpersist(managed.record.id)
        logger.info("domain destroyed", metadata: ["id": "\(snapshot.id)", "domain": "\(snapshot.name)"])
        var gone = snapshot
        gone.lastShutdown = "destroyed"
        return gone
    }

    /// Recent console output from `offset` on (nil: all that is kept).
    public func console(_ key: String, offset: UInt64?) throws(APIError) -> ConsoleChunk {
        let buffer: ConsoleBuffer, state: DomainState
        do {
            let managed = try find(key)
            buffer = managed.console
            state = lock.withLock { managed.record.state }
        } catch {
            let now = Date()
            guard let gone = lock.withLock({
                recentlyGone.last { now.timeIntervalSince($0.at) <= 60 && ("\($0.id)" == key || $0.name == key) }
            }) else { throw error }
            buffer = gone.console
            state = .destroyed
        }
        let (bytes, next, missed) = buffer.read(from: offset)
        return ConsoleChunk(data: String(decoding: bytes, as: UTF8.self), next: next, missed: missed, state: state)
    }

    // MARK: Disks attached while running

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
        let id = DomainID(managed.record.id)
        let backend: BlockBackend = try locked { () throws(APIError) -> BlockBackend in
            guard managed.handle != nil else { throw .conflict("domain '\(managed.record.spec.name)' stopped") }
            if let other = managed.record.spec.disks.first(where: { $0.device == parsed.device }) {
                throw .conflict("domain '\(managed.record.spec.name)' has a disk on \(other.vdev) already (\(other.target))")
            }
            do {
                return try BlockBackend(path: parsed.target, readOnly: parsed.readOnly, frontend: id, device: parsed.device,
                                        store: host.store, grants: host.grants, host: host.host)
            } catch {
                throw .badRequest("disk '\(text)': \(error)", field: "disk")
            }
        }
        do { try backend.create() } catch { throw APIError(500, "disk '\(text)': cannot publish its XenStore nodes: \(error)") }
        let thread = Thread { backend.run() }
        thread.name = "vireod-vbd\(id.rawValue)-\(parsed.device)"
        thread.start()
        logger.info("disk attached", metadata: ["id": "\(id.rawValue)", "vdev": "\(parsed.vdev)", "target": "\(parsed.target)"])
        return lock.withLock {
            managed.hotplugged[parsed.device] = (backend, thread)
            managed.record.spec.disks.append(parsed)
            persist(managed.record)
            return info(locked: managed)
        }
    }

    /// `xl block-detach` (forced): stops the disk's backend, syncs the image and removes the
    /// backend's and the frontend's nodes. Only disks attached with ``blockAttach`` can go.
    public func blockDetach(_ key: String, vdev: String) throws(APIError) -> DomainInfo {
        let managed = try find(key)
        _ = try requireRunning(managed, for: "block-detach")
        guard let device = DomainSpec.Disk.deviceNumber(vdev) else {
            throw .badRequest("vdev '\(vdev)' is not a Xen disk name (xvda, xvdb, ... or a number)", field: "vdev")
        }
        let (attached, disk) = try locked { () throws(APIError) -> ((backend: BlockBackend, thread: Thread), DomainSpec.Disk) in
            guard let disk = managed.record.spec.disks.first(where: { $0.device == device }) else {
                throw .notFound("domain '\(managed.record.spec.name)' has no disk \(vdev)", field: "vdev")
            }
            guard let attached = managed.hotplugged.removeValue(forKey: device) else {
                throw .conflict("\(vdev) was attached at create; only disks attached with block-attach can be detached yet")
            }
            return (attached, disk)
        }
        attached.backend.stop()
        while !attached.thread.isFinished { usleep(1000) }
        flushDisks(DomainSpec(name: "", kernel: "", disks: [disk]))
        removeDeviceNodes(domain: managed.record.id, device: device)
        logger.info("disk detached", metadata: ["id": "\(managed.record.id)", "vdev": "\(vdev)"])
        return lock.withLock {
            managed.record.spec.disks.removeAll { $0.device == device }
            persist(managed.record)
            return info(locked: managed)
        }
    }

    /// After a run: the disks attached while it ran stop with it (they stay in the spec).
    private func stopHotplugged(_ managed: Managed) {
        let attached = lock.withLock { () -> [UInt32: (backend: BlockBackend, thread: Thread)] in
            defer { managed.hotplugged = [:] }
            return managed.hotplugged
        }
        for (_, entry) in attached { entry.backend.stop() }
        for (device, entry) in attached {
            while !entry.thread.isFinished { usleep(1000) }
            removeDeviceNodes(domain: managed.record.id, device: device)
        }
    }

    private func removeDeviceNodes(domain: UInt16, device: UInt32) {
        for path in ["/local/domain/\(host.host.id.rawValue)/backend/vbd/\(domain)/\(device)", "/local/domain/\(domain)/device/vbd/\(device)"] {
            _ = host.store.request(XenStoreMessage(.rm, path), from: toolstack)
        }
    }

    /// Sends bytes to the guest's console input (the ring's `in` side, as `vireo run` forwards
    /// stdin). Returns how many were taken: the pipe holds 64 KiB until the guest reads.
    /// - Throws: 409 unless running; 400 for more than 64 KiB at once.
    public func consoleWrite(_ key: String, _ bytes: [UInt8]) throws(APIError) -> Int {
        guard bytes.count <= 65536 else { throw .badRequest("input: at most 65536 bytes at once", field: "input") }
        let managed = try find(key)
        _ = try requireRunning(managed, for: "console input")
        return try locked { () throws(APIError) -> Int in
            guard managed.consoleInput >= 0 else { throw .conflict("domain '\(managed.record.spec.name)' has no console input") }
            if bytes.isEmpty { return 0 }
            let n = bytes.withUnsafeBytes { write(managed.consoleInput, $0.baseAddress, $0.count) }
            if n < 0 && errno == EAGAIN { return 0 }
            guard n >= 0 else { throw APIError(500, "console input: \(String(cString: strerror(errno)))") }
            return n
        }
    }

    // MARK: The XenStore

    public func storeRead(path: String) throws(APIError) -> StoreNode {
        guard path.hasPrefix("/") else { throw .badRequest("path '\(path)': give an absolute XenStore path", field: "path") }
        let read = host.store.request(XenStoreMessage(.read, path), from: toolstack)
        let directory = host.store.request(XenStoreMessage(.directory, path), from: toolstack)
        if let error = read?.error, error == .ENOENT || error == .EISDIR {
            if let listError = directory?.error { throw Self.storeError(listError, path) }
        } else if let error = read?.error {
            throw Self.storeError(error, path)
        }
        let value = read?.error == nil ? read?.text : nil
        let children = directory?.error == nil ? directory?.strings : nil
        return StoreNode(path: path, value: value, children: children)
    }

    public func storeWrite(path: String, value: String) throws(APIError) -> StoreNode {
        guard path.hasPrefix("/") else { throw .badRequest("path '\(path)': give an absolute XenStore path", field: "path") }
        let reply = host.store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: toolstack)
        if let error = reply?.error { throw Self.storeError(error, path) }
        return StoreNode(path: path, value: value, children: nil)
    }

    static func storeError(_ error: XenStoreError, _ path: String) -> APIError {
        switch error {
        case .ENOENT: .notFound("XenStore: no node '\(path)'", field: "path")
        case .EACCES: APIError(403, "XenStore: permission denied on '\(path)'", field: "path")
        case .EINVAL: .badRequest("XenStore: '\(path)' is not a valid path (or the value is too long)", field: "path")
        case .ENOSPC, .ENOMEM: APIError(507, "XenStore: quota reached writing '\(path)'", field: "path")
        default: APIError(500, "XenStore: \(error) on '\(path)'", field: "path")
        }
    }

    // MARK: Metrics

    /// Prometheus text exposition format (version 0.0.4).
    public func metrics() -> String {
        let all = list()
        var out = ""
        func family(_ name: String, _ type: String, _ help: String, _ rows: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, value) in rows { out += "\(name)\(labels) \(value)\n" }
        }
        func labels(_ d: DomainInfo) -> String { "{id=\"\(d.id)\",domain=\"\(Self.escapeLabel(d.name))\"}" }
        family("vireo_domains", "gauge", "Domains vireod holds, by state.",
               DomainState.allCases.filter { $0 != .destroyed }.map { state in ("{state=\"\(state.rawValue)\"}", "\(all.filter { $0.state == state }.count)") })
        family("vireo_domain_cpu_seconds_total", "counter", "Host CPU time of the domain's vCPU threads.",
               all.map { (labels($0), String(format: "%.6f", $0.cpuSeconds)) })
        family("vireo_domain_exits_total", "counter", "KVM exits taken by the domain's vCPUs.", all.map { (labels($0), "\($0.exits)") })
        family("vireo_domain_hypercalls_total", "counter", "Hypercalls the domain made.", all.map { (labels($0), "\($0.hypercalls)") })
        family("vireo_domain_console_bytes_total", "counter", "Console bytes the domain wrote.", all.map { (labels($0), "\($0.consoleBytes)") })
        family("vireo_domain_restarts_total", "counter", "Times the domain was restarted by its on_* actions.",
               all.map { (labels($0), "\($0.restarts)") })
        family("vireo_domain_memory_bytes", "gauge", "Guest memory.", all.map { (labels($0), "\(UInt64($0.memoryMiB) << 20)") })
        family("vireod_uptime_seconds", "gauge", "Seconds since vireod started.", [("", String(format: "%.3f", Date().timeIntervalSince(started)))])
        return out
    }

    static func escapeLabel(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }

    // MARK: Stopping

    /// SIGTERM: asks every running guest to power off, destroys those still running after the
    /// shutdown timeout, waits for their disks to be flushed and records each as shut down.
    public func stop() {
        let running: [(Managed, DomainHandle)] = lock.withLock {
            stopping = true
            return domains.values.compactMap { m in m.handle.map { (m, $0) } }
        }
        logger.info("stopping", metadata: ["running": "\(running.count)"])
        for (managed, handle) in running {
            handle.unpause()
            try? request(managed, "poweroff")
        }
        let deadline = Date().addingTimeInterval(options.shutdownTimeout)
        func allDone() -> Bool { lock.withLock { running.allSatisfy { $0.0.threadDone } } }
        while !allDone() && Date() < deadline { usleep(5000) }
        for (managed, handle) in running where !lock.withLock({ managed.threadDone }) {
            logger.warning("domain did not shut down in time: destroyed", metadata: ["id": "\(managed.record.id)"])
            handle.destroy()
        }
        let hard = Date().addingTimeInterval(20)
        while !allDone() && Date() < hard { usleep(5000) }
        host.store.disconnect(toolstack)
        host.shutdown()
        scheduler.shutdown()
        logger.info("stopped")
    }
}
