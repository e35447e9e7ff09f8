// swift-tools-version: 6.1
import PackageDescription

// The layers of Docs/architecture.md; imports only point down. ArchitectureTests checks
// every `import` in Sources/ against the table in that document.
let package = Package(
    name: "Vireo",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vireo", targets: ["vireo"]),
        .executable(name: "vireod", targets: ["vireod"]),
        .library(name: "VireoABI", targets: ["VireoABI"]),
        .library(name: "VireoStore", targets: ["VireoStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.81.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // The guest ABI in C (Hypercalls/): imported by Swift, included by C and Embedded Swift guests.
        .target(
            name: "VireoHypercalls",
            path: "Hypercalls",
            exclude: ["README.md"],
            sources: ["abi.c"],
            publicHeadersPath: "include",
            cSettings: [.unsafeFlags(["-std=c11", "-Wall", "-Wextra", "-Werror"])]
        ),
        // Typed Swift names over the C ABI: DomainID, GrantRef, EventPort, Hypercall, XenError...
        .target(name: "VireoABI", dependencies: ["VireoHypercalls"]),
        // Atomics and fences on memory Swift does not own (shared pages); freestanding C.
        .target(name: "VireoAtomics"),
        // The Linux calls Swift cannot make directly (memfd_create, variadic ioctl). Host-only.
        .target(name: "VireoLinux"),
        // The shared-memory core: guest memory, grant tables, event channels, shared rings.
        // Pure logic over memory: no KVM, no threads of its own, no files.
        .target(name: "VireoCore", dependencies: ["VireoABI", "VireoHypercalls", "VireoAtomics", "VireoLinux"]),
        // The hypervisor core: PVH loading, domains, hypercall dispatch. Engines run it.
        .target(name: "VireoHypervisor", dependencies: ["VireoCore", "VireoABI", "VireoHypercalls"]),
        // Linux's KVM ABI (<linux/kvm.h>) and its ioctl numbers as constants Swift can import.
        .target(name: "VireoKVMSys"),
        // The KVM engine's foundation: typed wrappers over /dev/kvm (system, VM, vCPU), the exit
        // enum, Xen's CPUID leaves and the PVH entry state. The only Swift code touching /dev/kvm.
        .target(
            name: "VireoKVM",
            dependencies: ["VireoKVMSys", "VireoLinux", "VireoCore", "VireoABI", "VireoHypercalls"]
        ),
        // The SoftCPU engine: Vireo's own x86-64 interpreter over a domain's guest memory (the
        // PVH entry, long mode, paging, the IDT). Built with exclusivity checks off: the hot
        // loop touches the CPU's own fields millions of times a second from one thread.
        .target(
            name: "VireoSoftCPU",
            dependencies: ["VireoCore", "VireoABI"],
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        // Runs domains: the hypervisor core on an engine (KVM or SoftCPU), one thread per vCPU.
        .target(name: "VireoMachine", dependencies: ["VireoSoftCPU", "VireoBackends", "VireoHypervisor", "VireoKVM", "VireoCore", "VireoABI", "VireoHypercalls", "VireoLinux", "VireoStore"]),
        // XenStore: the tree, permissions, transactions, watches and quotas (a pure engine),
        // its wire codec, and its transports (a Unix socket for tools, a ring page per guest).
        .target(name: "VireoStore", dependencies: ["VireoCore", "VireoABI", "VireoHypercalls"]),
        // The benchmark harness: the JSON contract of DESIGN.md, same-run baselines, ratios.
        .target(name: "VireoBench"),
        // Benchmarks of the layers (`vireo bench NAME`): they may own threads and call the OS.
        .target(
            name: "VireoBenchmarks",
            dependencies: ["VireoCore", "VireoABI", "VireoHypercalls", "VireoBench", "VireoLinux", "VireoKVM",
                           "VireoHypervisor", "VireoMachine", "VireoGuestBuilder", "VireoStore", "VireoBackends", "VireoDaemon",
                           .product(name: "Logging", package: "swift-log")]
        ),
        // GuestKit: paravirtual frontends for guests (hypercalls, events, grants, XenStore, XenBus,
        // console, a cooperative loop), generic over a platform. The same sources build in
        // Embedded Swift for bare-metal guests (`vireo guest build`, see Docs/guestkit.md).
        .target(name: "GuestKit", dependencies: ["VireoCore", "VireoABI", "VireoHypercalls"]),
        // Backends: the host side of split drivers (blkback over an image file, netback with a
        // switch and TAP devices; VireoLinux for the TAP's ioctl), served through
        // grant copies, shared rings and event channels only, never raw guest memory.
        .target(name: "VireoBackends", dependencies: ["VireoCore", "VireoABI", "VireoHypercalls", "VireoStore", "VireoLinux"]),
        // Builds bare-metal guest images (Hypercalls/runtime + a guest's sources) by running the
        // toolchain's swiftc, clang and ld.lld. Host-only tooling.
        .target(name: "VireoGuestBuilder"),
        // The toolstack: xl.cfg domain configurations (and, next, the daemon's state and API).
        .target(name: "VireoToolstack"),
        // The daemon: a registry of domains run on one embedded host, their lifecycle, the state
        // directory, and the control API (HTTP/1.1 + JSON over a Unix socket) with its client.
        .target(
            name: "VireoDaemon",
            dependencies: [
                "VireoToolstack", "VireoMachine", "VireoHypervisor", "VireoStore", "VireoBackends", "VireoCore", "VireoABI",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vireod",
            dependencies: ["VireoDaemon", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]
        ),
        .executableTarget(
            name: "vireo",
            dependencies: [
                "VireoABI",
                "VireoBench",
                "VireoBenchmarks",
                "VireoGuestBuilder",
                "VireoMachine",
                "VireoBackends",
                "VireoHypervisor",
                "VireoCore",
                "VireoStore",
                "VireoDaemon",
                "VireoToolstack",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "VireoABITests", dependencies: ["VireoABI"]),
        .testTarget(name: "VireoBenchTests", dependencies: ["VireoBench"]),
        .testTarget(name: "VireoCoreTests", dependencies: ["VireoCore", "VireoABI", "VireoHypercalls", "VireoLinux"]),
        .testTarget(name: "VireoHypervisorTests", dependencies: ["VireoHypervisor", "VireoCore", "VireoABI", "VireoHypercalls"]),
        .testTarget(name: "VireoSoftCPUTests", dependencies: ["VireoSoftCPU", "VireoKVM", "VireoCore", "VireoABI"]),
        .testTarget(name: "VireoKVMTests", dependencies: ["VireoKVM", "VireoCore", "VireoABI", "VireoHypercalls"]),
        .testTarget(name: "VireoStoreTests", dependencies: ["VireoStore", "VireoCore", "VireoABI", "VireoHypercalls"]),
        .testTarget(name: "VireoBackendsTests", dependencies: ["VireoBackends", "VireoStore", "VireoCore", "VireoABI", "VireoHypercalls", "VireoLinux"]),
        .testTarget(name: "GuestKitTests", dependencies: ["GuestKit", "VireoBackends", "VireoHypervisor", "VireoStore", "VireoCore", "VireoABI", "VireoHypercalls"]),
        .testTarget(name: "ArchitectureTests"),
        .testTarget(name: "VireoToolstackTests", dependencies: ["VireoToolstack"]),
        .testTarget(name: "VireoMachineTests", dependencies: ["VireoMachine", "VireoBackends", "VireoBenchmarks", "VireoGuestBuilder", "VireoHypervisor", "VireoCore", "VireoABI"]),
        .testTarget(name: "VireoDaemonTests", dependencies: ["VireoDaemon", "VireoToolstack", "VireoStore", "VireoBackends", "VireoLinux"]),
        .testTarget(name: "TutorialTests", dependencies: ["VireoBackends", "VireoMachine", "VireoGuestBuilder", "VireoHypervisor", "VireoCore", "VireoABI"]),
        .testTarget(name: "CLITests", dependencies: ["vireo"]),
        // Guest images built and booted (under QEMU when present); Fixtures are guests, not tests.
        .testTarget(name: "GuestTests", dependencies: ["VireoGuestBuilder", "vireo", "vireod"], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v6]
)
