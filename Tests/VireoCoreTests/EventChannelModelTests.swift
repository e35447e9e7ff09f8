import Testing
import VireoABI
@testable import VireoCore

/// A plain model of event channels: each port's binding, and the 2-level bits as sets and
/// flags. No memory, no atomics, no locks: the specification the hub is checked against.
struct EventModel {
    enum Binding: Equatable {
        case unbound(DomainID)
        case interdomain(DomainID, Int)
        case virq(VirtualIRQ)
        case ipi
    }
    struct Port { var binding: Binding; var vcpu: Int }
    struct Domain {
        let id: DomainID, vcpus: Int, limit: Int, privileged: Bool
        var ports: [Int: Port] = [:]
        var virqs: [Int: Int] = [:]
        var pending = Set<Int>(), masked = Set<Int>()
        var selector: [UInt64], upcallFlag: [Bool], upcalls: [Int]
        init(id: DomainID, vcpus: Int, limit: Int, privileged: Bool) {
            (self.id, self.vcpus, self.limit, self.privileged) = (id, vcpus, limit, privileged)
            selector = Array(repeating: 0, count: vcpus)
            upcallFlag = Array(repeating: false, count: vcpus)
            upcalls = Array(repeating: 0, count: vcpus)
        }
    }
    var domains: [DomainID: Domain] = [:]

    private func resolve(_ dom: DomainID, _ caller: DomainID) -> DomainID { dom == .calling ? caller : dom }

    private func freePort(_ d: DomainID) throws(XenError) -> Int {
        for port in 1..<max(domains[d]!.limit, 1) where domains[d]!.ports[port] == nil { return port }
        throw .ENOSPC
    }

    private mutating func raise(_ d: DomainID, word: Int, vcpu: Int) {
        let bit = UInt64(1) << UInt64(word)
        guard domains[d]!.selector[vcpu] & bit == 0 else { return }
        domains[d]!.selector[vcpu] |= bit
        guard !domains[d]!.upcallFlag[vcpu] else { return }
        domains[d]!.upcallFlag[vcpu] = true
        domains[d]!.upcalls[vcpu] += 1
    }

    private mutating func mark(_ d: DomainID, _ port: Int) {
        let vcpu = domains[d]!.ports[port]!.vcpu
        guard domains[d]!.pending.insert(port).inserted, !domains[d]!.masked.contains(port) else { return }
        raise(d, word: port / 64, vcpu: vcpu)
    }

    private func slot(_ virq: VirtualIRQ, _ vcpu: Int) -> Int { (virq.isPerVcpu ? vcpu : 0) * 100 + Int(virq.rawValue) }

    mutating func allocUnbound(_ c: DomainID, _ dom: DomainID, _ remote: DomainID) throws(XenError) -> EventPort {
        let d = resolve(dom, c)
        guard domains[d] != nil else { throw .ESRCH }
        guard d == c || domains[c]!.privileged else { throw .EPERM }
        let port = try freePort(d)
        domains[d]!.ports[port] = Port(binding: .unbound(resolve(remote, c)), vcpu: 0)
        return EventPort(UInt32(port))
    }

    mutating func bindInterdomain(_ c: DomainID, _ rdom: DomainID, _ rport: EventPort) throws(XenError) -> EventPort {
        let r = resolve(rdom, c)
        guard domains[r] != nil else { throw .ESRCH }
        guard rport.rawValue < UInt32(domains[r]!.limit) else { throw .EINVAL }
        let rp = Int(rport.rawValue)
        let local = try freePort(c)
        guard domains[r]!.ports[rp]?.binding == .unbound(c) else { throw .EINVAL }
        domains[r]!.ports[rp]!.binding = .interdomain(c, local)
        domains[c]!.ports[local] = Port(binding: .interdomain(r, rp), vcpu: 0)
        mark(c, local)
        return EventPort(UInt32(local))
    }

