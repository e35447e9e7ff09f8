import Testing
@testable import VireoDaemon

@Suite struct ConsoleBufferTests {
    @Test func readsFromAnOffsetAndSaysWhatWasLost() {
        let buffer = ConsoleBuffer(capacity: 8)
        buffer.append(Array("hello".utf8))
        var r = buffer.read(from: nil)
        #expect(r.bytes == Array("hello".utf8) && r.next == 5 && r.missed == 0)
        r = buffer.read(from: 3)
        #expect(r.bytes == Array("lo".utf8) && r.next == 5)
        buffer.append(Array(" world".utf8))  // 11 bytes written, 8 kept: "lo world"
        r = buffer.read(from: 0)
        #expect(r.bytes == Array("lo world".utf8) && r.missed == 3 && r.next == 11)
        r = buffer.read(from: 11)
        #expect(r.bytes.isEmpty && r.next == 11)
        r = buffer.read(from: 99)  // past the end: nothing, and the real end
        #expect(r.bytes.isEmpty && r.next == 11)
    }

    /// A guest writing far more than the capacity at once leaves the newest bytes only.
    @Test func oneHugeWriteKeepsItsTail() {
        let buffer = ConsoleBuffer(capacity: 4)
        buffer.append(Array(0..<100))
        let r = buffer.read(from: nil)
        #expect(r.bytes == [96, 97, 98, 99] && r.next == 100)
        #expect(buffer.endOffset == 100)
    }

    /// The buffer grows with the output (an idle domain's costs nothing); a flood after a
    /// partial fill still keeps exactly the newest bytes.
    @Test func aPartlyFilledBufferTakesAFlood() {
        let buffer = ConsoleBuffer(capacity: 8)
        #expect(buffer.read(from: nil).bytes.isEmpty)
        buffer.append([1, 2, 3])
        buffer.append(Array(10..<30))  // 23 written: 22...29 kept
        var r = buffer.read(from: nil)
        #expect(r.bytes == Array(22..<30) && r.next == 23)
        buffer.append([40, 41])
        r = buffer.read(from: 20)
        #expect(r.bytes == [27, 28, 29, 40, 41] && r.missed == 0 && r.next == 25)
    }
}
