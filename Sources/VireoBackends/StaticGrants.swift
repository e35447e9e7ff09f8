import Glibc
import VireoABI
import VireoCore

/// The grants a vif's frontend asked netback to keep mapped: Xen's static grants
/// (`XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING` on the control ring, `vireo/io/netif.h`). Each stays
/// mapped, so the guest sees it in use (GTF_reading, GTF_writing when writable) and cannot end
/// its access, until `DEL_GREF_MAPPING` or the end of the connection. A packet or frame whose
/// slots name only such grants is copied with no pin and unpin of its pages; any other takes
/// the per-copy pins as before.
///
/// A lookup is two loads whatever references the guest chose: an index over every reference
/// the granter's table can hold (2 bytes each, allocated at the first ADD) names a slot of a
/// dense array of the held pages. A hashed table would let a guest that picks colliding
/// references slow every lookup, including those another vif's loop makes when it delivers
/// frames to this one.
///
/// Threads: changed only by the vif's own loop with its inbox lock held; looked up by that loop
/// (its transmit ring) and by whoever holds the inbox lock (its receive ring).
final class StaticGrants: @unchecked Sendable {
    /// A mapped grant: the last reference dropped unmaps it.
    final class Held {
        let mapping: GrantMapping
        let page: SharedRegion
        /// Maps `ref` of `table` for `grantee`, writable unless `readOnly`.
        init(_ table: GrantTable, _ ref: GrantRef, by grantee: DomainID, readOnly: Bool) throws(GrantStatus) {
            let mapping = try table.map(ref, by: grantee, readOnly: readOnly)
            page = try mapping.mappedRegion()
            self.mapping = mapping
        }
    }

    /// One held grant as a lookup reads it.
    private struct Slot {
        var page: SharedRegion
        var ref: UInt32
        var writable: Bool
    }

    /// Most grants held at once (what GET_GREF_MAPPING_SIZE answers), at most 65535.
    let capacity: Int
    /// References at or above this are never held (the granter's table cannot hold them).
    private let limit: Int
    private(set) var count = 0
    /// Slot number + 1 by reference (0: not held); nil until the first grant is held.
    private var index: UnsafeMutablePointer<UInt16>?
    /// The held grants in slots [0, count), and their mappings.
    private let slots: UnsafeMutablePointer<Slot>
    private var held: [Held?]

    init(capacity: Int, references limit: Int, filler: SharedRegion) {
        precondition(capacity >= 0 && capacity < Int(UInt16.max), "static grants: capacity out of range")
        self.capacity = capacity
        self.limit = limit
        slots = .allocate(capacity: max(capacity, 1))
        slots.initialize(repeating: Slot(page: filler, ref: 0, writable: false), count: max(capacity, 1))
        held = Array(repeating: nil, count: capacity)
    }

    deinit {
        free(index)
        slots.deallocate()
    }

    func contains(_ ref: GrantRef) -> Bool {
        guard let index, Int(ref.rawValue) < limit else { return false }
        return index[Int(ref.rawValue)] != 0
    }

    /// Fills `pages[i]` with the held page of `refs[i]` for every i, when every one is held
    /// (and writable, for `writable`); false, with `pages` partly filled, otherwise.
    @inline(__always)
    func fill(_ refs: UnsafeBufferPointer<GrantRef>, writable: Bool, into pages: UnsafeMutableBufferPointer<SharedRegion>) -> Bool {
        guard let index else { return false }
        for i in 0..<refs.count {
            let ref = Int(refs[i].rawValue)
            guard ref < limit else { return false }
            let n = Int(index[ref])
            guard n != 0 else { return false }
            let slot = slots[n &- 1]
            guard slot.writable || !writable else { return false }
            pages[i] = slot.page
        }
        return true
    }

    /// Holds `grants`: each a grant not held yet, below the limit, within the capacity (the
    /// caller checked all three). False when the index cannot be allocated (nothing held).
    func add(_ grants: [Held]) -> Bool {
        if index == nil {
            guard let memory = calloc(limit, MemoryLayout<UInt16>.stride) else { return false }
            index = memory.bindMemory(to: UInt16.self, capacity: limit)
        }
        guard let index else { return false }
        for grant in grants {
            let ref = grant.mapping.ref.rawValue
            precondition(Int(ref) < limit && index[Int(ref)] == 0 && count < capacity, "a static grant added twice or past the capacity")
            slots[count] = Slot(page: grant.page, ref: ref, writable: !grant.mapping.readOnly)
            held[count] = grant
            count += 1
            index[Int(ref)] = UInt16(count)
        }
        return true
    }

    /// Unmaps `ref` if it is held; whether it was. The last slot moves into its place.
    func remove(_ ref: GrantRef) -> Bool {
        guard contains(ref), let index else { return false }
        let at = Int(index[Int(ref.rawValue)]) - 1, last = count - 1
        index[Int(ref.rawValue)] = 0
        if at != last {
            slots[at] = slots[last]
            held[at] = held[last]
            index[Int(slots[at].ref)] = UInt16(at + 1)
        }
        held[last] = nil  // the removed mapping's last reference (when it was last) goes here
        count -= 1
        return true
    }

    /// Unmaps every held grant.
    func removeAll() {
        guard let index else { return }
        for i in 0..<count {
            index[Int(slots[i].ref)] = 0
            held[i] = nil
        }
        count = 0
    }
}
