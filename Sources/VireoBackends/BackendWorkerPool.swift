import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoCore

/// What one turn of a ``ServiceWorker`` left behind.
public enum ServiceTurn: Sendable, Equatable {
    /// Nothing is pending (the ring's final check found no request): the worker sleeps until
    /// its next event.
    case idle
    /// As ``idle``, and the turn found no work at all: if an event woke it, the event was
    /// spurious. A worker whose events keep being spurious has them masked for a while.
    case empty
    /// The turn's budget ran out with work left: the worker goes to the back of the pool's
    /// queue, behind every other ready worker.
    case more
}

/// The threads that serve backends' rings: a bounded set (one per core by default) shared by
/// every ``ServiceWorker`` made on it, however many frontends there are. A worker that is woken
/// (its event channel, a tick) joins a FIFO of ready workers once; a pool thread takes the
/// first, runs one turn of at most ``budget`` requests, and puts it back at the end if it has
/// more to do. So N rings share the host round-robin, a frontend that keeps its ring full gets
/// one turn in N, and an event storm costs one queue check per event while the worker is
/// already ready, and one ring check per turn otherwise (SECURITY 12). The queue holds each
/// worker at most once: it is bounded by the number of workers.
///
/// A storm of events with no work behind them would still cost the host a dispatch per event
/// and a turn per dispatch. So, as Linux does for XSA-332 with its "late EOI" of spurious
/// events, a worker woken by events for ``spuriousThreshold`` turns in a row that found nothing
/// has its event channels masked (the peer's sends then only set a pending bit) and is deferred:
/// after 1 ms, doubling with every further spurious turn up to 64 ms, its ports are unmasked
/// (an event that came meanwhile is delivered then) and it gets a turn. Any turn that finds
/// work ends the deferral's growth. A frontend that storms thus gets its requests served late,
/// never lost; an honest one, whose events come with requests, never meets it.
///
/// Each worker is also given a turn every 100 ms while idle, a safety net as Xen's backends
/// have none of but a lost wake-up then costs 100 ms, not a hang.
///
/// ``shared`` is the process's pool; a host (or a test) may make its own and ``stop()`` it.
public final class BackendWorkerPool: @unchecked Sendable {  // every mutable field is guarded by `lock`
    /// The process's pool: one thread per core (at most 8), a budget of 16 requests per turn.
    public static let shared = BackendWorkerPool(threads: min(max(1, ProcessInfo.processInfo.activeProcessorCount), 8),
                                                 name: "vireo-backend")

    /// Pool threads.
    public let threadCount: Int
    /// Requests (or whatever unit a device counts) one turn of a worker may serve.
    public let budget: Int
    /// How long an idle worker waits for its safety-net turn.
    static let tickNanoseconds: UInt64 = 100_000_000
    /// Event-woken turns in a row that found nothing before the worker's events are masked.
    public static let spuriousThreshold = 2
    /// The first and the longest deferral of a worker whose events are spurious.
    static let firstDeferral: UInt64 = 1_000_000, longestDeferral: UInt64 = 64_000_000

    private let name: String
    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    private let ready: UnsafeMutablePointer<pthread_cond_t>
    private let settled: UnsafeMutablePointer<pthread_cond_t>
    private var queue: [ServiceWorker?] = []
    private var head = 0
    private var members: [ObjectIdentifier: ServiceWorker] = [:]
    private var deferred: [ServiceWorker] = []
    private var deferralCount = 0
    private var started = false
    private var stopping = false
    private var running = 0
    private var nextTick: UInt64 = 0
    private var turnCount = 0

