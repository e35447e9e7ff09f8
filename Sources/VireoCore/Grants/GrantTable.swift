import Synchronization
import VireoABI
import VireoHypercalls

/// One domain's grant table (version 1): the entries live in special frames of the domain's
/// own memory, which the guest maps with `XENMEM_add_to_physmap(XENMAPSPACE_grant_table)` and
/// fills in; the host reads them when another domain maps or copies a grant.
///
/// Mapping follows Xen's v1 protocol: the host validates the entry (type permit_access, the
/// grantee's domid, read-only honoured, v1 bits only) and sets GTF_reading (and GTF_writing
/// for a writable map) with a compare-exchange on the flags+domid word, so the granting guest
/// sees the grant in use and cannot revoke it. The frame is read once, at the first pin, and
/// kept: a guest that rewrites `frame` while the grant is in use changes nothing. The flags
/// are cleared when the last writable (GTF_writing) or last (GTF_reading) use ends.
public final class GrantTable: @unchecked Sendable {
    public let domain: DomainID
    public let memory: GuestMemory
    /// The special frames of `memory` that hold the table: [first, first + maxFrames).
    public let firstSpecialFrame: Int
    public let maxFrames: Int
    /// Live mappings the table tracks at most (handles); past it, maps fail with no_space.
    public let maxMappings: Int

    struct Active {
        var readers: UInt32
        var writers: UInt32
        var frame: UInt32
        var grantee: DomainID
    }
    struct Mapping {
        var ref: UInt32
        var grantee: DomainID
        var writable: Bool
        var generation: UInt32
    }
    struct State {
        var frames: Int
        var active: [UInt32: Active] = [:]
        var mappings: [Mapping?] = []
        var freeHandles: [UInt32] = []
        var generation: UInt32 = 0
        var dead = false
    }
    let state: Mutex<State>

    /// A table of `initialFrames` frames that may grow to `maxFrames`, in special frames
    /// [firstSpecialFrame, firstSpecialFrame + maxFrames) of `memory`.
    public init(domain: DomainID, memory: GuestMemory, firstSpecialFrame: Int, maxFrames: Int,
                initialFrames: Int = 1, maxMappings: Int = 1 << 16) throws(XenError) {
        guard maxFrames >= 1, initialFrames >= 0, initialFrames <= maxFrames, firstSpecialFrame >= 0,
              firstSpecialFrame + maxFrames <= memory.specialFrameCount else { throw .EINVAL }
        self.domain = domain
        self.memory = memory
        self.firstSpecialFrame = firstSpecialFrame
        self.maxFrames = maxFrames
        self.maxMappings = maxMappings
        self.state = Mutex(State(frames: initialFrames))
    }

    // MARK: Size (GNTTABOP_setup_table, GNTTABOP_query_size, XENMAPSPACE_grant_table)

    /// Frames in use and the maximum (GNTTABOP_query_size).
    public var size: (frames: Int, maxFrames: Int) { state.withLock { ($0.frames, maxFrames) } }

    /// Entries the table holds now.
    public var entryCount: Int { state.withLock { $0.frames } * GrantTableLayout.entriesPerFrame }

    /// Grows the table to at least `frames` frames (GNTTABOP_setup_table). Returns where each
    /// frame appears in the guest's physical address space, nil where it is not placed.
    public func setUp(frames: Int) throws(XenError) -> [GuestFrame?] {
        guard frames >= 0, frames <= maxFrames else { throw .EINVAL }
        try state.withLock { (s: inout State) throws(XenError) in
            guard !s.dead else { throw .ESRCH }
            s.frames = max(s.frames, frames)
        }
        return (0..<frames).map { memory.placement(ofSpecialFrame: firstSpecialFrame + $0) }
    }

    /// Places table frame `index` at guest frame `at` (XENMEM_add_to_physmap with
    /// XENMAPSPACE_grant_table), growing the table to include it as Xen does.
    public func place(frame index: Int, at frame: GuestFrame) throws(XenError) {
        guard index >= 0, index < maxFrames else { throw .EINVAL }
        try state.withLock { (s: inout State) throws(XenError) in
            guard !s.dead else { throw .ESRCH }
            s.frames = max(s.frames, index + 1)
        }
        do {
            try memory.placeSpecialFrame(firstSpecialFrame + index, at: frame)
        } catch {
            throw error.xenError
        }
    }

