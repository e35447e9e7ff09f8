// GuestKit's platform in a bare-metal guest. `vireo guest build` compiles this file into the
// GuestKit module of a guest image (with Sources/GuestKit and the guest-side VireoCore
// sources); it is not part of the host's SwiftPM build, which has no guest runtime.
import VireoGuestRuntime

/// Hypercalls through the runtime's hypercall page, memory identity-mapped (the runtime maps
/// the first 1 GiB), pages from the runtime's heap, RDTSC for the pvclock.
public struct PVHPlatform: GuestPlatform {
    public init() {}

    @inline(__always)
    public func hypercall(_ number: UInt64, _ a1: UInt64, _ a2: UInt64, _ a3: UInt64, _ a4: UInt64, _ a5: UInt64) -> Int64 {
        Int64(vireo_guest_hypercall(UInt32(truncatingIfNeeded: number), a1, a2, a3, a4, a5))
    }

    public func memory(at address: UInt64, count: Int) -> SharedRegion {
        guard let base = UnsafeMutableRawPointer(bitPattern: UInt(address)) else { fatalError("GuestKit: memory at 0") }
        return SharedRegion.unsafe(base, count: count)
    }

    public func allocatePage() -> UInt64 {
        var page: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&page, 4096, 4096) == 0, let page else { fatalError("GuestKit: out of memory") }
        _ = memset(page, 0, 4096)
        return UInt64(UInt(bitPattern: page))
    }

    @inline(__always)
    public func timestampCounter() -> UInt64 { vireo_guest_rdtsc() }

    /// The runtime's upcall entry (boot.S's IDT gate at VIREO_GUEST_UPCALL_VECTOR).
    public func installUpcallEntry(acknowledging upcallPending: UInt64) -> UInt8? {
        vireo_guest_upcall_acknowledge(UnsafeMutablePointer<UInt8>(bitPattern: UInt(upcallPending)))
        return UInt8(VIREO_GUEST_UPCALL_VECTOR)
    }

    public func waitForUpcall(pending upcallPending: UInt64) {
        vireo_guest_wait_for_event(UnsafePointer<UInt8>(bitPattern: UInt(upcallPending)))
    }

    public func upcallCount() -> UInt64 { vireo_guest_upcalls() }
}

/// A guest on the hypervisor it booted on.
public typealias PVHGuest = Guest<PVHPlatform>

extension Guest where Platform == PVHPlatform {
    /// The guest of this image.
    public convenience init() { self.init(platform: PVHPlatform()) }
}
