import Foundation
import Synchronization
import VireoABI
@testable import VireoCore

/// Counts the upcalls a domain's hook receives, per vCPU.
final class UpcallLog: Sendable {
    private let counts: Mutex<[Int]>
    init(vcpus: Int) { counts = Mutex(Array(repeating: 0, count: vcpus)) }
    func record(_ vcpu: Int) { counts.withLock { $0[vcpu] += 1 } }
    func count(_ vcpu: Int = 0) -> Int { counts.withLock { $0[vcpu] } }
    var all: [Int] { counts.withLock { $0 } }
    var total: Int { all.reduce(0, +) }
}

/// An event-only test domain: real guest memory whose special frame 0 is its shared_info, registered
/// with a hub, plus the guest's view of its event bits.
struct EventTestDomain {
    let id: DomainID
    let memory: GuestMemory
    let upcalls: UpcallLog
    var events: GuestEventState
    var sharedInfo: SharedRegion { events.sharedInfo }

    init(
        _ hub: EventChannels, id: UInt16, vcpus: Int = 2, portLimit: Int = EventChannels.defaultPortLimit,
        privileged: Bool = false, memory: GuestMemory? = nil
    ) throws {
        let memory = try memory ?? GuestMemory(ramBytes: 64 * 1024, specialFrames: 1)
        let upcalls = UpcallLog(vcpus: vcpus)
        let sharedInfo = try memory.specialRegion(0)
        try hub.registerDomain(
            DomainID(id), vcpus: vcpus, sharedInfo: sharedInfo, portLimit: portLimit, privileged: privileged,
            owner: memory, upcall: { upcalls.record($0) })
        self.id = DomainID(id)
        self.memory = memory
        self.upcalls = upcalls
        self.events = GuestEventState(sharedInfo: sharedInfo)
    }

    /// The 64 pending words, the 64 mask words, and each legacy vCPU's selector and upcall flag.
    func eventBits(vcpus: Int = 2) -> [UInt64] {
        var words: [UInt64] = []
        for word in 0..<128 { words.append(sharedInfo.loadAcquire64(at: TwoLevelLayout.pendingOffset + word * 8)) }
        for vcpu in 0..<vcpus {
            guard let info = events.vcpuInfo(vcpu) else { continue }
            words.append(info.loadAcquire64(at: TwoLevelLayout.pendingSelOffset))
            words.append(UInt64(info.loadAcquire8(at: TwoLevelLayout.upcallPendingOffset)))
        }
        return words
    }
}

/// Runs `body` on `count` threads at once; returns false if they did not all finish within
/// `limit` seconds (a deadlock), true otherwise.
func runThreads(_ count: Int, limit: Double = 60, _ body: @escaping @Sendable (Int) -> Void) -> Bool {
    let group = DispatchGroup()
    for index in 0..<count {
        group.enter()
        let thread = Thread {
            body(index)
            group.leave()
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
    return group.wait(timeout: .now() + limit) == .success
}

/// Captures a typed-throws result, to compare with a model.
func outcome<T>(_ body: () throws(XenError) -> T) -> Result<T, XenError> {
    do throws(XenError) { return .success(try body()) } catch { return .failure(error) }
}
