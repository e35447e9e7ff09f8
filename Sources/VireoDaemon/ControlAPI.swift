import Foundation

/// One HTTP request as the API sees it.
public struct APIRequest: Sendable {
    public var method: String
    public var path: String
    public var query: [String: String]
    public var body: [UInt8]
    public init(method: String, path: String, query: [String: String] = [:], body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.query = query
        self.body = body
    }

    /// Splits a request target (`/v1/store?path=%2Flocal`) into its path and decoded query.
    public init(method: String, target: String, body: [UInt8]) {
        let components = URLComponents(string: target)
        var query: [String: String] = [:]
        for item in components?.queryItems ?? [] { query[item.name] = item.value ?? "" }
        let path = components?.percentEncodedPath ?? target
        self.init(method: method, path: path.removingPercentEncoding ?? path, query: query, body: body)
    }
}

/// One HTTP response: status, content type, body.
public struct APIResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: [UInt8]
    public var headers: [(String, String)] = []
}

/// The control API: routes over ``Daemon``'s methods, JSON in and out, every error a JSON
/// body naming what was wrong. Docs/openapi.yaml describes exactly ``routes``.
public final class ControlAPI: Sendable {
    public let daemon: Daemon

    public init(daemon: Daemon) { self.daemon = daemon }

    /// Every route, as the OpenAPI document names it (method, path template).
    public static let routes: [(method: String, path: String)] = [
        ("GET", "/v1/domains"), ("POST", "/v1/domains"), ("GET", "/v1/domains/{domain}"),
        ("POST", "/v1/domains/{domain}/shutdown"), ("POST", "/v1/domains/{domain}/reboot"),
        ("POST", "/v1/domains/{domain}/destroy"), ("POST", "/v1/domains/{domain}/pause"),
        ("POST", "/v1/domains/{domain}/unpause"), ("GET", "/v1/domains/{domain}/console"),
        ("POST", "/v1/domains/{domain}/console"),
        ("POST", "/v1/domains/{domain}/block-attach"), ("POST", "/v1/domains/{domain}/block-detach"),
        ("GET", "/v1/domains/{domain}/sched-credit"), ("PUT", "/v1/domains/{domain}/sched-credit"),
        ("POST", "/v1/domains/{domain}/network-attach"),
        ("POST", "/v1/domains/{domain}/network-detach"),
        ("GET", "/v1/store"), ("PUT", "/v1/store"), ("GET", "/v1/version"), ("GET", "/metrics"),
    ]

    /// The largest request body accepted (an xl.cfg file is a few hundred bytes).
    public static let maxBody = 1 << 20

    public static let version = "0.1.0-dev"

    public func handle(_ request: APIRequest) -> APIResponse {
        do {
            return try route(request)
        } catch {
            return Self.error(error)
        }
    }

    static func error(_ error: APIError) -> APIResponse {
        var response = json(error.status, ErrorBody(error: error.message, field: error.field))
        if !error.allow.isEmpty { response.headers.append(("Allow", error.allow.joined(separator: ", "))) }
        return response
    }

