import Synchronization
import Testing
import VireoABI
@testable import VireoStore

/// An in-process client of a store: sends requests, returns replies, collects watch events.
final class TestClient: @unchecked Sendable {
    let store: XenStore
    let connection: XenStoreConnection
    private var nextRequest: UInt32 = 1
    private(set) var events: [XenStoreMessage] = []

    init(_ store: XenStore, domain: DomainID = .zero, privileged: Bool? = nil) {
        self.store = store
        self.connection = store.connect(domain: domain, privileged: privileged)
    }

    /// Sends one request; returns its reply, keeping any events that came with it.
    @discardableResult
    func send(_ message: XenStoreMessage) -> XenStoreMessage {
        var m = message
        m.requestID = nextRequest
        nextRequest += 1
        store.process(m, from: connection)
        var reply: XenStoreMessage?
        for out in connection.takeMessages() {
            if out.type == .watchEvent { events.append(out) } else { reply = out }
        }
        return reply ?? XenStoreMessage(type: .error, payload: Array("no reply".utf8))
    }

    @discardableResult
    func send(_ type: XenStoreMessageType, _ strings: String..., tx: UInt32 = 0) -> XenStoreMessage {
        var payload: [UInt8] = []
        for s in strings { payload += Array(s.utf8); payload.append(0) }
        return send(XenStoreMessage(type: type, transactionID: tx, payload: payload))
    }

    @discardableResult
    func write(_ path: String, _ value: String, tx: UInt32 = 0) -> XenStoreMessage {
        send(XenStoreMessage(type: .write, transactionID: tx, payload: Array(path.utf8) + [0] + Array(value.utf8)))
    }

    func read(_ path: String, tx: UInt32 = 0) -> String? {
        let r = send(.read, path, tx: tx)
        return r.type == .read ? r.text : nil
    }

    func error(_ reply: XenStoreMessage) -> XenStoreError? { reply.error }

    func list(_ path: String) -> [String]? {
        let r = send(.directory, path)
        return r.type == .directory ? r.strings : nil
    }

    func startTransaction() -> UInt32 {
        UInt32(send(.transactionStart, "").text)!
    }

    /// Events received since the last call (flushing the outbox first).
    func takeEvents() -> [(path: String, token: String)] {
        for out in connection.takeMessages() where out.type == .watchEvent { events.append(out) }
        defer { events.removeAll() }
        return events.map { ($0.strings[0], $0.strings[1]) }
    }
}

func isOK(_ reply: XenStoreMessage) -> Bool { reply.type != .error && reply.text == "OK" }
