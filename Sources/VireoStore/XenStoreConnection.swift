import Synchronization
import VireoABI

/// What the store lets one domain (or one connection) hold. Quotas bind unprivileged domains;
/// the transaction bound and the event queue bound hold for every connection, dom0's included
/// (a leaking or stalled tool must not grow the store without limit either).
public struct XenStoreQuotas: Sendable, Equatable {
    /// Nodes a domain may own (ENOSPC beyond).
    public var nodesPerDomain = 1000
    /// Bytes of one node: its value plus 4 per permission entry (ENOSPC beyond).
    public var nodeSize = 2048
    /// Watches a domain may hold over all its connections (E2BIG beyond).
    public var watchesPerDomain = 128
    /// Open transactions per connection (ENOSPC beyond).
    public var transactionsPerConnection = 10
    /// Replies a connection may leave unread before the store stops taking its requests.
    public var outstandingRequests = 20
    /// Watch events queued for a connection that has not read them; later ones are dropped
    /// (and counted).
    public var queuedWatchEvents = 1024

    public init() {}

    public init(nodesPerDomain: Int = 1000, nodeSize: Int = 2048, watchesPerDomain: Int = 128,
                transactionsPerConnection: Int = 10, outstandingRequests: Int = 20, queuedWatchEvents: Int = 1024) {
        self.nodesPerDomain = nodesPerDomain
        self.nodeSize = nodeSize
        self.watchesPerDomain = watchesPerDomain
        self.transactionsPerConnection = transactionsPerConnection
        self.outstandingRequests = outstandingRequests
        self.queuedWatchEvents = queuedWatchEvents
    }
}

/// Bytes waiting to go to one client, with the message boundaries inside them, so the store
/// can count replies and events not yet read.
struct Outbox {
    var bytes: [UInt8] = []
    var start = 0
    /// End offsets (into `bytes`) of queued messages and whether each is a watch event.
    var ends: [(end: Int, isEvent: Bool)] = []
    var endsHead = 0
    var replies = 0
    var events = 0
    var droppedEvents = 0
    var closed = false

    var isEmpty: Bool { start == bytes.count }

    mutating func append(_ message: XenStoreMessage, isEvent: Bool) {
        if start == bytes.count {
            bytes.removeAll(keepingCapacity: true)
            start = 0
            ends.removeAll(keepingCapacity: true)
            endsHead = 0
        }
        message.encode(into: &bytes)
        ends.append((bytes.count, isEvent))
        if isEvent { events += 1 } else { replies += 1 }
    }

    mutating func consume(_ count: Int) {
        start += count
        while endsHead < ends.count && ends[endsHead].end <= start {
            if ends[endsHead].isEvent { events -= 1 } else { replies -= 1 }
            endsHead += 1
        }
        if start == bytes.count {
            bytes.removeAll(keepingCapacity: true)
            start = 0
            ends.removeAll(keepingCapacity: true)
            endsHead = 0
        } else if start > 65536 && start > bytes.count / 2 {
            bytes.removeSubrange(0..<start)
            ends.removeSubrange(0..<endsHead)
            for i in ends.indices { ends[i].end -= start }
            endsHead = 0
            start = 0
        }
    }
}

/// One client of the store: a tool on the socket (domain 0, privileged) or a guest's ring.
/// The store appends replies and watch events to its outbox; its transport drains them and
/// is told through `wake` when there is something new.
public final class XenStoreConnection: Sendable, CustomStringConvertible {
    public let id: UInt64
    public let domain: DomainID
    /// Privileged connections (the toolstack's) bypass permissions and node quotas.
    public let isPrivileged: Bool
    let outbox = Mutex(Outbox())
    private let wakeHandler: @Sendable () -> Void

    init(id: UInt64, domain: DomainID, privileged: Bool, wake: @escaping @Sendable () -> Void) {
        self.id = id
        self.domain = domain
        self.isPrivileged = privileged
        self.wakeHandler = wake
    }

    func wake() { wakeHandler() }

    /// Replies queued and not yet drained (the transport stops taking requests at the quota).
    public var pendingReplies: Int { outbox.withLock { $0.replies } }
    /// Watch events queued and not yet drained.
    public var pendingEvents: Int { outbox.withLock { $0.events } }
    /// Watch events dropped because the queue was full.
    public var droppedEvents: Int { outbox.withLock { $0.droppedEvents } }
    /// Whether the store has closed the connection (its domain was released).
    public var isClosed: Bool { outbox.withLock { $0.closed } }
    public var hasOutput: Bool { outbox.withLock { !$0.isEmpty } }

    /// Offers the queued bytes to `sink`, which returns how many it took (0 stops).
    /// Returns the total taken.
    @discardableResult
    public func drain(_ sink: (UnsafeRawBufferPointer) -> Int) -> Int {
        outbox.withLock { box in
            var total = 0
            while !box.isEmpty {
                let taken = box.bytes.withUnsafeBytes { all in
                    sink(UnsafeRawBufferPointer(rebasing: all[box.start...]))
                }
                guard taken > 0 else { break }
                box.consume(min(taken, box.bytes.count - box.start))
                total += taken
            }
            return total
        }
    }

    /// Takes every whole queued message (for in-process clients and tests).
    public func takeMessages() -> [XenStoreMessage] {
        var decoder = XenStoreDecoder()
        drain { bytes in decoder.append(bytes); return bytes.count }
        var out: [XenStoreMessage] = []
        while let m = try? decoder.next() { out.append(m) }
        return out
    }

    public var description: String { "xenstore connection \(id) (\(domain)\(isPrivileged ? ", privileged" : ""))" }
}
