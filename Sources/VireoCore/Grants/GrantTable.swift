import Glibc
import Synchronization
import VireoABI
import VireoAtomics
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
///
/// Pins are counted in a host-side array with one 16-byte record per grant reference (Xen's
/// active entries), not under the table lock: a pin that joins existing users of the grant is
/// one compare-exchange on the record's count word; a pin or unpin that changes the guest's
/// flags (first use, first writer, last writer, last use) owns the record for that moment
/// through a busy bit in the same word, so no other pin can see "in use" before the flags say
/// so, and no flag is cleared while another pin holds the grant. The table lock guards only the
/// mapping handles and growth.
public final class GrantTable: @unchecked Sendable {
    public let domain: DomainID
    public let memory: GuestMemory
    /// The special frames of `memory` that hold the table: [first, first + maxFrames).
    public let firstSpecialFrame: Int
    public let maxFrames: Int
    /// Live mappings the table tracks at most (handles); past it, maps fail with no_space.
    public let maxMappings: Int

    struct Mapping {
        var ref: UInt32
        var grantee: DomainID
        var writable: Bool
        var generation: UInt32
    }
    struct State {
        var frames: Int
        var mappings: [Mapping?] = []
        var freeHandles: [UInt32] = []
        var generation: UInt32 = 0
    }
    let state: Mutex<State>

    /// Frames in use, readable without the lock (it only grows, under the lock).
    private let frameCount: Atomic<Int>
    /// Set once, under the lock, when the granting domain dies: new pins are refused.
    private let dead = Atomic<Bool>(false)

    /// The active records, one per reference up to `maxFrames * entriesPerFrame`, in zeroed
    /// memory from calloc (pages of references never used are never touched).
    /// Record layout: the count word (UInt64) at 0, the pinned frame (UInt32) at 8, the grantee
    /// (UInt16) at 12. Frame and grantee are written only by the owner of the busy bit while the
    /// count is zero, and read only by a pin that holds a count, so they are stable when read.
    private let activeStorage: UnsafeMutableRawPointer
    private let active: SharedRegion
    static let recordSize = 16
    /// Count word: readers in bits 0..<28, writers in bits 28..<56, busy in bit 63.
    static let readerUnit: UInt64 = 1
    static let writerUnit: UInt64 = 1 << 28
    static let countMask: UInt64 = (1 << 28) - 1
    static let busy: UInt64 = 1 << 63

    /// A table of `initialFrames` frames that may grow to `maxFrames`, in special frames
    /// [firstSpecialFrame, firstSpecialFrame + maxFrames) of `memory`.
    public init(domain: DomainID, memory: GuestMemory, firstSpecialFrame: Int, maxFrames: Int,
                initialFrames: Int = 1, maxMappings: Int = 1 << 16) throws(XenError) {
        guard maxFrames >= 1, initialFrames >= 0, initialFrames <= maxFrames, firstSpecialFrame >= 0,
              firstSpecialFrame + maxFrames <= memory.specialFrameCount else { throw .EINVAL }
        let records = maxFrames * GrantTableLayout.entriesPerFrame
        guard let storage = calloc(records, Self.recordSize) else { throw .ENOMEM }
        self.domain = domain
        self.memory = memory
        self.firstSpecialFrame = firstSpecialFrame
        self.maxFrames = maxFrames
        self.maxMappings = maxMappings
        self.state = Mutex(State(frames: initialFrames))
        self.frameCount = Atomic(initialFrames)
        self.activeStorage = storage
        self.active = SharedRegion(base: storage, count: records * Self.recordSize)
    }

    deinit { free(activeStorage) }

    // MARK: Size (GNTTABOP_setup_table, GNTTABOP_query_size, XENMAPSPACE_grant_table)

    /// Frames in use and the maximum (GNTTABOP_query_size).
    public var size: (frames: Int, maxFrames: Int) { (frameCount.load(ordering: .acquiring), maxFrames) }

