import Foundation
import Testing
import VireoBackends
import VireoToolstack
@testable import VireoDaemon

/// Detaching the Xen way (libxl's device removal), on a real daemon's XenStore with a disk's
/// real blkback nodes: the toolstack asks a connected frontend to close (backend `online` = 0,
/// `state` = Closing) and waits for the frontend's Closed, forcing after the timeout. The test
/// plays the guest's frontend through the store, as a frontend's watch on its backend would.
@Suite(.serialized) struct DeviceDetachTests {
    final class Rig: @unchecked Sendable {  // immutable; the store serializes its own requests
        let directory: URL
        let daemon: Daemon
        let device: AttachedDevice
        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireod-detach-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state")))
            let image = directory.appendingPathComponent("d.img").path
            #expect(FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20)))
            let disk = try DomainSpec.Disk.parse("\(image),raw,xvdb,rw", source: "test").disk
            device = try daemon.diskDevice(disk, domain: 7, io: IOCounters())
            try device.create()  // its nodes, InitWait; not run: only the test's "frontend" acts
        }
        deinit {
            device.stopAndWait()
            (device.backend as? BlockBackend)?.finish()
            daemon.stop()
            try? FileManager.default.removeItem(at: directory)
        }
        func read(_ path: String) -> String? { try? daemon.storeRead(path: path).value }
        func write(_ path: String, _ value: String) throws { _ = try daemon.storeWrite(path: path, value: value) }
        var backendState: String? { read(device.backendPath + "/state") }
    }

    @Test func aConnectedFrontendIsAskedToCloseAndTheWaitEndsWhenItHas() throws {
        let rig = try Rig()
        #expect(rig.device.frontendPath == "/local/domain/7/device/vbd/51728")
        try rig.write(rig.device.frontendPath + "/state", "4")  // Connected
        // The frontend: once its backend says Closing, it goes Closing, then Closed.
        let frontend = Thread {
            let deadline = Date().addingTimeInterval(5)
            while rig.backendState != "5" && Date() < deadline { usleep(2000) }
            guard rig.backendState == "5" else { return }
            try? rig.write(rig.device.frontendPath + "/state", "5")
            usleep(50_000)
            try? rig.write(rig.device.frontendPath + "/state", "6")
        }
        frontend.start()
        let started = Date()
        #expect(rig.daemon.askToClose(rig.device, timeout: 10) == .closed)
        #expect(Date().timeIntervalSince(started) < 5, "it returned when the frontend closed, not at the timeout")
        #expect(rig.read(rig.device.backendPath + "/online") == "0", "as libxl: the backend is taken offline")
        while !frontend.isFinished { usleep(1000) }
    }

    @Test func aFrontendThatNeverClosesIsForcedAfterTheTimeout() throws {
        let rig = try Rig()
        try rig.write(rig.device.frontendPath + "/state", "4")
        let started = Date()
        #expect(rig.daemon.askToClose(rig.device, timeout: 0.3) == .forced)
        #expect(Date().timeIntervalSince(started) >= 0.3)
        #expect(rig.backendState == "5", "it was asked")
        // A timeout of 0 forces at once.
        #expect(rig.daemon.askToClose(rig.device, timeout: 0) == .forced)
    }

    @Test func aFrontendThatNeverConnectedOrIsGoneHasNothingToClose() throws {
        let rig = try Rig()
        #expect(rig.read(rig.device.frontendPath + "/state") == "1", "Initialising, as the toolstack wrote it")
        #expect(rig.daemon.askToClose(rig.device, timeout: 10) == .closed)
        #expect(rig.backendState == "2", "not asked: still InitWait")
        try rig.write(rig.device.frontendPath + "/state", "3")  // Initialised: connecting, so asked
        _ = try rig.daemon.storeRead(path: rig.device.frontendPath)
        rig.daemon.removeNodes(rig.device)  // the guest's directory gone (its domain released)
        #expect(rig.daemon.askToClose(rig.device, timeout: 10) == .closed)
    }
}