    /// A pool of `threads` threads (started when the first worker starts), each turn serving at
    /// most `budget` requests.
    public init(threads: Int, budget: Int = 16, name: String = "vireo-backend") {
        precondition(threads >= 1 && budget >= 1)
        threadCount = threads
        self.budget = budget
        self.name = name
        lock = .allocate(capacity: 1)
        pthread_mutex_init(lock, nil)
        ready = .allocate(capacity: 1)
        settled = .allocate(capacity: 1)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(ready, &attributes)
        pthread_cond_init(settled, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(ready)
        pthread_cond_destroy(settled)
        pthread_mutex_destroy(lock)
        ready.deallocate()
        settled.deallocate()
        lock.deallocate()
    }

    /// Turns run so far (for tests and diagnostics).
    public var turns: Int { locked { turnCount } }

    /// Workers waiting for a thread now (never more than the workers started on the pool).
    public var queued: Int { locked { queue.count - head } }

    /// Times a worker's events were masked for being spurious (for tests and diagnostics).
    public var deferrals: Int { locked { deferralCount } }

    /// Ends the pool's threads once the turns they are running finish, and waits for them. The
    /// shared pool is never stopped; a pool a test made is.
    public func stop() {
        locked {
            stopping = true
            pthread_cond_broadcast(ready)
            while running > 0 { pthread_cond_wait(settled, lock) }
        }
    }

    // MARK: Workers (called by ServiceWorker)

    func start(_ worker: ServiceWorker) {
        locked {
            precondition(!stopping, "\(name): the pool was stopped")
            if !started {
                started = true
                running = threadCount
                nextTick = Self.now() &+ Self.tickNanoseconds
                for index in 0..<threadCount {
                    let thread = Thread { [self] in serve() }
                    thread.name = "\(name)-\(index)"
                    thread.start()
                }
            }
            members[ObjectIdentifier(worker)] = worker
            worker.state = .idle
            enqueue(worker)
        }
    }

    func wake(_ worker: ServiceWorker) {
        locked {
            worker.eventWoken = true
            switch worker.state {
            case .idle: enqueue(worker)
            case .running: worker.rewoken = true
            case .unstarted, .queued, .deferred, .stopped: break
            }
        }
    }

    /// Takes `worker` off the pool; waits while one of its turns runs.
    func stop(_ worker: ServiceWorker) {
        let masked = locked { () -> [ServiceWorker.Channel] in
            while worker.state == .running { pthread_cond_wait(settled, lock) }
            if worker.state == .queued, let index = queue[head...].firstIndex(where: { $0 === worker }) {
                queue[index] = nil  // skipped when reached: the queue keeps its order
            }
            var masked: [ServiceWorker.Channel] = []
            if case .deferred = worker.state {
                deferred.removeAll { $0 === worker }
                masked = worker.channels
            }
            worker.state = .stopped
            worker.release()
            members[ObjectIdentifier(worker)] = nil
            return masked
        }
        // The port may be bound again, under the same number. Unmasked with the pool's lock
        // released: an unmask that finds the port pending runs an immediate handler on this
        // thread, and a handler that wakes a worker takes that lock.
        ServiceWorker.unmask(masked)
    }

    // MARK: Threads

    private func enqueue(_ worker: ServiceWorker) {
        worker.state = .queued
        queue.append(worker)
        pthread_cond_signal(ready)
    }

    private func serve() {
        pthread_mutex_lock(lock)
        while true {
            if stopping { break }
            let now = Self.now()
            if now >= nextTick {
                nextTick = now &+ Self.tickNanoseconds
                for worker in members.values where worker.state == .idle { enqueue(worker) }
            }
            var wakeAt = nextTick
            if !deferred.isEmpty {
                var released: [ServiceWorker.Channel] = []
                wakeAt = min(wakeAt, releaseDeferred(now: now, unmasking: &released))
                if !released.isEmpty {
                    // Unmasked without the lock (see stop(_:)); the workers are queued already.
                    pthread_mutex_unlock(lock)
                    ServiceWorker.unmask(released)
                    pthread_mutex_lock(lock)
                    continue
                }
            }
            guard let worker = takeFirst() else {
                var deadline = timespec(tv_sec: Int(wakeAt / 1_000_000_000), tv_nsec: Int(wakeAt % 1_000_000_000))
                pthread_cond_timedwait(ready, lock, &deadline)
                continue
            }
            worker.state = .running
            worker.rewoken = false
            let byEvent = worker.eventWoken
            worker.eventWoken = false
            turnCount += 1
            pthread_mutex_unlock(lock)
            let turn = worker.turn(budget: budget)
            pthread_mutex_lock(lock)
            if turn == .empty && byEvent {
                worker.spurious += 1
            } else if turn != .empty {
                worker.spurious = 0
            }
            if turn == nil {
                worker.state = .stopped  // it failed and reported it; its stop() finds it stopped
                members[ObjectIdentifier(worker)] = nil
            } else if turn == .more || (worker.rewoken && worker.spurious == 0) {
                enqueue(worker)
            } else if worker.spurious >= Self.spuriousThreshold && worker.canMaskEvents {
                let extra = min(worker.spurious - Self.spuriousThreshold, 6)
                let delay = min(Self.firstDeferral << UInt64(extra), Self.longestDeferral)
                worker.state = .deferred(until: Self.now() &+ delay)
                worker.maskEvents()
                deferred.append(worker)
                deferralCount += 1
                pthread_cond_signal(ready)  // an idle thread's wait may end later than this deferral
            } else if worker.rewoken {
                enqueue(worker)
            } else {
                worker.state = .idle
            }
            pthread_cond_broadcast(settled)
        }
        running -= 1
        pthread_cond_broadcast(settled)
        pthread_mutex_unlock(lock)
    }

    /// Queues every deferred worker whose time has come, adding its ports to `unmasking` for
    /// the caller to unmask once the lock is released; returns when the next one's comes (or
    /// `UInt64.max`).
    private func releaseDeferred(now: UInt64, unmasking: inout [ServiceWorker.Channel]) -> UInt64 {
        var next = UInt64.max
        deferred.removeAll { worker in
            guard case .deferred(let until) = worker.state else { return true }
            if until > now {
                next = min(next, until)
                return false
            }
            unmasking += worker.channels
            enqueue(worker)
            return true
        }
        return next
    }

    private func takeFirst() -> ServiceWorker? {
        while head < queue.count {
            let worker = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 64 && head * 2 >= queue.count {
                queue.removeFirst(head)
                head = 0
            }
            if let worker { return worker }
        }
        return nil
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return body()
    }

    private static func now() -> UInt64 {
        var clock = timespec()
        clock_gettime(CLOCK_MONOTONIC, &clock)
        return UInt64(clock.tv_sec) &* 1_000_000_000 &+ UInt64(clock.tv_nsec)
    }
}

/// One ring's (or one device's) share of a ``BackendWorkerPool`` while it is connected: blkback
/// has one per ring, as Xen's blkback has a kernel thread per ring, but here the rings take
/// turns on the pool's threads. Made in ``XenbusDevice/connect(_:)`` before the event channels
/// that wake it are bound (``FrontendLink/bindEvent(_:waking:)``), started once the connection
/// is whole, stopped in ``XenbusDevice/disconnect(_:)``.
public final class ServiceWorker: @unchecked Sendable {  // `state`, `rewoken` and `body` are guarded by the pool's lock
    enum State: Equatable { case unstarted, idle, queued, running, deferred(until: UInt64), stopped }

