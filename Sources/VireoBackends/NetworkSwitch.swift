import Foundation
import Glibc
import Synchronization

/// An in-process learning Ethernet switch: vifs (and optionally a TAP uplink) are its ports.
///
/// Each frame's source address is learned for the port it came in on (bounded: at most
/// `tableLimit` addresses in all and `portAddressLimit` per port, entries older than `aging`
/// forgotten, so a guest spraying source addresses cannot grow the table or evict every other
/// port's entries). A frame to a known unicast address goes to that port only (or nowhere, when
/// that is the port it came from); broadcast, multicast and unknown destinations are flooded to
/// every other port. Delivery copies the frame into the destination's own bounded queue (a vif's
/// receive queue, a TAP's kernel queue): a full queue drops the frame there and counts it,
/// without holding up the other ports.
public final class NetworkSwitch: Sendable {
    public let name: String
    public let tableLimit: Int
    public let portAddressLimit: Int
    public let agingNanoseconds: UInt64
    private let clock: @Sendable () -> UInt64

    /// One port's way to deliver a frame (false: dropped at that port).
    typealias Deliver = @Sendable (UnsafeMutableRawBufferPointer, FrameChecksum) -> Bool

    private struct Entry {
        var port: Int
        var seen: UInt64
        /// A vif's own configured address: never aged out, never moved by another port's frames.
        var fixed = false
    }
    /// The vif behind a port, for ``route(_:from:)``: weak, as the port's delivery is. (The
    /// backend, not its device: a weakly referenced object's reference counting takes a slower
    /// path, and the device is what the vifs' loops retain per pass.)
    private struct Vif {
        weak var backend: NetBackend?
    }
    private struct State {
        /// By port number (numbers are never reused; a removed port leaves nil).
        var ports: [Deliver?] = [nil]
        /// By port number: the vif a port delivers to, for ports made by ``connect(_:)``.
        var vifs: [Vif] = [Vif()]
        var nextPort = 1
        var table: [UInt64: Entry] = [:]
        var addressesPerPort: [Int: Int] = [:]
        var stats = Statistics()
    }
    private let state = Mutex(State())
    // Counted after delivery, outside the table's lock.
    private let deliveredCount = Atomic<Int>(0)
    private let droppedCount = Atomic<Int>(0)

    /// Counters, for tests and diagnostics.
    public struct Statistics: Sendable, Equatable {
        /// Frames that came in on a port.
        public var frames = 0
        /// Copies delivered to a port (a flooded frame counts once per port).
        public var delivered = 0
        /// Copies a port refused (its queue full).
        public var dropped = 0
        /// Frames sent to every other port (unknown, broadcast or multicast destination).
        public var flooded = 0
        /// Frames too short to carry an Ethernet header, or whose destination is their source port.
        public var discarded = 0
        /// Source addresses not learned because a table bound was reached.
        public var learnRefused = 0
    }
    public var statistics: Statistics {
        var stats = state.withLock { $0.stats }
        stats.delivered = deliveredCount.load(ordering: .relaxed)
        stats.dropped = droppedCount.load(ordering: .relaxed)
        return stats
    }
    /// Addresses in the table now.
    public var learnedAddresses: Int { state.withLock { $0.table.count } }