    mutating func bindVirq(_ c: DomainID, _ virq: VirtualIRQ, _ vcpu: UInt32) throws(XenError) -> EventPort {
        guard virq.isValid, virq.isPerVcpu || vcpu == 0 else { throw .EINVAL }
        guard vcpu < UInt32(domains[c]!.vcpus) else { throw .ENOENT }
        guard domains[c]!.virqs[slot(virq, Int(vcpu))] == nil else { throw .EEXIST }
        let port = try freePort(c)
        domains[c]!.ports[port] = Port(binding: .virq(virq), vcpu: Int(vcpu))
        domains[c]!.virqs[slot(virq, Int(vcpu))] = port
        return EventPort(UInt32(port))
    }

    mutating func bindIPI(_ c: DomainID, _ vcpu: UInt32) throws(XenError) -> EventPort {
        guard vcpu < UInt32(domains[c]!.vcpus) else { throw .ENOENT }
        let port = try freePort(c)
        domains[c]!.ports[port] = Port(binding: .ipi, vcpu: Int(vcpu))
        return EventPort(UInt32(port))
    }

    private func bound(_ c: DomainID, _ port: EventPort) throws(XenError) -> (Int, Port) {
        guard port.rawValue < UInt32(domains[c]!.limit) else { throw .EINVAL }
        guard let p = domains[c]!.ports[Int(port.rawValue)] else { throw .EINVAL }
        return (Int(port.rawValue), p)
    }

    mutating func close(_ c: DomainID, _ port: EventPort) throws(XenError) {
        let (index, p) = try bound(c, port)
        switch p.binding {
        case .virq(let virq): domains[c]!.virqs[slot(virq, p.vcpu)] = nil
        case .interdomain(let peer, let peerPort): domains[peer]!.ports[peerPort]!.binding = .unbound(c)
        case .unbound, .ipi: break
        }
        domains[c]!.ports[index] = nil
        domains[c]!.pending.remove(index)
    }

    mutating func send(_ c: DomainID, _ port: EventPort) throws(XenError) {
        let (index, p) = try bound(c, port)
        switch p.binding {
        case .ipi: mark(c, index)
        case .interdomain(let peer, let peerPort): mark(peer, peerPort)
        case .unbound: break
        case .virq: throw .EINVAL
        }
    }

    func status(_ c: DomainID, _ dom: DomainID, _ port: EventPort) throws(XenError) -> EventChannelStatus {
        let d = resolve(dom, c)
        guard domains[d] != nil else { throw .ESRCH }
        guard d == c || domains[c]!.privileged else { throw .EPERM }
        guard port.rawValue < UInt32(domains[d]!.limit) else { throw .EINVAL }
        guard let p = domains[d]!.ports[Int(port.rawValue)] else { return .init(binding: .closed, vcpu: 0) }
        let binding: EventChannelStatus.Binding = switch p.binding {
        case .unbound(let r): .unbound(remote: r)
        case .interdomain(let r, let rp): .interdomain(remote: r, port: EventPort(UInt32(rp)))
        case .virq(let v): .virq(v)
        case .ipi: .ipi
        }
        return .init(binding: binding, vcpu: UInt32(p.vcpu))
    }

    mutating func unmask(_ c: DomainID, _ port: EventPort) throws(XenError) {
        guard port.rawValue < UInt32(domains[c]!.limit) else { throw .EINVAL }
        let index = Int(port.rawValue)
        guard domains[c]!.masked.remove(index) != nil, domains[c]!.pending.contains(index) else { return }
        raise(c, word: index / 64, vcpu: domains[c]!.ports[index]?.vcpu ?? 0)
    }

    mutating func bindVcpu(_ c: DomainID, _ port: EventPort, _ vcpu: UInt32) throws(XenError) {
        guard vcpu < UInt32(domains[c]!.vcpus) else { throw .ENOENT }
        let (index, p) = try bound(c, port)
        switch p.binding {
        case .unbound, .interdomain: break
        case .virq(let virq) where !virq.isPerVcpu: break
        case .virq, .ipi: throw .EINVAL
        }
        domains[c]!.ports[index]!.vcpu = Int(vcpu)
    }

