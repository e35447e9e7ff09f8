// netecho: an echo host on the paravirtual network. It connects GuestKit's NetFrontend to vif 0
// and answers ARP requests for its IPv4 address, ICMP echo requests and UDP datagrams (echoed
// back to the sender, on any port or on `port=N` only), with correct checksums.
//
// Command line (space-separated, all optional):
//   ip=10.0.0.2        its IPv4 address (default 10.0.0.2)
//   mac=aa:bb:..:ff    its MAC address (default: the vif's `mac` from the XenStore)
//   port=N             echo UDP on port N only (default: every port)
//   count=N            power off after answering N requests (ARP, ICMP and UDP alike) and
//                      printing a summary; without it, it runs until the domain is destroyed
//   ping=A.B.C.D       first ask: resolve A.B.C.D by ARP and send it `pings=N` (default 3)
//                      ICMP echo requests, resending every 200 ms (for up to 30 s); print
//                      "netecho: ping A.B.C.D: N/N replies" and power off (a crash when
//                      replies are missing). It answers requests meanwhile, as always.
//   grants=static      ask the backend to hold its copy buffers and receive pages mapped
//                      (Xen's static grants, over the control ring) instead of granting each
//                      page per packet (grants=copy, the default)
//
// It prints "netecho: vif0 connected, mac M, ip A" once connected (with ", static grants held"
// or ", static grants refused" after grants=static), a counter line every 16
// packets received, and "netecho: done, ..." before a count= exit.
import GuestKit
import VireoABI
import VireoGuestRuntime
import VireoHypercalls

let guest = PVHGuest()

func say(_ text: String) {
    try? guest.consoleIOWrite(Array(text.utf8))
}

func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

/// The command line's `key=value` words.
struct Options {
    var ip = IPv4Address(10, 0, 0, 2)
    var mac: MACAddress?
    var port: UInt16?
    var count: UInt64?
    var ping: IPv4Address?
    var pings: UInt64 = 3
    var staticGrants = false
    var bad: [UInt8]?

    init(_ line: [UInt8]) {
        var word: [UInt8] = []
        for byte in line + [32] {
            if byte == 32 || byte == 9 || byte == 10 {
                if !word.isEmpty { take(word) }
                word = []
            } else {
                word.append(byte)
            }
        }
    }

    static func value(_ word: [UInt8], _ key: StaticString) -> [UInt8]? {
        let name = Bytes.of(key)
        guard word.count > name.count, word[name.count] == 61, Bytes.equal(Array(word[0..<name.count]), key) else { return nil }
        return Array(word[(name.count + 1)...])
    }

    mutating func take(_ word: [UInt8]) {
        if let v = Self.value(word, "ip"), let address = IPv4Address(text: v) {
            ip = address
        } else if let v = Self.value(word, "mac"), let address = MACAddress(text: v) {
            mac = address
        } else if let v = Self.value(word, "port"), let n = Bytes.decimal(v), n <= 65535 {
            port = UInt16(n)
        } else if let v = Self.value(word, "count"), let n = Bytes.decimal(v) {
            count = n
        } else if let v = Self.value(word, "ping"), let address = IPv4Address(text: v) {
            ping = address
        } else if let v = Self.value(word, "pings"), let n = Bytes.decimal(v), n >= 1, n <= 64 {
            pings = n
        } else if let v = Self.value(word, "grants"), Bytes.equal(v, "static") || Bytes.equal(v, "copy") {
            staticGrants = Bytes.equal(v, "static")
        } else {
            bad = word
        }
    }
}

