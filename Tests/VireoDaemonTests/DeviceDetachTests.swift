import Foundation
import Glibc
import Testing
import VireoLinux
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
            let backend = device.backend as? BlockBackend
            device.stopAndWait()
            backend?.finish()
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

/// A vif's host side through the daemon, as root in a network namespace of its own (the test's
/// thread alone moves into it; the host's interfaces are never touched): `bridge=` puts the TAP
/// on the bridge, a missing bridge is refused by name (and its TAP goes), and the TAP goes with
/// the device when it is let go, even while a run still holds the device's wrapper.
@Suite(.serialized) struct VifHostSideTests {
    @Test func aVifsTapJoinsItsBridgeAndGoesWithTheDevice() throws {
        guard getuid() == 0, access("/dev/net/tun", R_OK | W_OK) == 0 else {
            print("VifHostSideTests skipped: needs root and /dev/net/tun")
            return
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireod-vif-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state")))
        defer { daemon.stop() }
        final class Box: @unchecked Sendable { var error: (any Error)?; var done = false }  // written before `done`, under `lock`
        let box = Box(), lock = NSCondition()
        let thread = Thread {
            do {
                guard vireo_unshare_network() == 0 else { throw BackendError("unshare: \(String(cString: strerror(errno)))") }
                let sock = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
                var name = Array("vbr-vireod".utf8) + [0]
                let made = name.withUnsafeMutableBytes { vireo_ioctl_ptr(sock, 0x89a0, $0.baseAddress) }  // SIOCBRADDBR
                close(sock)
                guard made == 0 else { throw BackendError("SIOCBRADDBR: \(String(cString: strerror(errno)))") }
                var vif = try DomainSpec.Vif.parse("vifname=vtap-vireod, bridge=vbr-vireod", source: "test").vif
                vif.devid = 0
                let device = try daemon.vifDevice(vif, domain: 9, io: IOCounters())
                #expect(if_nametoindex("vtap-vireod") != 0, "the TAP exists")
                device.stopAndWait()  // the wrapper lives on (as a run's list would hold it)
                #expect(if_nametoindex("vtap-vireod") == 0, "the TAP went with the device")
                #expect(device.backend == nil)
                var missing = vif
                missing.bridge = "vbr-none"
                do {
                    _ = try daemon.vifDevice(missing, domain: 9, io: IOCounters())
                    Issue.record("a missing bridge was accepted")
                } catch {
                    #expect("\(error)".hasPrefix("bridge 'vbr-none' does not exist"), "\(error)")
                }
                #expect(if_nametoindex("vtap-vireod") == 0, "the refused vif's TAP is gone too")
            } catch {
                lock.withLock { box.error = error }
            }
            lock.withLock {
                box.done = true
                lock.broadcast()
            }
        }
        thread.start()
        lock.withLock { while !box.done { lock.wait() } }
        if let error = box.error { throw error }
        #expect(if_nametoindex("vtap-vireod") == 0 && if_nametoindex("vbr-vireod") == 0, "the host's namespace never saw them")
    }
}