    mutating func raiseVirq(_ d: DomainID, _ virq: VirtualIRQ, _ vcpu: Int?) throws(XenError) -> Bool {
        guard domains[d] != nil else { throw .ESRCH }
        guard virq.isValid else { throw .EINVAL }
        var row = 0
        if virq.isPerVcpu {
            guard let vcpu else { throw .EINVAL }
            guard vcpu >= 0, vcpu < domains[d]!.vcpus else { throw .ENOENT }
            row = vcpu
        }
        guard let port = domains[d]!.virqs[slot(virq, row)] else { return false }
        mark(d, port)
        return true
    }

    mutating func guestMask(_ d: DomainID, _ port: Int) { domains[d]!.masked.insert(port) }

    mutating func guestUnmask(_ d: DomainID, _ port: Int) -> Bool {
        domains[d]!.masked.remove(port)
        guard domains[d]!.pending.contains(port) else { return false }
        domains[d]!.masked.insert(port)
        return true
    }

    mutating func guestScan(_ d: DomainID, _ vcpu: Int) -> [EventPort] {
        domains[d]!.upcallFlag[vcpu] = false
        let selector = domains[d]!.selector[vcpu]
        domains[d]!.selector[vcpu] = 0
        var out: [EventPort] = []
        for word in 0..<64 where selector & (UInt64(1) << UInt64(word)) != 0 {
            let taken = domains[d]!.pending.filter { $0 / 64 == word && !domains[d]!.masked.contains($0) }.sorted()
            for port in taken {
                domains[d]!.pending.remove(port)
                out.append(EventPort(UInt32(port)))
            }
        }
        return out
    }
}

/// Seeded random sequences of operations on three domains, run on the hub and on the model
/// side by side: every result, every port's status, every 2-level bit and every upcall count
/// must agree after every step.
@Suite struct EventChannelModelTests {
    struct Setup {
        let id: UInt16, vcpus: Int, limit: Int, privileged: Bool
    }
    static let setups = [
        Setup(id: 0, vcpus: 2, limit: 16, privileged: true),
        Setup(id: 1, vcpus: 2, limit: 20, privileged: false),
        Setup(id: 2, vcpus: 2, limit: 140, privileged: false),  // spans three bitmap words
    ]