    /// Entries the table holds now.
    public var entryCount: Int { frameCount.load(ordering: .acquiring) * GrantTableLayout.entriesPerFrame }

    /// Grows the table to at least `frames` frames (GNTTABOP_setup_table). Returns where each
    /// frame appears in the guest's physical address space, nil where it is not placed.
    public func setUp(frames: Int) throws(XenError) -> [GuestFrame?] {
        guard frames >= 0, frames <= maxFrames else { throw .EINVAL }
        try state.withLock { (s: inout State) throws(XenError) in
            guard !dead.load(ordering: .relaxed) else { throw .ESRCH }
            s.frames = max(s.frames, frames)
            frameCount.store(s.frames, ordering: .releasing)
        }
        return (0..<frames).map { memory.placement(ofSpecialFrame: firstSpecialFrame + $0) }
    }

    /// Places table frame `index` at guest frame `at` (XENMEM_add_to_physmap with
    /// XENMAPSPACE_grant_table), growing the table to include it as Xen does.
    public func place(frame index: Int, at frame: GuestFrame) throws(XenError) {
        guard index >= 0, index < maxFrames else { throw .EINVAL }
        try state.withLock { (s: inout State) throws(XenError) in
            guard !dead.load(ordering: .relaxed) else { throw .ESRCH }
            s.frames = max(s.frames, index + 1)
            frameCount.store(s.frames, ordering: .releasing)
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
        // The caller checked ref < frames * entriesPerFrame <= maxFrames * entriesPerFrame, and
        // init checked the table's frames are special frames of `memory`.
        let region = memory.specialPage(firstSpecialFrame + index)
        return (region, (Int(ref) % GrantTableLayout.entriesPerFrame) * GrantTableLayout.entrySize)
    }

    /// Validates the entry and sets GTF_reading (and GTF_writing) atomically together with a
    /// check of the flags and domid, as Xen's v1 code does. A guest that keeps changing the
    /// entry under us gets an error after a few tries instead of holding the host in a loop.
    @inline(__always)
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

    @inline(__always)
    private func clearFlags(_ region: SharedRegion, _ offset: Int, _ bits: UInt16) {
        _ = region.fetchAnd16(~bits, at: offset + GrantTableLayout.flagsOffset)
    }

    /// Waits while another host thread owns a record's transition: the owner runs a bounded
    /// number of steps (at most four compare-exchanges on the guest's entry), so this ends.
    @inline(never)
    private func waitForRecord(_ spins: inout Int) {
        spins += 1
        if spins & 63 == 0 { sched_yield() } else { Barrier.relax() }
    }

    /// The record of `ref`, a reference the caller checked against the table's size (or holds a
    /// pin on): its atomics go straight to the record, without a bounds check per access.
    @inline(__always)
    private func record(_ ref: UInt32) -> UnsafeMutableRawPointer {
        activeStorage + Int(ref) &* Self.recordSize
    }

    /// Pins `ref` for `grantee` and returns the granted frame.
    ///
    /// Joining users that already set the flags this pin needs is one compare-exchange of the
    /// count word. Otherwise the pin takes the record's busy bit, sets the guest's flags (and,
    /// for the first use, reads and checks the frame), then publishes the new count and drops
    /// the bit in one release store.
    ///
    /// Inlined into its callers (``withMappedPages(_:by:writable:pages:_:)``, copies, maps): it
    /// runs once per page of every packet a backend moves, and a call's prologue, spills and
    /// epilogue cost about as much as its uncontended compare-exchanges.
    @inline(__always)
    private func pin(_ ref: UInt32, grantee: DomainID, writable: Bool) throws(GrantStatus) -> UInt32 {
        guard !dead.load(ordering: .acquiring) else { throw .badDomain }
        guard Int(ref) < frameCount.load(ordering: .acquiring) * GrantTableLayout.entriesPerFrame else { throw .badGntref }
        let record = self.record(ref)
        let unit = writable ? Self.writerUnit : Self.readerUnit
        var spins = 0
        while true {
            let word = vireo_load_acquire_u64(record)
            if word & Self.busy != 0 { waitForRecord(&spins); continue }
            let readers = word & Self.countMask, writers = (word >> 28) & Self.countMask
            guard (writable ? writers : readers) < Self.countMask else { throw .noSpace }
            let inUse = readers + writers != 0
            if inUse && (!writable || writers != 0) {
                // The flags this pin needs are set and stay set while we hold a count.
                guard vireo_compare_exchange_u64(record, word, word + unit) == word else { continue }
                guard record.load(fromByteOffset: 12, as: UInt16.self) == grantee.rawValue else {
                    unpin(ref, writable: writable)
                    throw .permissionDenied
                }
                return record.load(fromByteOffset: 8, as: UInt32.self)
            }
            guard vireo_compare_exchange_u64(record, word, word | Self.busy) == word else { continue }
            // This thread owns the record until the store below.
            let (region, offset) = entry(ref)
            let frame: UInt32
            if inUse {
                // A writer joins readers: the grantee must match and the entry must allow writes.
                guard record.load(fromByteOffset: 12, as: UInt16.self) == grantee.rawValue else {
                    vireo_store_release_u64(record, word)
                    throw .permissionDenied
                }
                do throws(GrantStatus) {
                    try setStatus(region, offset, grantee: grantee, writable: true)
                } catch {
                    vireo_store_release_u64(record, word)
                    throw error
                }
                frame = record.load(fromByteOffset: 8, as: UInt32.self)
            } else {
                do throws(GrantStatus) {
                    try setStatus(region, offset, grantee: grantee, writable: writable)
                } catch {
                    vireo_store_release_u64(record, word)
                    throw error
                }
                // Read the frame after the flags say "in use": from here on the granter may not
                // change the entry, and we keep this copy whatever it does.
                frame = region.load(UInt32.self, at: offset + GrantTableLayout.frameOffset)
                guard memory.isRAM(GuestFrame(UInt64(frame))) else {
                    clearFlags(region, offset, GrantTableLayout.reading | (writable ? GrantTableLayout.writing : 0))
                    vireo_store_release_u64(record, word)
                    throw .badPage
                }
                record.storeBytes(of: frame, toByteOffset: 8, as: UInt32.self)
                record.storeBytes(of: grantee.rawValue, toByteOffset: 12, as: UInt16.self)
            }
            vireo_store_release_u64(record, word + unit)
            return frame
        }
    }

    /// Drops one pin taken by `pin`. The last writer clears GTF_writing and the last user
    /// GTF_reading, owning the record (busy) meanwhile so no new pin can slip in between the
    /// count reaching zero and the flags being cleared. Inlined, as ``pin(_:grantee:writable:)``.
    @inline(__always)
    private func unpin(_ ref: UInt32, writable: Bool) {
        let record = self.record(ref)
        let unit = writable ? Self.writerUnit : Self.readerUnit
        var spins = 0
        while true {
            let word = vireo_load_acquire_u64(record)
            if word & Self.busy != 0 { waitForRecord(&spins); continue }
            precondition((writable ? (word >> 28) & Self.countMask : word & Self.countMask) != 0,
                         "grant unpinned more often than pinned")
            let left = word - unit
            let readers = left & Self.countMask, writers = (left >> 28) & Self.countMask
            let dropWriting = writable && writers == 0
            let dropReading = readers + writers == 0
            if !dropWriting && !dropReading {
                if vireo_compare_exchange_u64(record, word, left) == word { return }
                continue
            }
            guard vireo_compare_exchange_u64(record, word, word | Self.busy) == word else { continue }
            let (region, offset) = entry(ref)
            clearFlags(region, offset, (dropWriting ? GrantTableLayout.writing : 0) | (dropReading ? GrantTableLayout.reading : 0))
            vireo_store_release_u64(record, left)
            return
        }
    }

    /// The host's view of a pinned RAM frame (`pin` checked it is the granter's RAM).
    @inline(__always)
    private func page(_ frame: UInt32) -> SharedRegion {
        memory.ramPage(UInt64(frame))
    }

    /// Pins for the duration of a copy; returns the frame's page.
    func pinForCopy(_ ref: GrantRef, grantee: DomainID, writable: Bool) throws(GrantStatus) -> SharedRegion {
        page(try pin(ref.rawValue, grantee: grantee, writable: writable))
    }

    func unpinAfterCopy(_ ref: GrantRef, writable: Bool) {
        unpin(ref.rawValue, writable: writable)
    }

    // MARK: Mapping for one I/O (a batch of grants, held while the I/O runs)

    /// Maps `refs` for `grantee` for the duration of `body` only, as a backend maps a
    /// request's data pages, does its I/O straight between them and the disk, and unmaps them
    /// (Xen's blkback). All or none: the first refused grant's status is thrown and nothing
    /// stays pinned, so the granting guest sees each page in use (GTF_reading, GTF_writing when
    /// `writable`) until `body` returns. `pages[i]` receives the page of `refs[i]`; `body` gets
    /// `pages` with the first `refs.count` filled and must not keep a region past its return.
    public func withMappedPages<R>(_ refs: UnsafeBufferPointer<GrantRef>, by grantee: DomainID, writable: Bool,
                                   pages: UnsafeMutableBufferPointer<SharedRegion>,
                                   _ body: (UnsafeMutableBufferPointer<SharedRegion>) -> R) throws(GrantStatus) -> R {
        precondition(refs.count <= pages.count, "more grants than pages to hold them")
        for i in 0..<refs.count {
            let frame: UInt32
            do throws(GrantStatus) {
                frame = try pin(refs[i].rawValue, grantee: grantee, writable: writable)
            } catch {
                for j in 0..<i { unpin(refs[j].rawValue, writable: writable) }
                throw error
            }
            pages[i] = page(frame)
        }
        defer {
            for ref in refs { unpin(ref.rawValue, writable: writable) }
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
                frame = try pin(ref.rawValue, grantee: grantee, writable: !readOnly)
            } catch {
                s.freeHandles.append(handle)
                throw error
            }
            s.generation &+= 1
            s.mappings[Int(handle)] = Mapping(ref: ref.rawValue, grantee: grantee, writable: !readOnly, generation: s.generation)
            return (handle, s.generation, frame)
        }
        return GrantMapping(table: self, handle: GrantHandle(handle), generation: generation,
                            granter: domain, ref: ref, readOnly: readOnly, page: page(frame))
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
            unpin(m.ref, writable: m.writable)
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
        guard Int(ref.rawValue) < maxFrames * GrantTableLayout.entriesPerFrame else { return (0, 0) }
        let word = active.loadAcquire64(at: Int(ref.rawValue) * Self.recordSize) & ~Self.busy
        return (UInt32(word & Self.countMask), UInt32((word >> 28) & Self.countMask))
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
                unpin(m.ref, writable: m.writable)
            }
        }
    }

    /// The granting domain died: every mapping ends and no new one can be made. The memory
    /// stays valid until the last reference to it goes, so a backend still holding a region
    /// touches dead memory, never someone else's.
    public func destroy() {
        state.withLock { s in
            // Refuse new pins first; copies already past the check finish and unpin as usual.
            dead.store(true, ordering: .releasing)
            for index in s.mappings.indices where s.mappings[index] != nil {
                let m = s.mappings[index]!
                s.mappings[index] = nil
                s.freeHandles.append(UInt32(index))
                unpin(m.ref, writable: m.writable)
            }
        }
    }

    public var isDestroyed: Bool { dead.load(ordering: .acquiring) }
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

    /// The page as a shared region for a backend that keeps the grant mapped across many I/Os
    /// (netif's static grants), read-only grants included: the caller writes through it only
    /// when the mapping is writable, and never after the mapping ends.
    public func mappedRegion() throws(GrantStatus) -> SharedRegion {
        guard isValid else { throw .badHandle }
        return page
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
