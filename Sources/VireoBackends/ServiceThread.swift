import Foundation

/// A named thread for a backend's service loop (a block queue's ring), started at once.
enum ServiceThread {
    static func start(name: String, _ body: @escaping @Sendable () -> Void) {
        let thread = Thread(block: body)
        thread.name = name
        thread.start()
    }
}