    static func json<T: Encodable>(_ status: Int, _ value: T) -> APIResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        let body = (try? encoder.encode(value)).map { Array($0) + [0x0A] } ?? Array("{\"error\":\"encoding failed\"}\n".utf8)
        return APIResponse(status: status, contentType: "application/json", body: body)
    }

    private func decode<T: Decodable>(_ type: T.Type, _ body: [UInt8]) throws(APIError) -> T {
        guard !body.isEmpty else { throw .badRequest("the request needs a JSON body", field: "body") }
        do {
            return try JSONDecoder().decode(type, from: Data(body))
        } catch let DecodingError.keyNotFound(key, _) {
            throw .badRequest("missing field '\(key.stringValue)'", field: key.stringValue)
        } catch let DecodingError.typeMismatch(_, context) {
            let field = context.codingPath.map(\.stringValue).joined(separator: ".")
            throw .badRequest("field '\(field)' has the wrong type: \(context.debugDescription)", field: field)
        } catch let DecodingError.valueNotFound(_, context) {
            let field = context.codingPath.map(\.stringValue).joined(separator: ".")
            throw .badRequest("field '\(field)' must not be null", field: field)
        } catch {
            throw .badRequest("the body is not valid JSON", field: "body")
        }
    }

    /// A detach's `?timeout=S`: how long the frontend has to close (0 forces at once).
    static func detachTimeout(_ request: APIRequest) throws(APIError) -> Double {
        guard let text = request.query["timeout"] else { return Daemon.detachTimeout }
        guard let value = Double(text), value >= 0, value <= 3600 else {
            throw .badRequest("timeout '\(text)': give seconds, 0 to 3600", field: "timeout")
        }
        return value
    }

    /// A detach's answer: the domain, and `Vireo-Detach: closed` or `forced` saying how it went.
    static func detached(_ result: (DomainInfo, Daemon.Detach)) -> APIResponse {
        var response = json(200, result.0)
        response.headers.append(("Vireo-Detach", result.1.rawValue))
        return response
    }

    private func route(_ request: APIRequest) throws(APIError) -> APIResponse {
        let parts = request.path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        // "/v1/domains/x" → ["", "v1", "domains", "x"]
        guard parts.first == "", parts.count >= 2 else { throw .notFound("no route \(request.method) \(request.path)") }
        let tail = Array(parts.dropFirst())
        let method = request.method
        func allow(_ methods: String...) throws(APIError) {
            guard methods.contains(method) else {
                throw APIError(405, "\(method) is not allowed on \(request.path); use \(methods.joined(separator: " or "))", allow: methods)
            }
        }
        switch tail.count {
        case 1 where tail[0] == "metrics":
            try allow("GET")
            return APIResponse(status: 200, contentType: "text/plain; version=0.0.4", body: Array(daemon.metrics().utf8))
        case 2 where tail == ["v1", "version"]:
            try allow("GET")
            return Self.json(200, ["version": Self.version, "api": "v1"])
        case 2 where tail == ["v1", "domains"]:
            try allow("GET", "POST")
            if method == "GET" { return Self.json(200, daemon.list()) }
            let body = try decode(CreateRequest.self, request.body)
            let (info, warnings) = try daemon.create(config: body.config, file: body.file)
            return Self.json(201, CreateResponse(domain: info, warnings: warnings))
        case 2 where tail == ["v1", "store"]:
            try allow("GET", "PUT")
            if method == "GET" {
                guard let path = request.query["path"] else { throw .badRequest("give ?path=/a/xenstore/path", field: "path") }
                return Self.json(200, try daemon.storeRead(path: path))
            }
            let body = try decode(StoreNode.self, request.body)
            guard let value = body.value else { throw .badRequest("missing field 'value'", field: "value") }
            return Self.json(200, try daemon.storeWrite(path: body.path, value: value))
        case 3 where tail[0] == "v1" && tail[1] == "domains" && !tail[2].isEmpty:
            try allow("GET")
            return Self.json(200, try daemon.info(tail[2]))
        case 4 where tail[0] == "v1" && tail[1] == "domains" && !tail[2].isEmpty:
            let domain = tail[2]
            switch tail[3] {
            case "console":
                try allow("GET", "POST")
                if method == "POST" {
                    let body = try decode(ConsoleInput.self, request.body)
                    return Self.json(200, ConsoleInputAccepted(accepted: try daemon.consoleWrite(domain, Array(body.input.utf8))))
                }
                var offset: UInt64?
                if let text = request.query["offset"] {
                    guard let value = UInt64(text) else { throw .badRequest("offset '\(text)': give a byte offset (0 or more)", field: "offset") }
                    offset = value
                }
                return Self.json(200, try daemon.console(domain, offset: offset))
            case "shutdown":
                try allow("POST")
                var timeout: Double?
                if let text = request.query["timeout"] {
                    guard let value = Double(text), value >= 0, value <= 86400 else {
                        throw .badRequest("timeout '\(text)': give seconds, 0 to 86400", field: "timeout")
                    }
                    timeout = value
                }
                return Self.json(202, try daemon.shutdown(domain, timeout: timeout))
            case "reboot":
                try allow("POST")
                return Self.json(202, try daemon.reboot(domain))
            case "destroy":
                try allow("POST")
                return Self.json(200, try daemon.destroy(domain))
            case "pause":
                try allow("POST")
                return Self.json(200, try daemon.pause(domain))
            case "unpause":
                try allow("POST")
                return Self.json(200, try daemon.unpause(domain))
            case "block-attach":
                try allow("POST")
                let body = try decode(BlockAttachRequest.self, request.body)
                return Self.json(200, try daemon.blockAttach(domain, disk: body.disk))
            case "block-detach":
                try allow("POST")
                let body = try decode(BlockDetachRequest.self, request.body)
                return Self.detached(try daemon.blockDetach(domain, vdev: body.vdev, timeout: try Self.detachTimeout(request)))
            case "network-attach":
                try allow("POST")
                let body = try decode(NetworkAttachRequest.self, request.body)
                return Self.json(200, try daemon.networkAttach(domain, vif: body.vif))
            case "network-detach":
                try allow("POST")
                let body = try decode(NetworkDetachRequest.self, request.body)
                return Self.detached(try daemon.networkDetach(domain, device: body.device, timeout: try Self.detachTimeout(request)))
            case "sched-credit":
                try allow("GET", "PUT")
                if method == "GET" { return Self.json(200, try daemon.schedCredit(domain)) }
                let body = try decode(SchedCreditRequest.self, request.body)
                return Self.json(200, try daemon.setSchedCredit(domain, weight: body.weight, cap: body.cap))
            default:
                throw .notFound("no route \(method) \(request.path)")
            }
        default:
            throw .notFound("no route \(method) \(request.path)")
        }
    }
}