func run() throws(GuestError) {
    var options = Options(Array(String(cString: vireo_guest_cmdline()).utf8))
    if let bad = options.bad {
        say("netecho: ignoring '\(text(bad))' (give ip=A.B.C.D mac=M port=N count=N grants=static|copy)\n")
    }
    try guest.mapSharedInfo()
    let store = try XenStoreClient(guest: guest)
    let net: NetFrontend<PVHPlatform>
    do {
        net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest), staticGrants: options.staticGrants)
    } catch {
        if error == .ENOENT { say("netecho: no network device (device/vif/0 is missing)\n") }
        throw error
    }
    try net.connect()
    let mac = options.mac ?? net.mac
    options.mac = mac
    let held = !options.staticGrants ? "" : net.staticGrantsHeld ? ", static grants held" : ", static grants refused"
    say("netecho: vif0 connected, mac \(text(mac.text)), ip \(text(options.ip.text))\(held)\n")

    if let peer = options.ping { return try ping(peer, count: Int(options.pings), net: net, mac: mac, ip: options.ip, port: options.port) }

    var answered: UInt64 = 0, arp: UInt64 = 0, icmp: UInt64 = 0, udp: UInt64 = 0, ignored: UInt64 = 0
    var received: UInt64 = 0
    func counters() -> String {
        "rx \(received) tx \(net.packetsSent) arp \(arp) icmp \(icmp) udp \(udp) ignored \(ignored) errors \(net.receiveErrors + net.transmitErrors)"
    }
    var replies: [[UInt8]] = []
    while true {
        let got = try net.poll { packet in
            received += 1
            if let (reply, kind) = Packets.echoReply(to: packet.bytes, mac: mac, ip: options.ip, udpPort: options.port,
                                                     checksumBlank: packet.checksumBlank) {
                replies.append(reply)
                switch kind {
                case .arp: arp += 1
                case .icmp: icmp += 1
                case .udp: udp += 1
                }
            } else {
                ignored += 1
            }
            if received % 16 == 0 { say("netecho: \(counters())\n") }
        }
        // Replies go out after the receive pass, never from inside it.
        for reply in replies {
            try net.send(reply)
            answered += 1
            if let count = options.count, answered >= count { break }
        }
        replies = []
        if let count = options.count, answered >= count { break }
        if got == 0 { try net.waitForEvents() }
    }
    // Let the last replies leave (their slots answered) before powering off.
    while net.transmitsInFlight > 0 {
        try net.waitForEvents()
        _ = try net.freeTransmitSlots()
    }
    say("netecho: done, \(counters())\n")
}

/// The asking side: ARP for `peer`, then `count` echo requests, each resent every 200 ms until
/// answered (at most 150 rounds, 30 s); requests to us are answered meanwhile.
func ping(_ peer: IPv4Address, count: Int, net: NetFrontend<PVHPlatform>, mac: MACAddress, ip: IPv4Address,
          port: UInt16?) throws(GuestError) {
    let identifier: UInt16 = 0x7669
    let timer = try guest.bindVirq(UInt32(VIREO_VIRQ_TIMER))
    var tick = true  // the first round goes out at once
    guest.setHandler(for: timer) { _ in tick = true }
    var peerMAC: MACAddress?
    var answered = [Bool](repeating: false, count: count)
    var replies = 0, rounds = 0
    var outgoing: [[UInt8]] = []
    while replies < count && rounds <= 150 {
        let got = try net.poll { packet in
            if peerMAC == nil, let learned = Packets.arpReplySender(packet.bytes, target: peer, ip: ip) {
                peerMAC = learned
                tick = true  // ping now rather than at the next round
            } else if let sequence = Packets.icmpEchoReplySequence(packet.bytes, from: peer, to: ip, identifier: identifier) {
                if Int(sequence) < count && !answered[Int(sequence)] {
                    answered[Int(sequence)] = true
                    replies += 1
                }
            } else if let (reply, _) = Packets.echoReply(to: packet.bytes, mac: mac, ip: ip, udpPort: port,
                                                          checksumBlank: packet.checksumBlank) {
                outgoing.append(reply)
            }
        }
        if tick {
            tick = false
            rounds += 1
            if let peerMAC {
                for sequence in 0..<count where !answered[sequence] {
                    outgoing.append(Packets.icmpEchoRequest(from: mac, ip: ip, to: peerMAC, peer, identifier: identifier,
                                                            sequence: UInt16(sequence)))
                }
            } else {
                outgoing.append(Packets.arpRequest(from: mac, ip: ip, asking: peer))
            }
            try guest.setTimer(deadline: guest.systemTime() + 200_000_000)
        }
        for frame in outgoing { _ = try net.send(frame) }
        outgoing = []
        if got == 0 && !tick && replies < count { try net.waitForEvents() }
    }
    while net.transmitsInFlight > 0 {
        try net.waitForEvents()
        _ = try net.freeTransmitSlots()
    }
    say("netecho: ping \(text(peer.text)): \(replies)/\(count) replies\n")
    if replies < count { throw GuestError.EIO }
}

do {
    try run()
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
} catch {
    say("netecho: FAIL error \(error.code)\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
