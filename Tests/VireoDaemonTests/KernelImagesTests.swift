import Testing
@testable import VireoDaemon

/// Domains booted from the same kernel bytes share one copy; an image no domain holds is freed.
@Suite struct KernelImagesTests {
    @Test func theSameBytesShareOneImageAndAGoneImageIsForgotten() {
        let images = KernelImages()
        let bytes = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var first: KernelImage? = images.share(bytes)
        var second: KernelImage? = images.share(Array(bytes))  // equal bytes, another array
        #expect(first === second)
        #expect(images.count == 1)
        var changed = bytes
        changed[100_000] ^= 0xFF
        var other: KernelImage? = images.share(changed)
        #expect(other !== first)
        #expect(other?.bytes == changed)
        #expect(images.count == 2)
        first = nil
        #expect(images.count == 2)  // `second` still holds it
        second = nil
        other = nil
        #expect(images.count == 0)
        // A new image of the old bytes is made afresh.
        let again = images.share(bytes)
        #expect(again.bytes == bytes)
        #expect(images.count == 1)
        _ = (first, second, other)
    }
}