    /// The page holding table frame `index`, as the host sees it.
    public func frameRegion(_ index: Int) throws(XenError) -> SharedRegion {
        guard index >= 0, index < maxFrames else { throw .EINVAL }
        do { return try memory.specialRegion(firstSpecialFrame + index) } catch { throw error.xenError }
    }

    // MARK: Pinning (shared by map and copy)

    @inline(__always)
    private func entry(_ ref: UInt32) -> (SharedRegion, Int) {
        let index = Int(ref) / GrantTableLayout.entriesPerFrame
        // The caller checked ref < frames * entriesPerFrame <= maxFrames * entriesPerFrame.
        let region = try! memory.specialRegion(firstSpecialFrame + index)
        return (region, (Int(ref) % GrantTableLayout.entriesPerFrame) * GrantTableLayout.entrySize)
    }

    /// Validates the entry and sets GTF_reading (and GTF_writing) atomically together with a
    /// check of the flags and domid, as Xen's v1 code does. A guest that keeps changing the
    /// entry under us gets an error after a few tries instead of holding the host in a loop.
    private func setStatus(_ region: SharedRegion, _ offset: Int, grantee: DomainID, writable: Bool) throws(GrantStatus) {
        var seen = region.loadAcquire32(at: offset + GrantTableLayout.flagsOffset)
        for _ in 0..<4 {
            let flags = UInt16(truncatingIfNeeded: seen)
            let domid = UInt16(truncatingIfNeeded: seen >> 16)
            guard flags & ~GrantTableLayout.v1Bits == 0,
                  flags & GrantTableLayout.typeMask == GrantTableLayout.permitAccess else { throw .badGntref }
            guard domid == grantee.rawValue else { throw .permissionDenied }
            guard !writable || flags & GrantTableLayout.readonly == 0 else { throw .permissionDenied }
            let newFlags = flags | GrantTableLayout.reading | (writable ? GrantTableLayout.writing : 0)
            let desired = UInt32(newFlags) | UInt32(domid) << 16
            let witnessed = region.compareExchange32(at: offset, expected: seen, desired: desired)
            if witnessed == seen { return }
            seen = witnessed
        }
        throw .generalError
    }

    /// Pins `ref` for `grantee` and returns the granted frame. Called with the lock held.
    private func pin(_ s: inout State, _ ref: UInt32, grantee: DomainID, writable: Bool) throws(GrantStatus) -> UInt32 {
        guard !s.dead else { throw .badDomain }
        guard Int(ref) < s.frames * GrantTableLayout.entriesPerFrame else { throw .badGntref }
        let (region, offset) = entry(ref)
        if var act = s.active[ref] {
            guard act.grantee == grantee else { throw .permissionDenied }
            if writable && act.writers == 0 {
                try setStatus(region, offset, grantee: grantee, writable: true)
            }
            if writable { act.writers += 1 } else { act.readers += 1 }
            s.active[ref] = act
            return act.frame
        }
        try setStatus(region, offset, grantee: grantee, writable: writable)
        // Read the frame after the flags say "in use": from here on the granter may not change
        // the entry, and we keep this copy whatever it does.
        let frame = region.load(UInt32.self, at: offset + GrantTableLayout.frameOffset)
        guard memory.isRAM(GuestFrame(UInt64(frame))) else {
            clearFlags(region, offset, GrantTableLayout.reading | (writable ? GrantTableLayout.writing : 0))
            throw .badPage
        }
        s.active[ref] = Active(readers: writable ? 0 : 1, writers: writable ? 1 : 0, frame: frame, grantee: grantee)
        return frame
    }

    private func clearFlags(_ region: SharedRegion, _ offset: Int, _ bits: UInt16) {
        _ = region.fetchAnd16(~bits, at: offset + GrantTableLayout.flagsOffset)
    }

    /// Drops one pin. Called with the lock held.
    private func unpin(_ s: inout State, _ ref: UInt32, writable: Bool) {
        guard var act = s.active[ref] else { return }
        let (region, offset) = entry(ref)
        if writable {
            act.writers -= 1
            if act.writers == 0 { clearFlags(region, offset, GrantTableLayout.writing) }
        } else {
            act.readers -= 1
        }
        if act.readers == 0 && act.writers == 0 {
            clearFlags(region, offset, GrantTableLayout.reading)
            s.active[ref] = nil
        } else {
            s.active[ref] = act
        }
    }

