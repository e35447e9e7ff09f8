import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoLinux

/// The host's cgroup cpu controller, through which a KVM domain's weight and cap are applied: a
/// KVM vCPU is a host thread, so the host kernel's scheduler shares out its CPU, and a cgroup per
/// domain holding its vCPU threads is how a weight and a cap reach that scheduler
/// (Docs/scheduling.md, "KVM domains").
///
/// - cgroup v2: the unified hierarchy, when "cpu" is in `cgroup.controllers` of the cgroup this
///   process is in (its *home*). Each domain gets a threaded child `vireo-<pid>-dom<ID>` of the
///   home with `cpu.max` and `cpu.weight`; threads move in and out through `cgroup.threads`.
/// - cgroup v1: a hierarchy mounted with the `cpu` controller (`/sys/fs/cgroup/cpu` on most
///   hosts). Each domain gets `vireo-<pid>/dom<ID>` under the home with `cpu.cfs_period_us`,
///   `cpu.cfs_quota_us` and `cpu.shares`; threads move through `tasks`.
public struct HostCPUController: Sendable, Equatable {
    public enum Version: Sendable, Equatable { case v1, v2 }

    public let version: Version
    /// The directory of the cgroup this process is in, where vCPU threads come from and go back to.
    public let home: String

    public init(version: Version, home: String) {
        self.version = version
        self.home = home
    }

    /// The directory a domain's vCPU threads go in.
    public func directory(for domain: DomainID) -> String {
        switch version {
        case .v2: "\(home)/vireo-\(getpid())-dom\(domain.rawValue)"
        case .v1: "\(processDirectory)/dom\(domain.rawValue)"
        }
    }

    /// cgroup v1: the directory holding this process's domain cgroups (removed with the last).
    var processDirectory: String { "\(home)/vireo-\(getpid())" }

    /// The file a thread ID is written to, to move the thread into a cgroup.
    var threadsFile: String { version == .v2 ? "cgroup.threads" : "tasks" }

    // MARK: The mapping (Xen's credit parameters to the controller's files)

    /// The CFS period both versions use: 100 ms, the kernel's default.
    public static let periodMicroseconds = 100_000

    /// v1 `cpu.shares`: Xen's default weight 256 is v1's default 1024, so weight × 4 (4...262140
    /// for 1...65535, inside v1's 2...262144).
    public static func v1Shares(weight: Int) -> Int { weight * 4 }

    /// v2 `cpu.weight`: Xen's default 256 is v2's default 100, so weight × 100 / 256, rounded and
    /// clamped to v2's 1...10000 (weights above 25,600 all become 10000).
    public static func v2Weight(weight: Int) -> Int { min(10000, max(1, (weight * 100 + 128) / 256)) }

    /// The CPU time per period a cap allows, in microseconds (cap is percent of one CPU), or nil
    /// for no cap (cap 0): v1 `cpu.cfs_quota_us` (-1 for none), v2 the first field of `cpu.max`.
    public static func quotaMicroseconds(cap: Int) -> Int? { cap == 0 ? nil : cap * periodMicroseconds / 100 }

    /// The files and values that give a domain `weight` and `cap`, in the order they are written.
    public func settings(weight: Int, cap: Int) -> [(file: String, value: String)] {
        let quota = Self.quotaMicroseconds(cap: cap)
        switch version {
        case .v2:
            return [("cpu.max", "\(quota.map(String.init) ?? "max") \(Self.periodMicroseconds)"),
                    ("cpu.weight", "\(Self.v2Weight(weight: weight))")]
        case .v1:
            // The period first: a quota is checked against the period in force.
            return [("cpu.cfs_period_us", "\(Self.periodMicroseconds)"),
                    ("cpu.cfs_quota_us", "\(quota ?? -1)"),
                    ("cpu.shares", "\(Self.v1Shares(weight: weight))")]
        }
    }

    // MARK: Finding it

    /// The cpu controller this process can use: cgroup v2's when its cgroup has one, else a
    /// cgroup v1 cpu hierarchy; the home must be writable (root, or a delegated cgroup).
    /// - Throws: ``CreditError/unsupported(_:)`` naming why neither can be used.
    public static func find() throws(CreditError) -> HostCPUController {
        try find(mountinfo: (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? "",
                 cgroups: (try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8)) ?? "")
    }

