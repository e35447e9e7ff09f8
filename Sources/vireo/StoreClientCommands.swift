import ArgumentParser
import Foundation
import VireoDaemon

/// `vireo store ls PATH`: a node's children in vireod's XenStore, with their values.
struct StoreListCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "ls", abstract: "List a node of vireod's XenStore (children and values).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "An absolute XenStore path.") var path: String = "/"

    func run() throws {
        let node = try read(path)
        for child in node.children ?? [] {
            let full = path == "/" ? "/\(child)" : "\(path)/\(child)"
            let value = (try? read(full))?.value ?? ""
            print("\(child) = \"\(value)\"")
        }
    }

    func read(_ path: String) throws -> StoreNode {
        try decode(StoreNode.self, try call("GET", "/v1/store?path=\(Self.escape(path))"))
    }
}

/// `vireo store read PATH`: a node's value.
struct StoreReadCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "read", abstract: "Print a value from vireod's XenStore.")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "An absolute XenStore path.") var path: String

    func run() throws {
        print(try decode(StoreNode.self, try call("GET", "/v1/store?path=\(Self.escape(path))")).value ?? "")
    }
}

/// `vireo store write PATH VALUE`: writes a node as the toolstack (dom0).
struct StoreWriteCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "write", abstract: "Write a value into vireod's XenStore (as dom0).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "An absolute XenStore path.") var path: String
    @Argument(help: "The value.") var value: String

    func run() throws {
        let body = try JSONEncoder().encode(StoreNode(path: path, value: value, children: nil))
        _ = try call("PUT", "/v1/store", body: Array(body))
    }
}