    /// Pins for the duration of a copy; returns the frame's page.
    func pinForCopy(_ ref: GrantRef, grantee: DomainID, writable: Bool) throws(GrantStatus) -> SharedRegion {
        let frame = try state.withLock { (s: inout State) throws(GrantStatus) -> UInt32 in
            try pin(&s, ref.rawValue, grantee: grantee, writable: writable)
        }
        return try! memory.region(frame: GuestFrame(UInt64(frame)))
    }

    func unpinAfterCopy(_ ref: GrantRef, writable: Bool) {
        state.withLock { unpin(&$0, ref.rawValue, writable: writable) }
    }

    // MARK: Mapping for one I/O (a batch of grants, held while the I/O runs)

    /// Maps `refs` for `grantee` for the duration of `body` only, as a backend maps a
    /// request's data pages, does its I/O straight between them and the disk, and unmaps them
    /// (Xen's blkback). Every grant is pinned under one lock acquisition (all or none: the
    /// first refused grant's status is thrown and nothing stays pinned), so the granting guest
    /// sees each page in use (GTF_reading, GTF_writing when `writable`) until `body` returns.
    /// `pages[i]` receives the page of `refs[i]`; `body` gets `pages` with the first
    /// `refs.count` filled and must not keep a region past its return.
    public func withMappedPages<R>(_ refs: UnsafeBufferPointer<GrantRef>, by grantee: DomainID, writable: Bool,
                                   pages: UnsafeMutableBufferPointer<SharedRegion>,
                                   _ body: (UnsafeMutableBufferPointer<SharedRegion>) -> R) throws(GrantStatus) -> R {
        precondition(refs.count <= pages.count, "more grants than pages to hold them")
        try state.withLock { (s: inout State) throws(GrantStatus) in
            for i in 0..<refs.count {
                let frame: UInt32
                do throws(GrantStatus) {
                    frame = try pin(&s, refs[i].rawValue, grantee: grantee, writable: writable)
                } catch {
                    for j in 0..<i { unpin(&s, refs[j].rawValue, writable: writable) }
                    throw error
                }
                pages[i] = try! memory.region(frame: GuestFrame(UInt64(frame)))
            }
        }
        defer {
            state.withLock { s in
                for ref in refs { unpin(&s, ref.rawValue, writable: writable) }
            }
        }
        return body(UnsafeMutableBufferPointer(rebasing: pages[0..<refs.count]))
    }

    // MARK: Mapping (GNTTABOP_map_grant_ref / unmap_grant_ref)

    /// Maps grant `ref` of this table for `grantee`. The mapping ends when the returned value
    /// is dropped or `unmap()`ed, or when either domain dies.
    public func map(_ ref: GrantRef, by grantee: DomainID, readOnly: Bool) throws(GrantStatus) -> GrantMapping {
        let (handle, generation, frame) = try state.withLock { (s: inout State) throws(GrantStatus) -> (UInt32, UInt32, UInt32) in
            let handle: UInt32
            if let free = s.freeHandles.popLast() {
                handle = free
            } else if s.mappings.count < maxMappings {
                handle = UInt32(s.mappings.count)
                s.mappings.append(nil)
            } else {
                throw .noSpace
            }
            let frame: UInt32
            do throws(GrantStatus) {
                frame = try pin(&s, ref.rawValue, grantee: grantee, writable: !readOnly)
            } catch {
                s.freeHandles.append(handle)
                throw error
            }
            s.generation &+= 1
            s.mappings[Int(handle)] = Mapping(ref: ref.rawValue, grantee: grantee, writable: !readOnly, generation: s.generation)
            return (handle, s.generation, frame)
        }
        let page = try! memory.region(frame: GuestFrame(UInt64(frame)))
        return GrantMapping(table: self, handle: GrantHandle(handle), generation: generation,
                            granter: domain, ref: ref, readOnly: readOnly, page: page)
    }

    /// Ends a mapping by handle (GNTTABOP_unmap_grant_ref). A handle that is unknown, already
    /// unmapped, or reused since (its generation differs) gives bad_handle.
    @discardableResult
    public func unmap(_ handle: GrantHandle, generation: UInt32? = nil) -> GrantStatus {
        state.withLock { s in
            let index = Int(handle.rawValue)
            guard index < s.mappings.count, let m = s.mappings[index],
                  generation == nil || m.generation == generation else { return .badHandle }
            s.mappings[index] = nil
            s.freeHandles.append(handle.rawValue)
            unpin(&s, m.ref, writable: m.writable)
            return .okay
        }
    }

