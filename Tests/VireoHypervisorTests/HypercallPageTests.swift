import Testing
import VireoABI
import VireoCore
@testable import VireoHypervisor

@Suite struct HypercallPageTests {
    @Test func everyStubLoadsItsNumberExitsAndReturns() {
        let page = HypercallPage.bytes()
        #expect(page.count == 4096)
        for nr in [0, 18, 29, 32, 127] {
            let stub = Array(page[(nr * 32)..<(nr * 32 + 32)])
            #expect(stub[0] == 0xB8 && stub[1] == UInt8(nr) && stub[2...4] == [0, 0, 0])
            #expect(stub[5] == 0xE7 && stub[6] == UInt8(HypercallPage.port))
            #expect(stub[7] == 0xC3)
            #expect(stub[8...].allSatisfy { $0 == 0xCC })
        }
    }

    @Test func installWritesTheGuestsPageOnlyWhereValid() throws {
        let memory = try GuestMemory(ramBytes: 1 << 20, specialFrames: 1)
        #expect(HypercallPage.install(msrValue: 0x5000, in: memory))
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x5000 + 32 * 18), count: 2) == [0xB8, 18])
        #expect(!HypercallPage.install(msrValue: 0x5001, in: memory), "page index 1 does not exist")
        #expect(!HypercallPage.install(msrValue: 0x4000_0000, in: memory), "outside RAM")
        try memory.placeSpecialFrame(0, at: GuestFrame(8))
        #expect(!HypercallPage.install(msrValue: 0x8000, in: memory), "not over a special frame")
    }
}
