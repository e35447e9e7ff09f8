import VireoABI
import VireoCore
import VireoHypercalls

/// A module handed to the guest (an initrd, a disk image in memory...).
public struct BootModule: Sendable {
    public var bytes: [UInt8]
    public var commandLine: String
    public init(bytes: [UInt8], commandLine: String = "") {
        self.bytes = bytes
        self.commandLine = commandLine
    }
}

/// What the vCPU needs to start: the PVH convention puts the entry in EIP and the physical
/// address of `hvm_start_info` in EBX, in 32-bit flat protected mode with paging off.
public struct PVHBootState: Sendable, Equatable {
    public var entry: UInt32
    public var startInfo: UInt32
    /// Guest-physical bytes the kernel image occupies, [start, end).
    public var imageStart: UInt64
    public var imageEnd: UInt64
    /// Where the boot data (start info, memory map, command line, modules) ends.
    public var bootDataEnd: UInt64
}

/// Loads a PVH ELF kernel into guest memory and writes `hvm_start_info` the way Xen's PVH boot
/// convention describes (Hypercalls/include/vireo/hvm/start_info.h).
public enum PVHLoader {
    /// A range of guest RAM the toolstack keeps for itself (console and XenStore pages): the
    /// memory map marks it reserved.
    public struct ReservedRange: Sendable {
        public var start: UInt64
        public var size: UInt64
        public init(start: UInt64, size: UInt64) { self.start = start; self.size = size }
    }

    /// Loads `image` into `memory`: segments at their physical addresses with BSS zeroed; then
    /// the boot data, page-aligned after the image (start info, memory map, command line,
    /// modules); the entry must be inside a loaded segment, below 4 GiB.
    public static func load(
        _ image: ELFImage, fileBytes: [UInt8], into memory: GuestMemory, commandLine: String = "",
        modules: [BootModule] = [], reserved: [ReservedRange] = []
    ) throws(BootImageError) -> PVHBootState {
        guard let entry = image.pvhEntry else { throw .noPVHEntry }
        guard entry <= UInt64(UInt32.max), image.segments.contains(where: { $0.physicalAddress <= entry && entry < $0.end }) else {
            throw .entryOutsideImage(entry)
        }
        for (i, segment) in image.segments.enumerated() where segment.end > memory.ramSize {
            throw .exceedsGuestMemory(index: i, end: segment.end, ramSize: memory.ramSize)
        }
        for segment in image.segments {
            do {
                try memory.write(Array(fileBytes[segment.fileOffset..<(segment.fileOffset + segment.fileSize)]),
                                 at: GuestPhysicalAddress(segment.physicalAddress))
                try memory.fill(0, at: GuestPhysicalAddress(segment.physicalAddress + UInt64(segment.fileSize)),
                                count: Int(segment.memorySize) - segment.fileSize)
            } catch {
                throw .exceedsGuestMemory(index: 0, end: segment.end, ramSize: memory.ramSize)
            }
        }
        let imageStart = image.segments.map(\.physicalAddress).min()!
        let imageEnd = image.segments.map(\.end).max()!

        // Boot data layout, each part 8-byte aligned, starting on the page after the image.
        let page = UInt64(guestPageSize)
        var cursor = (imageEnd + page - 1) / page * page
        func take(_ bytes: Int) -> UInt64 {
            let at = cursor
            cursor += (UInt64(bytes) + 7) / 8 * 8
            return at
        }
        let startInfoAt = take(MemoryLayout<vireo_hvm_start_info>.size)
        let memoryMap = Self.memoryMap(ramSize: memory.ramSize, reserved: reserved)
        let memmapAt = take(memoryMap.count * MemoryLayout<vireo_hvm_memmap_table_entry>.size)
        let cmdline = Array(commandLine.utf8) + [0]
        let cmdlineAt = take(cmdline.count)
        let modlistAt = take(modules.count * MemoryLayout<vireo_hvm_modlist_entry>.size)
        var moduleRecords: [vireo_hvm_modlist_entry] = []
        var moduleWrites: [(UInt64, [UInt8])] = []
        for module in modules {
            let lineBytes = Array(module.commandLine.utf8) + [0]
            let lineAt = take(lineBytes.count)
            cursor = (cursor + page - 1) / page * page  // modules start on a page
            let at = take(module.bytes.count)
            moduleWrites += [(lineAt, lineBytes), (at, module.bytes)]
            moduleRecords.append(vireo_hvm_modlist_entry(paddr: at, size: UInt64(module.bytes.count),
                                                         cmdline_paddr: module.commandLine.isEmpty ? 0 : lineAt, reserved: 0))
        }
        guard cursor <= memory.ramSize, cursor <= UInt64(UInt32.max) else {
            throw .bootDataDoesNotFit(needed: cursor - imageEnd, ramSize: memory.ramSize)
        }
        var info = vireo_hvm_start_info()
        info.magic = UInt32(VIREO_XEN_HVM_START_MAGIC_VALUE)
        info.version = UInt32(VIREO_ABI_HVM_START_INFO_VERSION)
        info.nr_modules = UInt32(modules.count)
        info.modlist_paddr = modules.isEmpty ? 0 : modlistAt
        info.cmdline_paddr = cmdlineAt
        info.memmap_paddr = memmapAt
        info.memmap_entries = UInt32(memoryMap.count)
        do {
            try memory.store(info, at: GuestPhysicalAddress(startInfoAt))
            for (i, entry) in memoryMap.enumerated() {
                try memory.store(entry, at: GuestPhysicalAddress(memmapAt + UInt64(i * MemoryLayout<vireo_hvm_memmap_table_entry>.size)))
            }
            try memory.write(cmdline, at: GuestPhysicalAddress(cmdlineAt))
            for (i, record) in moduleRecords.enumerated() {
                try memory.store(record, at: GuestPhysicalAddress(modlistAt + UInt64(i * MemoryLayout<vireo_hvm_modlist_entry>.size)))
            }
            for (at, bytes) in moduleWrites { try memory.write(bytes, at: GuestPhysicalAddress(at)) }
        } catch {
            throw .bootDataDoesNotFit(needed: cursor - imageEnd, ramSize: memory.ramSize)
        }
        return PVHBootState(entry: UInt32(entry), startInfo: UInt32(startInfoAt), imageStart: imageStart,
                            imageEnd: imageEnd, bootDataEnd: cursor)
    }

