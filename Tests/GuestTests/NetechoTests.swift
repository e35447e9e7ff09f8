import Foundation
import Testing

/// The netecho sample on Vireo's KVM engine. Without a network device (until `vireo run --net`
/// lands) it boots, parses its command line, looks for device/vif/0 in the XenStore, says that
/// it is missing and crashes (exit status 2). Its echo logic runs against a simulated netback in
/// GuestKitTests (NetFrontendTests.anEchoLoopAnswersARPPingAndUDP).
@Suite(.serialized) struct NetechoTests {
    @Test func netechoBootsAndReportsAMissingNetworkDevice() throws {
        guard GuestSupport.kvmAvailable() else { return }
        let r = try GuestSupport.run(GuestSupport.vireo, ["run", try GuestSupport.image("netecho").path.path, "--engine", "kvm",
                                                          "--cmdline", "ip=10.0.0.9 count=3 bogus"])
        #expect(!r.timedOut)
        #expect(r.out.contains("netecho: ignoring 'bogus'"), "\(r.out)")
        #expect(r.out.contains("netecho: no network device (device/vif/0 is missing)"), "\(r.out)")
        #expect(r.out.contains("netecho: FAIL error 2"), "\(r.out)")
        #expect(r.status == 2, "a crash: \(r.out)\(r.err)")
    }
}
