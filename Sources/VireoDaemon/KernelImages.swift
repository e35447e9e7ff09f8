import Foundation

/// A kernel image a domain keeps for its restarts, shared by every live domain booted from the
/// same bytes: a thousand idle domains of one ~190 KiB sample hold one copy, not 190 MiB.
final class KernelImage: Sendable {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
}

/// The images of live domains by content. Entries are weak: an image no domain holds is freed,
/// so the table never keeps memory for domains that are gone.
final class KernelImages: @unchecked Sendable {  // `images` behind `lock`
    private final class Entry {
        weak var image: KernelImage?
        init(_ image: KernelImage) { self.image = image }
    }
    private let lock = NSLock()
    private var images: [Int: [Entry]] = [:]

    /// The live image with these bytes, or a new one (then shared by later calls).
    func share(_ bytes: [UInt8]) -> KernelImage {
        var hasher = Hasher()
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
        let key = hasher.finalize()
        return lock.withLock {
            // Forget the images no domain holds any more (at most one pass over the table).
            images = images.compactMapValues { entries in
                let live = entries.filter { $0.image != nil }
                return live.isEmpty ? nil : live
            }
            if let found = images[key]?.lazy.compactMap({ $0.image }).first(where: { $0.bytes == bytes }) {
                return found
            }
            let image = KernelImage(bytes)
            images[key, default: []].append(Entry(image))
            return image
        }
    }

    /// How many distinct live images are held (for tests).
    var count: Int { lock.withLock { images.values.reduce(0) { $0 + $1.filter { $0.image != nil }.count } } }
}