    /// RAM from 0 to `ramSize` in the PC layout (the 640 KiB–1 MiB hole reserved), with the
    /// toolstack's reserved ranges cut out.
    public static func memoryMap(ramSize: UInt64, reserved: [ReservedRange]) -> [vireo_hvm_memmap_table_entry] {
        let ram = UInt32(VIREO_XEN_HVM_MEMMAP_TYPE_RAM), hole = UInt32(VIREO_XEN_HVM_MEMMAP_TYPE_RESERVED)
        var ranges: [(UInt64, UInt64, UInt32)] = []
        if ramSize > 0x10_0000 {
            ranges = [(0, 0xA_0000, ram), (0xA_0000, 0x10_0000, hole), (0x10_0000, ramSize, ram)]
        } else {
            ranges = [(0, ramSize, ram)]
        }
        for r in reserved.sorted(by: { $0.start < $1.start }) {
            let (rStart, rEnd) = (r.start, r.start + r.size)
            ranges = ranges.flatMap { (start, end, type) -> [(UInt64, UInt64, UInt32)] in
                guard type == ram, rStart < end, rEnd > start else { return [(start, end, type)] }
                var parts: [(UInt64, UInt64, UInt32)] = []
                if start < rStart { parts.append((start, rStart, ram)) }
                parts.append((max(start, rStart), min(end, rEnd), hole))
                if rEnd < end { parts.append((rEnd, end, ram)) }
                return parts
            }
        }
        return ranges.map { vireo_hvm_memmap_table_entry(addr: $0.0, size: $0.1 - $0.0, type: $0.2, reserved: 0) }
    }
}