    public let name: String
    /// The pool whose threads run this worker's turns.
    public let pool: BackendWorkerPool
    var state = State.unstarted
    var rewoken = false
    var eventWoken = false
    var spurious = 0
    /// A port whose events wake a worker.
    typealias Channel = (host: HostEventDomain, port: EventPort)
    /// The ports its events come on (read by the pool under its lock).
    private(set) var channels: [Channel] = []
    private var body: (@Sendable (Int) throws(BackendError) -> ServiceTurn)?
    private var failed: (@Sendable (BackendError) -> Void)?
    private let stopping = Atomic<Bool>(false)

    public init(name: String, pool: BackendWorkerPool = .shared) throws(BackendError) {
        self.name = name
        self.pool = pool
    }

    /// Whether ``stop()`` was asked: a turn that serves many requests checks it between them,
    /// so a frontend that keeps its ring full cannot hold a disconnection.
    public var isStopping: Bool { stopping.load(ordering: .relaxed) }

    /// Starts taking turns: `turn` runs on a pool thread when the worker is woken (its
    /// events), at once, and at least every 100 ms, until ``stop()``; it serves at most the
    /// budget it is given and says whether work is left (then it runs again after every other
    /// ready worker has had a turn). A thrown error ends the turns and is reported to the
    /// control loop, which drops the connection `link` belongs to (the device goes to Closing
    /// with `<frontend path>: <error>` as its failure).
    public func start(for link: FrontendLink, budgeted turn: @escaping @Sendable (Int) throws(BackendError) -> ServiceTurn) {
        let reports = link.reports, generation = link.generation, path = link.path
        start(onFailure: { error in reports.report("\(path): \(error)", generation: generation) }, budgeted: turn)
    }

    /// Starts taking turns as ``start(for:budgeted:)`` does, for a worker that belongs to no
    /// XenBus connection: a thrown error ends the turns and is handed to `onFailure` (on the
    /// pool thread).
    public func start(onFailure: @escaping @Sendable (BackendError) -> Void,
                      budgeted turn: @escaping @Sendable (Int) throws(BackendError) -> ServiceTurn) {
        body = turn
        failed = onFailure
        pool.start(self)
    }

    /// Starts taking turns with a `pass` that has no budget of its own (it does what is
    /// pending and returns): see ``start(for:budgeted:)``.
    public func start(for link: FrontendLink, _ pass: @escaping @Sendable () throws(BackendError) -> Void) {
        start(for: link, budgeted: { (_: Int) throws(BackendError) -> ServiceTurn in
            try pass()
            return .idle
        })
    }

    /// Runs one turn on the calling pool thread; nil when it failed (and was reported) or the
    /// worker is stopping.
    func turn(budget: Int) -> ServiceTurn? {
        guard !stopping.load(ordering: .acquiring), let body else { return nil }
        do { return try body(budget) } catch {
            failed?(error)
            return nil
        }
    }

    /// Registers a port whose events wake this worker, to be masked while its events are
    /// spurious (``FrontendLink/bindEvent(_:waking:)`` does it; before ``start(for:budgeted:)``).
    public func wakes(on port: EventPort, of host: HostEventDomain) {
        channels.append((host, port))
    }

    var canMaskEvents: Bool { !channels.isEmpty }

    func maskEvents() {
        for channel in channels { try? channel.host.mask(channel.port) }
    }

    /// Unmasks `channels`; called without the pool's lock held.
    static func unmask(_ channels: [Channel]) {
        for channel in channels { try? channel.host.unmask(channel.port) }
    }

    /// Drops the turn's closure (which holds the ring, and through it this worker) once no
    /// turn can run again: the connection's mappings end with the connection.
    func release() {
        body = nil
        failed = nil
        channels = []
    }

    /// Wakes the worker for a turn (any thread). Costs a lock and a check when it is already
    /// waiting for one.
    public func wake() { pool.wake(self) }

    /// Asks the worker to end after the request it is serving and waits until it has.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        pool.stop(self)
    }
}