    /// ``find()`` given the text of /proc/self/mountinfo and /proc/self/cgroup.
    static func find(mountinfo mounts: String, cgroups memberships: String) throws(CreditError) -> HostCPUController {
        var why: [String] = []
        // cgroup v2
        if let mount = cgroupMounts(mounts).first(where: { $0.type == "cgroup2" })?.point,
           let path = membership(memberships, where: { $0.hierarchy == "0" }) {
            let home = join(mount, path)
            let controllers = ((try? String(contentsOfFile: "\(home)/cgroup.controllers", encoding: .utf8)) ?? "")
                .split(whereSeparator: \.isWhitespace)
            if !controllers.contains("cpu") {
                why.append("the cgroup v2 hierarchy at \(mount) offers no cpu controller to this process's cgroup \(home)")
            } else if access(home, W_OK) != 0 {
                why.append("this process's cgroup v2 \(home) is not writable (\(errnoText()))")
            } else {
                return HostCPUController(version: .v2, home: home)
            }
        } else {
            why.append("no cgroup v2 hierarchy is mounted")
        }
        // cgroup v1
        if let mount = cgroupMounts(mounts).first(where: { $0.type == "cgroup" && $0.options.contains("cpu") })?.point,
           let path = membership(memberships, where: { $0.controllers.contains("cpu") }) {
            let home = join(mount, path)
            if access(home, W_OK) != 0 {
                why.append("this process's cgroup v1 \(home) is not writable (\(errnoText()))")
            } else {
                return HostCPUController(version: .v1, home: home)
            }
        } else {
            why.append("no cgroup v1 cpu hierarchy is mounted")
        }
        throw .unsupported("its vCPUs are host threads scheduled by the host, and a weight or cap needs a cgroup cpu controller: "
                           + why.joined(separator: "; ") + "; weights and caps apply to SoftCPU domains (Docs/scheduling.md)")
    }

    /// The cgroup mounts in /proc/self/mountinfo: mount point, filesystem type, super options.
    static func cgroupMounts(_ mountinfo: String) -> [(point: String, type: String, options: [Substring])] {
        mountinfo.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER-OPTIONS
            guard fields.count >= 10, let dash = fields.firstIndex(of: "-"), dash + 3 < fields.count,
                  fields[dash + 1].hasPrefix("cgroup") else { return nil }
            let point = String(fields[4]).replacingOccurrences(of: "\\040", with: " ")
            return (point, String(fields[dash + 1]), fields[dash + 3].split(separator: ","))
        }
    }

    /// The path of this process's cgroup in the hierarchy `which` picks, from /proc/self/cgroup
    /// ("HIERARCHY:CONTROLLERS:PATH" lines).
    static func membership(_ text: String, where which: ((hierarchy: Substring, controllers: [Substring])) -> Bool) -> String? {
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3, which((fields[0], fields[1].split(separator: ","))) else { continue }
            return String(fields[2])
        }
        return nil
    }

    private static func join(_ mount: String, _ path: String) -> String {
        path == "/" ? mount : mount + path
    }
}

private func errnoText() -> String { String(cString: strerror(errno)) }

/// Writes `value` to a cgroup file (one write, as the kernel wants it).
/// - Throws: ``CreditError/unsupported(_:)`` naming the file and the kernel's reason.
private func writeCgroupFile(_ path: String, _ value: String) throws(CreditError) {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw .unsupported("cannot open \(path): \(errnoText())") }
    defer { close(fd) }
    let bytes = Array(value.utf8)
    let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    guard written == bytes.count else { throw .unsupported("cannot write '\(value)' to \(path): \(errnoText())") }
}

/// The process's live ``DomainCPUShares``, and whether any of them has asked for a weight or cap
/// (from then on every KVM domain of the process is in a cgroup, so that weights are relative
/// between all of them).
private final class CPUSharesRegistry: Sendable {
    struct Member: Sendable { weak var shares: DomainCPUShares? }
    let state = Mutex<(engaged: Bool, members: [ObjectIdentifier: Member])>((false, [:]))

    var engaged: Bool { state.withLock { $0.engaged } }

