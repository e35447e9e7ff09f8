import Foundation
import GuestKit
import Testing
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoStore

/// GuestKit's frontends against the real hypervisor core and the real XenStore: every
/// hypercall goes through `HypercallDispatcher`, the store is served over the guest's ring by
/// `XenStoreRingTransport`, timers fire through `Domain.fireDueTimers`.
@Suite(.serialized) struct GuestKitTests {
    @Test func typedHypercallsReachTheDispatcher() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        let version = try guest.xenVersion()
        #expect(version.major == 4 && version.minor == 14)
        #expect(try guest.currentReservation() == (4 << 20) / UInt64(guestPageSize))
        #expect(try guest.hvmParam(VIREO_HVM_PARAM_STORE_PFN) == machine.storeFrame.rawValue)
        #expect(throws: GuestError.EPERM) { try guest.setHVMParam(VIREO_HVM_PARAM_STORE_PFN, 1) }
        let size = try guest.grantTableSize()
        #expect(size.frames == 1 && size.maxFrames == 32)
        #expect(try guest.setUpGrantTable(frames: 2).count == 2)
        try guest.consoleIOWrite(Array("hello".utf8))
        // Interdomain ports: the guest offers one to the host, the host binds and sends.
        try guest.mapSharedInfo()
        let port = try guest.allocUnbound(remote: machine.host.id)
        var fired = 0
        guest.setHandler(for: port) { _ in fired += 1 }
        let hostPort = try machine.host.bindInterdomain(remoteDomain: machine.domain.id, remotePort: port)
        try machine.host.send(hostPort)
        guest.runOnce(block: false)
        #expect(fired == 1)
        try guest.close(port)
        #expect(throws: GuestError.self) { try guest.send(port) }
    }

    @Test func theTimerFiresVIRQTimerAndTheHandlerRuns() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        machine.platform.publishTime()
        let boot = guest.wallclockAtBoot()
        #expect(boot.seconds > 1_700_000_000)
        let port = try guest.bindVirq(UInt32(VIREO_VIRQ_TIMER))
        var fired = false
        guest.setHandler(for: port) { _ in fired = true }
        let start = guest.systemTime()
        try guest.setTimer(deadline: start + 20_000_000)
        guest.run { fired }
        let elapsed = guest.systemTime() - start
        #expect(elapsed >= 20_000_000, "fired after \(elapsed) ns")
        #expect(machine.platform.blocks >= 1, "the loop slept in SCHEDOP_block")
    }

    @Test func theXenStoreClientTalksToTheRealStoreOverTheRing() throws {
        let machine = try TestMachine(name: "kit-store")
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let home = String(decoding: try store.domainPath(), as: UTF8.self)
        #expect(home == "/local/domain/7")
        #expect(String(decoding: try store.read(home + "/name"), as: UTF8.self) == "kit-store")
        try store.write(home + "/data/greeting", "hi there")
        #expect(machine.toolstackRead(home + "/data/greeting") == "hi there")
        try store.write(home + "/data/other", "x")
        let names = try store.directory(home + "/data").map { String(decoding: $0, as: UTF8.self) }.sorted()
        #expect(names == ["greeting", "other"])
        #expect(throws: GuestError.ENOENT) { try store.read(home + "/missing") }
        // A long value crosses the 1 KiB rings several times.
        let long = [UInt8](repeating: 0x61, count: 2000)
        try store.write(home + "/data/long", long)
        #expect(try store.read(home + "/data/long") == long)
        try store.remove(home + "/data/other")
        #expect(throws: GuestError.ENOENT) { try store.read(home + "/data/other") }
    }

    @Test func watchesDeliverEvents() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        try store.watch("/local/domain/7/data", token: "tok")
        let first = try store.waitForWatchEvent()  // a new watch fires once at once
        #expect(first.token == Array("tok".utf8))
        try machine.toolstackWrite("/local/domain/7/data/x", "1")
        let event = try store.waitForWatchEvent()
        #expect(String(decoding: event.path, as: UTF8.self) == "/local/domain/7/data/x")
        try store.unwatch("/local/domain/7/data", token: "tok")
    }

    @Test func transactionsCommitAndRetryOnConflict() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        try store.write("/local/domain/7/counter", "1")
        var attempts = 0
        let value = try store.transaction { tx throws(GuestError) -> UInt64 in
            attempts += 1
            let current = Bytes.decimal(try store.read("/local/domain/7/counter", transaction: tx)) ?? 0
            if attempts == 1 {
                // Another writer changes the node inside our transaction: the commit says EAGAIN.
                try? machine.toolstackWrite("/local/domain/7/counter", "10")
            }
            try store.write("/local/domain/7/counter", Bytes.decimal(current + 1), transaction: tx)
            return current + 1
        }
        #expect(attempts == 2)
        #expect(value == 11)
        #expect(machine.toolstackRead("/local/domain/7/counter") == "11")
    }

    @Test func theXenbusFrontendWaitsForTheBackendState() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let front = "/local/domain/7/device/vkit/0", back = "/local/domain/0/backend/vkit/7/0"
        try machine.toolstackWrite(front + "/backend", back)
        try machine.toolstackWrite(front + "/backend-id", "0")
        try machine.toolstackWrite(back + "/state", "2")
        // The backend's node belongs to dom0 and the frontend may read it (as xl sets it up).
        try machine.toolstackSetPermissions(back, "n0\u{0}r7")
        try machine.toolstackSetPermissions(back + "/state", "n0\u{0}r7")
        let frontend = try XenbusFrontend(store: store, node: front)
        #expect(frontend.backendDomain == DomainID(0))
        try frontend.switchState(.initialising)
        #expect(machine.toolstackRead(front + "/state") == "1")
        #expect(try frontend.backendState() == .initWait)
        // The backend connects later: a task stands in for it, run by the guest's loop.
        var passes = 0
        guest.addTask {
            passes += 1
            guard passes == 3 else { return false }
            try? machine.toolstackWrite(back + "/state", "4")
            return true
        }
        try frontend.switchState(.initialised)
        #expect(try frontend.waitForBackend([.connected]) == .connected)
        try frontend.switchState(.connected)
        #expect(machine.toolstackRead(front + "/state") == "4")
    }

    @Test func revokingRefusesWhileTheBackendHoldsAMapping() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        var grants = try GuestGrants(guest: guest)
        let page = machine.platform.allocatePage()
        let granted = grants.grantAccess(to: machine.host.id, frame: GuestFrame(page >> guestPageShift), readOnly: false)
        let ref = try #require(granted)
        #expect(ref.rawValue >= 8, "the reserved entries stay the toolstack's")
        do {
            let mapping = try machine.domain.grantTable.map(ref, by: machine.host.id, readOnly: false)
            try mapping.sharedRegion().store(UInt32(0xC0FFEE), at: 0)
            #expect(grants.isInUse(ref))
            let refused = !grants.endAccess(ref)
            #expect(refused, "revoke refuses while mapped")
            #expect(machine.domain.grantTable.unmap(mapping.handle) == .okay)
        }
        #expect(machine.platform.memory(at: page, count: 4).load(UInt32.self, at: 0) == 0xC0FFEE)
        #expect(!grants.isInUse(ref))
        let revoked = grants.endAccess(ref)
        #expect(revoked)
        #expect(throws: GrantStatus.self) { _ = try machine.domain.grantTable.map(ref, by: machine.host.id, readOnly: false) }
    }

    @Test func theConsoleFrontendWritesTheOutRing() throws {
        let machine = try TestMachine()
        let guest = Guest(platform: machine.platform)
        try guest.mapSharedInfo()
        let hostPort = try machine.host.bindInterdomain(remoteDomain: machine.domain.id, remotePort: machine.consolePort)
        let console = try ConsoleFrontend(guest: guest)
        let page = machine.platform.memory(at: machine.consoleFrame.rawValue << guestPageShift, count: guestPageSize)
        let backend = ByteRing.consoleOutput(page)
        let text = Array("GuestKit console line\n".utf8)
        try console.write(text)
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = try buffer.withUnsafeMutableBytes { try backend.read(into: $0) }
        #expect(Array(buffer[0..<count]) == text)
        #expect(machine.host.poll().contains { _ in true }, "the console port was notified")
        // More than the 2 KiB ring: the frontend waits for the backend (a task of the guest's
        // loop here) to drain it.
        let big = [UInt8](repeating: 0x42, count: 5000)
        var received: [UInt8] = []
        guest.addTask {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = (try? chunk.withUnsafeMutableBytes { try backend.read(into: $0) }) ?? 0
            received += chunk[0..<n]
            if n > 0 { try? machine.host.send(hostPort) }  // "there is room again", as a backend says
            return received.count >= big.count
        }
        machine.platform.blockTimeout = .seconds(10)
        try console.write(big)
        guest.runTasks()
        #expect(received == big)
    }
}
