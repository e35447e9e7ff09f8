// The backend of Docs/writing-a-driver.md's device, "vrng": random bytes for a guest.
import VireoABI
import VireoBackends
import VireoCore

/// A request: fill the first `length` bytes of the page the guest granted as `gref`.
struct RandomRequest { var id: UInt32; var gref: UInt32; var length: UInt32; var reserved: UInt32 }
/// Its answer: the bytes written, or -1 when the request was refused.
struct RandomResponse { var id: UInt32; var status: Int32 }

/// vrng's backend: a ring of requests, each answered with bytes from `source` (the host's
/// system's random generator unless a test gives another), copied into the guest's page by grant copy.
final class RandomDevice: XenbusDevice {
    let kind = "vrng"
    let backendNodes = [(key: "max-length", value: "4096")]
    let frontendNodes: [(key: String, value: String)] = []
    let source: (UnsafeMutableRawBufferPointer) -> Void
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)

    init(source: @escaping (UnsafeMutableRawBufferPointer) -> Void = { for i in $0.indices { $0[i] = .random(in: 0...255) } }) {
        self.source = source
    }
    deinit { buffer.deallocate() }

    struct Connection {
        let link: FrontendLink
        let ring: MappedBackRing<RandomRequest, RandomResponse>
        let port: EventPort
    }

    func connect(_ frontend: FrontendLink) throws(BackendError) -> Connection {
        Connection(link: frontend, ring: try frontend.mapRing("ring-ref"), port: try frontend.bindEvent("event-channel"))
    }

    func serve(_ connection: Connection) throws(BackendError) {
        let link = connection.link
        try connection.ring.serve(notifying: connection.port, from: link.host) { request, response in
            response.set(\.id, to: request.id)
            // The request is our own copy, never reread from the ring: check it, then act on it.
            guard request.length <= 4096 else { return response.set(\.status, to: -1) }
            let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(request.length)])
            source(bytes)
            let copied = link.copy(UnsafeRawBufferPointer(bytes), toGrant: GrantRef(request.gref))
            response.set(\.status, to: copied == .okay ? Int32(request.length) : -1)
        }
    }

    func disconnect(_ connection: Connection) {
        try? connection.link.host.close(connection.port)
    }
}