    func add(_ shares: DomainCPUShares) { state.withLock { _ = $0.members[ObjectIdentifier(shares)] = Member(shares: shares) } }
    func remove(_ id: ObjectIdentifier) { state.withLock { _ = $0.members.removeValue(forKey: id) } }

    /// Engages the process; returns the members other than `caller` (strong references).
    func engage(by caller: DomainCPUShares) -> [DomainCPUShares] {
        state.withLock { state in
            state.engaged = true
            return state.members.values.compactMap(\.shares).filter { $0 !== caller }
        }
    }
}

private let cpuSharesRegistry = CPUSharesRegistry()

/// A KVM domain's place in the host's cpu cgroup: its weight and cap, and the vCPU threads it
/// holds. A domain that keeps the defaults needs no cgroup while no KVM domain of the process
/// has asked for other values: creating and moving threads between cgroups costs a fraction of
/// a millisecond per domain (cgroup v1 here), which a domain that asks for nothing should not pay.
/// The first weight or cap other than the defaults (set at creation or at run time) makes the
/// domain's cgroup and *engages* the process: every live KVM domain gets its own, with its
/// values, its running vCPU threads moved in, and so does each one started later (when its first
/// vCPU thread starts), so that weights are relative between all of them. A cgroup is removed
/// when its domain ends, its threads moved back to the process's own cgroup first. On a host
/// without a usable cpu controller, defaults run without one and other values are refused.
final class DomainCPUShares: Sendable {
    private struct State {
        var credit = CreditParameters()
        var controller: HostCPUController?
        var directory: String?
        /// vCPU index → the thread ID running it (between ``enter`` and ``leave``).
        var threads: [Int: pid_t] = [:]
        var ended = false
    }

    private let domain: DomainID
    private let state = Mutex(State())

    init(domain: DomainID) {
        self.domain = domain
        cpuSharesRegistry.add(self)
    }

    deinit { end() }

    /// Whether a KVM domain of this process has asked for a weight or cap (see the type's doc).
    static var engaged: Bool { cpuSharesRegistry.engaged }

    var parameters: CreditParameters { state.withLock { $0.credit } }

    /// The cgroup directory while there is one.
    var directory: String? { state.withLock { $0.directory } }

    /// Sets the weight and/or cap (nil keeps it; both already range-checked): written to the
    /// cgroup at once, made first if need be (moving the running vCPU threads into it).
    /// - Throws: ``CreditError/unsupported(_:)`` naming the field and why the host cannot.
    func set(weight: Int?, cap: Int?) throws(CreditError) {
        try state.withLock { (state: inout State) throws(CreditError) in
            let wanted = CreditParameters(weight: weight ?? state.credit.weight, cap: cap ?? state.credit.cap)
            // The field named is the one that asked for something (as the daemon's 409 names it).
            let what = cap != nil && cap != 0 ? "cap \(wanted.cap)" : "weight \(wanted.weight)"
            do throws(CreditError) {
                if state.directory == nil && !state.ended && wanted != CreditParameters() {
                    try create(&state)
                }
                try write(wanted, &state)
            } catch {
                throw .unsupported("\(what) on a KVM domain: \(error)")
            }
            state.credit = wanted
        }
        if parameters != CreditParameters() {
            for other in cpuSharesRegistry.engage(by: self) { other.join() }
        }
    }

    /// The process is engaged: into a cgroup of its own, with its values, if not yet (a failure
    /// leaves the domain as it was: its values are the defaults, which need none).
    private func join() {
        state.withLock { state in
            guard state.directory == nil && !state.ended else { return }
            do throws(CreditError) {
                try create(&state)
                try write(state.credit, &state)
            } catch {
                remove(&state)
            }
        }
    }

    /// Writes the weight and cap to the cgroup's files, when there is one.
    private func write(_ credit: CreditParameters, _ state: inout State) throws(CreditError) {
        guard let directory = state.directory, let controller = state.controller else { return }
        for (file, value) in controller.settings(weight: credit.weight, cap: credit.cap) {
            try writeCgroupFile("\(directory)/\(file)", value)
        }
    }