    @Test(arguments: 1...24)
    func randomOperationsMatchTheModel(seed: Int) throws {
        let hub = EventChannels()
        var model = EventModel()
        var guests: [EventTestDomain] = []
        for s in Self.setups {
            guests.append(try EventTestDomain(hub, id: s.id, vcpus: s.vcpus, portLimit: s.limit, privileged: s.privileged))
            model.domains[DomainID(s.id)] = .init(id: DomainID(s.id), vcpus: s.vcpus, limit: s.limit, privileged: s.privileged)
        }
        var rng = SeededGenerator(seed: UInt64(seed))
        let ids = guests.map(\.id)
        let domainArguments = ids + [.calling, DomainID(9)]

        func compare<T: Equatable>(_ real: Result<T, XenError>, _ expected: Result<T, XenError>, _ what: String) -> Bool {
            guard real != expected else { return true }
            Issue.record("seed \(seed): \(what): hub \(real), model \(expected)")
            return false
        }
        /// Every port's status, every bit and every upcall count agree.
        func check(step: Int, after what: String) -> Bool {
            for guest in guests {
                let m = model.domains[guest.id]!
                for port in 0..<m.limit {
                    let p = EventPort(UInt32(port))
                    let real = try? hub.status(caller: ids[0], domain: guest.id, port: p)
                    let expected = try? model.status(ids[0], guest.id, p)
                    guard real == expected else {
                        Issue.record("seed \(seed) step \(step) after \(what): \(guest.id) \(p) is \(String(describing: real)), model \(String(describing: expected))")
                        return false
                    }
                    guard guest.events.isPending(p) == m.pending.contains(port), guest.events.isMasked(p) == m.masked.contains(port) else {
                        Issue.record("seed \(seed) step \(step) after \(what): \(guest.id) \(p) pending/mask bits differ from the model")
                        return false
                    }
                }
                for vcpu in 0..<m.vcpus {
                    let info = guest.events.vcpuInfo(vcpu)!
                    let selector = info.loadAcquire64(at: TwoLevelLayout.pendingSelOffset)
                    let flag = info.loadAcquire8(at: TwoLevelLayout.upcallPendingOffset) != 0
                    guard selector == m.selector[vcpu], flag == m.upcallFlag[vcpu], guest.upcalls.count(vcpu) == m.upcalls[vcpu] else {
                        Issue.record("""
                            seed \(seed) step \(step) after \(what): \(guest.id) vCPU \(vcpu) selector \(selector) flag \(flag) \
                            upcalls \(guest.upcalls.count(vcpu)); model \(m.selector[vcpu]) \(m.upcallFlag[vcpu]) \(m.upcalls[vcpu])
                            """)
                        return false
                    }
                }
            }
            return true
        }

        // Domain 2 starts with many IPI ports so that later ports land in other bitmap words.
        for _ in 0..<70 {
            let vcpu = UInt32.random(in: 0...1, using: &rng)
            _ = compare(outcome { () throws(XenError) in try hub.bindIPI(caller: ids[2], vcpu: vcpu) },
                        outcome { () throws(XenError) in try model.bindIPI(ids[2], vcpu) }, "bindIPI")
        }

        for step in 0..<500 {
            let c = ids.randomElement(using: &rng)!
            let limit = model.domains[c]!.limit
            // Mostly ports the caller has bound, sometimes any number (free, 0, beyond the limit).
            let boundPorts = Array(model.domains[c]!.ports.keys)
            let port = Int.random(in: 0..<10, using: &rng) < 7 && !boundPorts.isEmpty
                ? EventPort(UInt32(boundPorts.randomElement(using: &rng)!))
                : EventPort(UInt32.random(in: 0..<UInt32(limit + 2), using: &rng))
            // Mostly real domains, sometimes DOMID_SELF or one that does not exist.
            let dom = Int.random(in: 0..<10, using: &rng) < 7 ? ids.randomElement(using: &rng)! : domainArguments.randomElement(using: &rng)!
            let vcpu = UInt32.random(in: 0...2, using: &rng)
            let virq = VirtualIRQ(Bool.random(using: &rng) ? UInt32.random(in: 0...3, using: &rng) : UInt32.random(in: 0...30, using: &rng))
            let what: String
            var same = true
            switch Int.random(in: 0..<16, using: &rng) {
            case 0, 14:
                what = "allocUnbound(\(c), \(dom), remote)"
                let remote = Bool.random(using: &rng) ? ids.randomElement(using: &rng)! : domainArguments.randomElement(using: &rng)!
                same = compare(outcome { () throws(XenError) in try hub.allocUnbound(caller: c, in: dom, remote: remote) },
                               outcome { () throws(XenError) in try model.allocUnbound(c, dom, remote) }, what)
            case 1, 2:
                // Mostly a port that is waiting for the caller, so connections happen.
                var target = dom, remotePort = port
                if let (d, p) = model.domains.values.flatMap({ d in d.ports.compactMap { $0.value.binding == .unbound(c) ? (d.id, $0.key) : nil } })
                    .randomElement(using: &rng), Int.random(in: 0..<4, using: &rng) > 0 {
                    (target, remotePort) = (d, EventPort(UInt32(p)))
                }
                what = "bindInterdomain(\(c), \(target), \(remotePort))"
                same = compare(outcome { () throws(XenError) in try hub.bindInterdomain(caller: c, remoteDomain: target, remotePort: remotePort) },
                               outcome { () throws(XenError) in try model.bindInterdomain(c, target, remotePort) }, what)
            case 3:
                what = "bindVirq(\(c), \(virq), \(vcpu))"
                same = compare(outcome { () throws(XenError) in try hub.bindVirq(caller: c, virq: virq, vcpu: vcpu) },
                               outcome { () throws(XenError) in try model.bindVirq(c, virq, vcpu) }, what)
            case 4:
                what = "bindIPI(\(c), \(vcpu))"
                same = compare(outcome { () throws(XenError) in try hub.bindIPI(caller: c, vcpu: vcpu) },
                               outcome { () throws(XenError) in try model.bindIPI(c, vcpu) }, what)
            case 5, 15:
                what = "close(\(c), \(port))"
                same = compare(outcome { () throws(XenError) in try hub.close(caller: c, port: port) }.map { 0 },
                               outcome { () throws(XenError) in try model.close(c, port) }.map { 0 }, what)
            case 6, 7:
                what = "send(\(c), \(port))"
                same = compare(outcome { () throws(XenError) in try hub.send(caller: c, port: port) }.map { 0 },
                               outcome { () throws(XenError) in try model.send(c, port) }.map { 0 }, what)
            case 8:
                what = "unmask(\(c), \(port))"
                same = compare(outcome { () throws(XenError) in try hub.unmask(caller: c, port: port) }.map { 0 },
                               outcome { () throws(XenError) in try model.unmask(c, port) }.map { 0 }, what)
            case 9:
                what = "bindVcpu(\(c), \(port), \(vcpu))"
                same = compare(outcome { () throws(XenError) in try hub.bindVcpu(caller: c, port: port, vcpu: vcpu) }.map { 0 },
                               outcome { () throws(XenError) in try model.bindVcpu(c, port, vcpu) }.map { 0 }, what)
            case 10:
                let target = Int.random(in: 0..<10, using: &rng) < 8 ? c : domainArguments.randomElement(using: &rng)!
                let which: Int? = Bool.random(using: &rng) ? Int(vcpu) : nil
                what = "raiseVirq(\(target), \(virq), \(String(describing: which)))"
                same = compare(outcome { () throws(XenError) in try hub.raiseVirq(in: target, virq: virq, vcpu: which) },
                               outcome { () throws(XenError) in try model.raiseVirq(target, virq, which) }, what)
            case 11:
                what = "status(\(c), \(dom), \(port))"
                same = compare(outcome { () throws(XenError) in try hub.status(caller: c, domain: dom, port: port) },
                               outcome { () throws(XenError) in try model.status(c, dom, port) }, what)
            case 12:
                // The guest masks or unmasks one of its ports (asking the host when it must).
                let index = guests.firstIndex { $0.id == c }!
                let p = EventPort(UInt32.random(in: 0..<UInt32(limit), using: &rng))
                if Bool.random(using: &rng) {
                    what = "guest \(c) masks \(p)"
                    guests[index].events.mask(p)
                    model.guestMask(c, Int(p.rawValue))
                } else {
                    what = "guest \(c) unmasks \(p)"
                    let ask = guests[index].events.unmask(p)
                    same = compare(.success(ask), .success(model.guestUnmask(c, Int(p.rawValue))), what)
                    if ask {
                        try hub.unmask(caller: c, port: p)
                        try model.unmask(c, p)
                    }
                }
            default:
                let index = guests.firstIndex { $0.id == c }!
                let v = Int(vcpu % 2)
                what = "guest \(c) scans vCPU \(v)"
                same = compare(.success(guests[index].events.scanPending(vcpu: v)), .success(model.guestScan(c, v)), what)
            }
            guard same, check(step: step, after: what) else { return }
        }
        #expect(hub.invariantViolations() == [])

    }
}
