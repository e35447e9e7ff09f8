import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

@Suite struct ByteRingTests {
    static func page() throws -> (GuestMemory, SharedRegion) {
        let memory = try GuestMemory(ramBytes: 4 * 4096)
        return (memory, try memory.region(frame: GuestFrame(1)))
    }

    @Test func layoutsAreTheHeaders() throws {
        let (memory, page) = try Self.page()
        defer { withExtendedLifetime(memory) {} }  // the region does not keep its memory alive
        let console = MemoryLayout<vireo_xencons_interface>.self
        #expect(ByteRing.consoleInput(page).consumerOffset == console.offset(of: \.in_cons))
        #expect(ByteRing.consoleInput(page).producerOffset == console.offset(of: \.in_prod))
        #expect(ByteRing.consoleOutput(page).consumerOffset == console.offset(of: \.out_cons))
        #expect(ByteRing.consoleOutput(page).producerOffset == console.offset(of: \.out_prod))
        #expect(ByteRing.consoleOutput(page).dataOffset == console.offset(of: \.out))
        let store = MemoryLayout<vireo_xenstore_domain_interface>.self
        #expect(ByteRing.xenstoreRequests(page).consumerOffset == store.offset(of: \.req_cons))
        #expect(ByteRing.xenstoreRequests(page).producerOffset == store.offset(of: \.req_prod))
        #expect(ByteRing.xenstoreResponses(page).consumerOffset == store.offset(of: \.rsp_cons))
        #expect(ByteRing.xenstoreResponses(page).producerOffset == store.offset(of: \.rsp_prod))
        #expect(ByteRing.xenstoreResponses(page).dataOffset == store.offset(of: \.rsp))
    }

    /// Random writes and reads, wrapping the indices many times, against a model queue.
    @Test(arguments: [11, 12, 13] as [UInt64])
    func bytesArriveInOrderAcrossWrapAround(seed: UInt64) throws {
        var rng = SeededGenerator(seed: seed)
        let (memory, page) = try Self.page()
        defer { withExtendedLifetime(memory) {} }  // the region does not keep its memory alive
        let ring = ByteRing.xenstoreRequests(page)
        // Start near the 32-bit wrap of the indices.
        page.storeRelease32(UInt32.max - 700, at: ring.consumerOffset)
        page.storeRelease32(UInt32.max - 700, at: ring.producerOffset)
        var model: [UInt8] = []
        var next: UInt8 = 0
        for _ in 0..<5_000 {
            if rng.next() % 2 == 0 {
                let chunk = (0..<Int(rng.next() % 600)).map { _ in next &+= 1; return next }
                let written = try chunk.withUnsafeBytes { try ring.write($0) }
                #expect(written == min(chunk.count, 1024 - model.count))
                model += chunk.prefix(written)
                next = model.last ?? next
            } else {
                var buffer = [UInt8](repeating: 0, count: Int(rng.next() % 700))
                let read = try buffer.withUnsafeMutableBytes { try ring.read(into: $0) }
                #expect(read == min(buffer.count, model.count))
                #expect(Array(buffer.prefix(read)) == Array(model.prefix(read)))
                model.removeFirst(read)
            }
            #expect(try ring.available() == model.count)
        }
    }

    /// SECURITY.md 2 for byte rings: indices a peer put more than a ring apart are a protocol
    /// error, and nothing is read or written.
    @Test func indicesMoreThanARingApartAreRefused() throws {
        let (memory, page) = try Self.page()
        defer { withExtendedLifetime(memory) {} }  // the region does not keep its memory alive
        let ring = ByteRing.consoleOutput(page)
        for (cons, prod) in [(UInt32(0), UInt32(2049)), (5, 4), (100, UInt32.max), (UInt32.max, 2048)] {
            page.storeRelease32(cons, at: ring.consumerOffset)
            page.storeRelease32(prod, at: ring.producerOffset)
            var buffer = [UInt8](repeating: 0, count: 16)
            #expect(throws: ByteRingError.indicesOutOfRange(producer: prod, consumer: cons, size: 2048)) {
                _ = try buffer.withUnsafeMutableBytes { try ring.read(into: $0) }
            }
            #expect(throws: ByteRingError.self) { _ = try [UInt8(1)].withUnsafeBytes { try ring.write($0) } }
            #expect(page.loadAcquire32(at: ring.consumerOffset) == cons, "nothing moved")
            #expect(page.loadAcquire32(at: ring.producerOffset) == prod)
        }
        // A full ring (prod - cons == size) is legal: no space, everything readable.
        page.storeRelease32(10, at: ring.consumerOffset)
        page.storeRelease32(10 + 2048, at: ring.producerOffset)
        #expect(try ring.space() == 0)
        #expect(try [UInt8(1)].withUnsafeBytes { try ring.write($0) } == 0)
    }
}