    /// Makes the cgroup and moves the running vCPU threads in; on failure leaves nothing behind.
    private func create(_ state: inout State) throws(CreditError) {
        let controller = try HostCPUController.find()
        let directory = controller.directory(for: domain)
        switch controller.version {
        case .v1:
            // Another domain's end may remove the process's directory between the two mkdirs:
            // make it again then.
            var attempts = 0
            repeat {
                try makeDirectory(controller.processDirectory)
                attempts += 1
                if mkdir(directory, 0o755) == 0 || errno == EEXIST { break }
                guard errno == ENOENT && attempts < 3 else { throw .unsupported("cannot create cgroup \(directory): \(errnoText())") }
            } while true
        case .v2:
            try makeDirectory(directory)
            do throws(CreditError) {
                // A threaded child may hold single threads; cpu is a threaded controller.
                try writeCgroupFile("\(directory)/cgroup.type", "threaded")
                try writeCgroupFile("\(controller.home)/cgroup.subtree_control", "+cpu")
            } catch {
                _ = rmdir(directory)
                throw error
            }
        }
        state.controller = controller
        state.directory = directory
        do throws(CreditError) {
            for tid in state.threads.values { try writeCgroupFile("\(directory)/\(controller.threadsFile)", "\(tid)") }
        } catch {
            remove(&state)
            throw error
        }
    }

    private func makeDirectory(_ path: String) throws(CreditError) {
        guard mkdir(path, 0o755) == 0 || errno == EEXIST else { throw .unsupported("cannot create cgroup \(path): \(errnoText())") }
    }

    /// Moves the threads back home and removes the directory (and, v1, the process's directory
    /// when it was the last domain's).
    private func remove(_ state: inout State) {
        guard let directory = state.directory, let controller = state.controller else { return }
        // Every thread the cgroup holds, not only the vCPUs: KVM starts a worker of the VM's own
        // (kvm-nx-lpage-recovery) at the first KVM_RUN in the cgroup of the thread that ran it,
        // and it lives as long as the VM; a cgroup with threads in it cannot be removed.
        let listed = (try? String(contentsOfFile: "\(directory)/\(controller.threadsFile)", encoding: .utf8)) ?? ""
        let tids = Set(state.threads.values.map { "\($0)" } + listed.split(separator: "\n").map(String.init))
        for tid in tids { try? writeCgroupFile("\(controller.home)/\(controller.threadsFile)", tid) }
        _ = rmdir(directory)
        if controller.version == .v1 { _ = rmdir(controller.processDirectory) }  // fails while other domains have theirs
        state.directory = nil
        state.controller = nil
    }

    /// The calling thread starts running vCPU `index`: into the cgroup, made now (with the
    /// defaults) when the process is engaged and there is none yet.
    /// - Throws: ``CreditError/unsupported(_:)`` when the thread cannot be moved in.
    func enter(vcpu index: Int) throws(CreditError) {
        let tid = pid_t(vireo_gettid())
        try state.withLock { (state: inout State) throws(CreditError) in
            state.threads[index] = tid
            if state.directory == nil && !state.ended && cpuSharesRegistry.engaged {
                // Without a cpu controller a domain with the defaults runs as it is (a domain
                // with other values has its cgroup already: setting them made it).
                do throws(CreditError) {
                    try create(&state)
                    try write(state.credit, &state)
                    return  // create moved the thread in
                } catch {
                    remove(&state)
                    if state.credit != CreditParameters() { throw error }
                }
            }
            if let directory = state.directory, let controller = state.controller {
                try writeCgroupFile("\(directory)/\(controller.threadsFile)", "\(tid)")
            }
        }
    }

    /// The calling thread stops running vCPU `index`: back to the process's cgroup (it may be the
    /// caller's own thread, which goes on doing other work).
    func leave(vcpu index: Int) {
        state.withLock { state in
            guard let tid = state.threads.removeValue(forKey: index) else { return }
            if state.directory != nil, let controller = state.controller {
                try? writeCgroupFile("\(controller.home)/\(controller.threadsFile)", "\(tid)")
            }
        }
    }

    /// The domain has ended: the cgroup goes; later sets only record the values.
    func end() {
        state.withLock { state in
            state.ended = true
            remove(&state)
        }
        cpuSharesRegistry.remove(ObjectIdentifier(self))
    }
}