    public init(name: String, tableLimit: Int = 4096, portAddressLimit: Int = 256,
                aging: Duration = .seconds(300),
                clock: @escaping @Sendable () -> UInt64 = NetworkSwitch.coarseNanoseconds) {
        precondition(tableLimit > 0 && portAddressLimit > 0, "a switch table holds at least one address")
        self.name = name
        self.tableLimit = tableLimit
        self.portAddressLimit = portAddressLimit
        let (seconds, attoseconds) = aging.components
        agingNanoseconds = UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000)
        self.clock = clock
    }

    /// A port of this switch: what a vif transmits into.
    public final class Port: NetworkAttachment, Sendable {
        public let number: Int
        private let owner: NetworkSwitch
        init(number: Int, owner: NetworkSwitch) {
            self.number = number
            self.owner = owner
        }
        public func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool {
            owner.forward(frame, checksum: checksum, from: number)
        }
        /// The vif a frame with these first bytes goes to, when that is one other vif: see
        /// ``NetworkSwitch/route(_:from:)``.
        func route(_ header: UnsafeRawBufferPointer) -> NetDevice? { owner.route(header, from: number) }
        /// Counts frames that came in on this port through ``route(_:)`` and their deliveries
        /// (`dropped`: the destination refused them).
        func routed(frames: Int, delivered: Int, dropped: Int) {
            owner.state.withLock { $0.stats.frames += frames }
            if delivered > 0 { owner.deliveredCount.add(delivered, ordering: .relaxed) }
            if dropped > 0 { owner.droppedCount.add(dropped, ordering: .relaxed) }
        }
        /// Leaves the switch: frames are no longer delivered to it and its addresses are forgotten.
        public func remove() { owner.removePort(number) }
    }

    /// The default clock: CLOCK_MONOTONIC_COARSE (a few milliseconds' resolution is plenty for
    /// ageing out addresses, and it is read on every frame).
    public static func coarseNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }

    /// Plugs `backend` in: its transmissions enter the switch, and frames for it go to its
    /// receive queue. The vif's configured MAC is entered for its port at once (fixed: it
    /// neither ages nor moves), so frames to a guest that has not spoken yet are not flooded.
    @discardableResult
    public func connect(_ backend: NetBackend) -> Port {
        let port = addPort { [weak backend] frame, checksum in
            backend?.receive(UnsafeRawBufferPointer(frame), checksum: checksum) ?? false
        }
        let key = backend.mac.key, number = port.number
        state.withLock { s in
            s.vifs[number].backend = backend
            if let old = s.table[key] { s.addressesPerPort[old.port, default: 1] -= 1 }
            s.table[key] = Entry(port: number, seen: 0, fixed: true)
            s.addressesPerPort[number, default: 0] += 1
        }
        backend.attach(port)
        return port
    }

    /// Plugs in any receiver (a test's capture, another fabric): `deliver` gets the frames the
    /// switch sends this port (false: dropped there); the returned port is where its own
    /// frames enter.
    public func connect(deliver: @escaping @Sendable (UnsafeMutableRawBufferPointer, FrameChecksum) -> Bool) -> Port {
        addPort(deliver)
    }

    func addPort(_ deliver: @escaping Deliver) -> Port {
        let number = state.withLock { s in
            let n = s.nextPort
            s.nextPort += 1
            s.ports.append(deliver)
            s.vifs.append(Vif())
            return n
        }
        return Port(number: number, owner: self)
    }

    func removePort(_ number: Int) {
        state.withLock { s in
            if number < s.ports.count {
                s.ports[number] = nil
                s.vifs[number] = Vif()
            }
            s.table = s.table.filter { $0.value.port != number }
            s.addressesPerPort[number] = nil
        }
    }

    /// Learns the source, picks the destination ports, then delivers outside the lock (a
    /// port's delivery may take its own locks). True when at least one port took the frame,
    /// or there was no other port to take it.
    func forward(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum, from port: Int) -> Bool {
        guard frame.count >= 14 else {
            state.withLock { $0.stats.discarded += 1 }
            return false
        }
        let bytes = UnsafeRawBufferPointer(frame)
        let destination = EthernetAddress(bytes, at: 0), source = EthernetAddress(bytes, at: 6)
        let now = clock()
        var single: Deliver?
        var flood: [Deliver] = []
        let decided: Bool = state.withLock { s in
            s.stats.frames += 1
            guard port < s.ports.count, s.ports[port] != nil else { return false }  // a port that left
            if !source.isMulticast { learn(source.key, port: port, now: now, &s) }
            if !destination.isMulticast, let entry = s.table[destination.key], entry.fixed || now &- entry.seen <= agingNanoseconds {
                guard entry.port != port, entry.port < s.ports.count, let deliver = s.ports[entry.port] else {
                    s.stats.discarded += 1
                    return false
                }
                single = deliver
            } else {
                s.stats.flooded += 1
                flood = s.ports.enumerated().compactMap { $0.offset == port ? nil : $0.element }
            }
            return true
        }
        guard decided else { return false }
        var delivered = 0, dropped = 0
        if let single {
            if single(frame, checksum) { delivered += 1 } else { dropped += 1 }
        } else {
            for deliver in flood {
                if deliver(frame, checksum) { delivered += 1 } else { dropped += 1 }
            }
        }
        if delivered > 0 { deliveredCount.add(delivered, ordering: .relaxed) }
        if dropped > 0 { droppedCount.add(dropped, ordering: .relaxed) }
        return delivered > 0 || (single == nil && flood.isEmpty)
    }

    /// The fast path of ``forward(_:checksum:from:)`` for a vif's frame, given its first bytes
    /// (at least the 14 of the Ethernet header): when the destination is a unicast address
    /// known for another port that is a vif, learns the source and returns that vif, which the
    /// caller then delivers to itself, and counts (``Port/routed(frames:delivered:dropped:)``).
    /// The caller may reuse the answer for frames with the same two addresses for a moment (a
    /// vif's pass). nil, with nothing learned, for every other frame (flooded, discarded, to a
    /// TAP or a capture): the caller then hands the whole frame to ``forward(_:checksum:from:)``.
    func route(_ header: UnsafeRawBufferPointer, from port: Int) -> NetDevice? {
        guard header.count >= 14 else { return nil }
        let destination = EthernetAddress(header, at: 0), source = EthernetAddress(header, at: 6)
        // A frame to its own source would have `forward` learn before it looks up: left to it.
        guard !destination.isMulticast, destination != source else { return nil }
        let now = clock()
        return state.withLock { s -> NetDevice? in
            guard port < s.ports.count, s.ports[port] != nil,
                  let entry = s.table[destination.key], entry.fixed || now &- entry.seen <= agingNanoseconds,
                  entry.port != port, entry.port < s.ports.count, s.ports[entry.port] != nil,
                  let backend = s.vifs[entry.port].backend else { return nil }
            if !source.isMulticast { learn(source.key, port: port, now: now, &s) }
            return backend.device
        }
    }

    private func learn(_ key: UInt64, port: Int, now: UInt64, _ s: inout State) {
        if var entry = s.table[key] {
            if entry.fixed { return }  // a vif's own address: another port cannot take it over
            if entry.port != port {
                // The address moved: count it against its new port (if that one has room).
                guard s.addressesPerPort[port, default: 0] < portAddressLimit else {
                    s.stats.learnRefused += 1
                    return
                }
                s.addressesPerPort[entry.port, default: 1] -= 1
                s.addressesPerPort[port, default: 0] += 1
                entry.port = port
            }
            entry.seen = now
            s.table[key] = entry
            return
        }
        if s.table.count >= tableLimit {
            // Forget what has aged out before refusing.
            let aging = agingNanoseconds
            let stale = s.table.filter { !$0.value.fixed && now &- $0.value.seen > aging }
            for (k, e) in stale {
                s.table[k] = nil
                s.addressesPerPort[e.port, default: 1] -= 1
            }
        }
        guard s.table.count < tableLimit, s.addressesPerPort[port, default: 0] < portAddressLimit else {
            s.stats.learnRefused += 1
            return
        }
        s.table[key] = Entry(port: port, seen: now)
        s.addressesPerPort[port, default: 0] += 1
    }

    // MARK: A TAP uplink

    /// Plugs a TAP device in as a port: frames the switch sends it are written to the TAP (blank
    /// checksums filled in first), and a thread reads the TAP into the switch until the
    /// returned uplink is stopped.
    public func connect(tap: TapDevice) throws(BackendError) -> Uplink {
        let port = addPort { frame, checksum in tap.transmit(frame, checksum: checksum) }
        return try Uplink(tap: tap, port: port)
    }

    /// The thread that reads a TAP into the switch.
    public final class Uplink: Sendable {
        public let port: Port
        private let wake: WakePipe
        private let stopping = Atomic<Bool>(false)
        private let finished = Atomic<Bool>(false)

        init(tap: TapDevice, port: Port) throws(BackendError) {
            self.port = port
            wake = try WakePipe(for: "switch uplink")
            let thread = Thread { [self] in
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 64)
                defer { buffer.deallocate() }
                while !stopping.load(ordering: .acquiring) {
                    tap.pump(limit: 64) { frame, checksum in
                        buffer.copyMemory(from: frame)
                        _ = port.transmit(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<frame.count]), checksum: checksum)
                        return true
                    }
                    wake.wait(milliseconds: 100, alsoReadable: tap.descriptor)
                }
                finished.store(true, ordering: .releasing)
            }
            thread.name = "vireo-switch-uplink"
            thread.start()
        }

        /// Stops the thread and takes the TAP off the switch. Idempotent.
        public func stop() {
            stopping.store(true, ordering: .releasing)
            wake.kick()
            while !finished.load(ordering: .acquiring) { usleep(1000) }
            port.remove()
        }

        deinit { stop() }
    }
}
