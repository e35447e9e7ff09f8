import Testing
import VireoABI
@testable import VireoCore

@Suite struct GuestMemoryTests {
    @Test func ramIsZeroedAndRoundTrips() throws {
        let memory = try GuestMemory(ramBytes: 64 * 1024, specialFrames: 2)
        #expect(try memory.load(UInt64.self, at: GuestPhysicalAddress(0x1000)) == 0)
        try memory.store(UInt32(0xdead_beef), at: GuestPhysicalAddress(0x2004))
        #expect(try memory.load(UInt32.self, at: GuestPhysicalAddress(0x2004)) == 0xdead_beef)
        try memory.write(Array(0..<200).map(UInt8.init), at: GuestPhysicalAddress(0x0fa0))  // spans a page boundary
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x0fa0), count: 200) == Array(0..<200).map(UInt8.init))
    }

    /// SECURITY.md 6: every guest-supplied address is bounds-checked before use.
    @Test func item6_outOfRangeAndOverflowingAccessesAreRefused() throws {
        let memory = try GuestMemory(ramBytes: 16 * 1024)
        #expect(throws: GuestMemoryError.outOfRange(GuestPhysicalAddress(0x4000), count: 1)) {
            try memory.translate(GuestPhysicalAddress(0x4000), count: 1)
        }
        #expect(throws: GuestMemoryError.outOfRange(GuestPhysicalAddress(0x3fff), count: 2)) {
            try memory.translate(GuestPhysicalAddress(0x3fff), count: 2)
        }
        #expect(throws: GuestMemoryError.overflow(GuestPhysicalAddress(UInt64.max - 1), count: 4)) {
            try memory.translate(GuestPhysicalAddress(UInt64.max - 1), count: 4)
        }
        #expect(throws: GuestMemoryError.outOfRange(GuestPhysicalAddress(0), count: -1)) {
            try memory.translate(GuestPhysicalAddress(0), count: -1)
        }
        #expect(throws: GuestMemoryError.unaligned(GuestPhysicalAddress(0x1002), width: 4)) {
            try memory.loadAcquire32(at: GuestPhysicalAddress(0x1002))
        }
        #expect(throws: GuestMemoryError.self) { try memory.region(frame: GuestFrame(UInt64.max)) }
        #expect(GuestMemoryError.outOfRange(GuestPhysicalAddress(0), count: 1).xenError == .EFAULT)
    }

    @Test func aRefusedWriteChangesNothing() throws {
        let memory = try GuestMemory(ramBytes: 8 * 1024)
        let tail = [UInt8](repeating: 0xaa, count: 100)
        #expect(throws: GuestMemoryError.self) { try memory.write(tail, at: GuestPhysicalAddress(0x2000 - 50)) }
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x2000 - 50), count: 50) == [UInt8](repeating: 0, count: 50))
    }

    @Test func specialFramesAppearWherePlaced() throws {
        let memory = try GuestMemory(ramBytes: 64 * 1024, specialFrames: 4)
        let special = try memory.specialRegion(1)
        special.store(UInt64(0x1122_3344_5566_7788), at: 8)
        try memory.store(UInt64(7), at: GuestPhysicalAddress(0x5008))  // RAM under the placement
        try memory.placeSpecialFrame(1, at: GuestFrame(5))
        #expect(try memory.load(UInt64.self, at: GuestPhysicalAddress(0x5008)) == 0x1122_3344_5566_7788)
        #expect(memory.placement(ofSpecialFrame: 1) == GuestFrame(5))
        // A special frame may sit outside RAM, where the guest maps it into a hole.
        try memory.placeSpecialFrame(2, at: GuestFrame(0x100))
        try memory.store(UInt16(9), at: GuestPhysicalAddress(0x100_000))
        #expect(try memory.specialRegion(2).load(UInt16.self, at: 0) == 9)
        // A range that straddles RAM and a special frame is refused rather than split silently.
        #expect(throws: GuestMemoryError.self) { try memory.translate(GuestPhysicalAddress(0x4ff8), count: 16) }
        // Byte-wise copies go page by page, through the special frame.
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x4ff8), count: 16).count == 16)
        // Moving it shows the RAM page again.
        try memory.placeSpecialFrame(1, at: GuestFrame(6))
        #expect(try memory.load(UInt64.self, at: GuestPhysicalAddress(0x5008)) == 7)
        memory.unplaceSpecialFrame(1)
        #expect(memory.placement(ofSpecialFrame: 1) == nil)
        #expect(throws: GuestMemoryError.self) { try memory.specialRegion(4) }
        #expect(throws: GuestMemoryError.self) { try memory.placeSpecialFrame(9, at: GuestFrame(1)) }
    }

    @Test func invalidLayoutsAreRefusedWithAReason() {
        #expect(throws: GuestMemoryError.self) { try GuestMemory(ramBytes: 0) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory(ramBytes: 4097) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory(ramBytes: 4096, specialFrames: -1) }
        let message = "\(GuestMemoryError.invalidLayout("RAM size 4097 is not a positive multiple of 4096"))"
        #expect(message.contains("4097"))
    }

    @Test func atomicsOnGuestWords() throws {
        let memory = try GuestMemory(ramBytes: 8 * 1024)
        let gpa = GuestPhysicalAddress(0x100)
        #expect(try memory.compareExchange16(at: gpa, expected: 0, desired: 5) == 0)
        #expect(try memory.compareExchange16(at: gpa, expected: 0, desired: 6) == 5, "a failed swap returns what it saw")
        #expect(try memory.fetchOr64(0b100, at: GuestPhysicalAddress(0x200)) == 0)
        #expect(try memory.fetchAnd64(~0b100, at: GuestPhysicalAddress(0x200)) == 0b100)
        try memory.storeRelease32(42, at: GuestPhysicalAddress(0x300))
        #expect(try memory.loadAcquire32(at: GuestPhysicalAddress(0x300)) == 42)
    }

    @Test func memfdBacksTheMemory() throws {
        let memory = try GuestMemory(ramBytes: 8 * 1024, specialFrames: 1)
        #expect(memory.fileDescriptor >= 0)
        #expect(memory.ramFrames == 2)
    }
}