    /// Whether a mapping (handle, generation) is still live.
    public func isMapped(_ handle: GrantHandle, generation: UInt32) -> Bool {
        state.withLock { s in
            let index = Int(handle.rawValue)
            return index < s.mappings.count && s.mappings[index]?.generation == generation
        }
    }

    /// Pins currently held on `ref` (readers, writers), for tests and diagnostics.
    public func pins(_ ref: GrantRef) -> (readers: UInt32, writers: UInt32) {
        state.withLock { s in s.active[ref.rawValue].map { ($0.readers, $0.writers) } ?? (0, 0) }
    }

    /// Live mappings.
    public var mappingCount: Int { state.withLock { $0.mappings.count - $0.freeHandles.count } }

    // MARK: Domain death

    /// The grantee died: every mapping it holds in this table ends now.
    public func releaseMappings(of grantee: DomainID) {
        state.withLock { s in
            for index in s.mappings.indices {
                guard let m = s.mappings[index], m.grantee == grantee else { continue }
                s.mappings[index] = nil
                s.freeHandles.append(UInt32(index))
                unpin(&s, m.ref, writable: m.writable)
            }
        }
    }

    /// The granting domain died: every mapping ends and no new one can be made. The memory
    /// stays valid until the last reference to it goes, so a backend still holding a region
    /// touches dead memory, never someone else's.
    public func destroy() {
        state.withLock { s in
            for index in s.mappings.indices where s.mappings[index] != nil {
                let m = s.mappings[index]!
                s.mappings[index] = nil
                s.freeHandles.append(UInt32(index))
                unpin(&s, m.ref, writable: m.writable)
            }
            s.dead = true
        }
    }

    public var isDestroyed: Bool { state.withLock { $0.dead } }
}

/// One live grant mapping: the grantee's view of a granted page. Dropping it unmaps.
///
/// The page is reachable only through the mapping's checked accessors; a read-only mapping
/// refuses writes. After the mapping ends (unmapped, or a domain died) the accessors refuse.
public struct GrantMapping: ~Copyable, Sendable {
    public let table: GrantTable
    public let handle: GrantHandle
    public let generation: UInt32
    public let granter: DomainID
    public let ref: GrantRef
    public let readOnly: Bool
    let page: SharedRegion

    init(table: GrantTable, handle: GrantHandle, generation: UInt32, granter: DomainID, ref: GrantRef,
         readOnly: Bool, page: SharedRegion) {
        self.table = table
        self.handle = handle
        self.generation = generation
        self.granter = granter
        self.ref = ref
        self.readOnly = readOnly
        self.page = page
    }

    deinit { table.unmap(handle, generation: generation) }

    /// Ends the mapping now.
    public consuming func unmap() {
        // deinit runs here and releases the pin.
    }

    /// Whether the mapping still holds its grant (a domain's death ends it early).
    public var isValid: Bool { table.isMapped(handle, generation: generation) }

    /// Copies bytes out of the granted page.
    public func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(GrantStatus) {
        guard isValid else { throw .badHandle }
        guard offset >= 0, offset <= page.count - buffer.count else { throw .badCopyArg }
        page.copyBytes(from: offset, into: buffer)
    }

    /// Copies bytes into the granted page; refused for a read-only grant.
    public func write(at offset: Int, from buffer: UnsafeRawBufferPointer) throws(GrantStatus) {
        guard !readOnly else { throw .permissionDenied }
        guard isValid else { throw .badHandle }
        guard offset >= 0, offset <= page.count - buffer.count else { throw .badCopyArg }
        page.copyBytes(from: buffer, to: offset)
    }

    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at offset: Int) throws(GrantStatus) -> T {
        guard isValid else { throw .badHandle }
        guard offset >= 0, offset <= page.count - MemoryLayout<T>.size else { throw .badCopyArg }
        return page.load(T.self, at: offset)
    }

    public func store<T: BitwiseCopyable>(_ value: T, at offset: Int) throws(GrantStatus) {
        guard !readOnly else { throw .permissionDenied }
        guard isValid else { throw .badHandle }
        guard offset >= 0, offset <= page.count - MemoryLayout<T>.size else { throw .badCopyArg }
        page.store(value, at: offset)
    }

    /// The page as a shared region, for a ring a backend serves for the mapping's lifetime.
    /// Only writable grants give one (a backend writes responses), and the region must not be
    /// used after the mapping ends.
    public func sharedRegion() throws(GrantStatus) -> SharedRegion {
        guard !readOnly else { throw .permissionDenied }
        guard isValid else { throw .badHandle }
        return page
    }
}
