import Foundation
import Testing

/// Vireo's Hypercalls/ headers against Xen's published headers (Debian `libxen-dev`).
@Suite struct XenHeaderComparisonTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// In CI the Xen headers are installed by .ci/run, so their absence is a failure there;
    /// elsewhere the test says why it did not run.
    static var xenHeadersPresent: Bool {
        FileManager.default.fileExists(atPath: "/usr/include/xen/xen.h")
    }

    static func comparison(include: String) throws -> XenHeaderComparison {
        let clang = try #require(XenHeaderComparison.findClang(), "no clang on PATH or at /opt/swift/usr/bin")
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-abi-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        return XenHeaderComparison(clang: clang, vireoInclude: include, workDir: work)
    }

    static func requireXenHeaders() -> Bool {
        if xenHeadersPresent { return true }
        if ProcessInfo.processInfo.environment["CI"] != nil {
            Issue.record("Xen's headers are missing: .ci/run must install libxen-dev")
        } else {
            print("skipped: /usr/include/xen is missing (apt-get install libxen-dev)")
        }
        return false
    }

    /// The structures the foundation issue names: each must have been compared.
    static let requiredRecords = [
        "struct shared_info", "struct vcpu_info", "struct vcpu_time_info", "struct arch_vcpu_info",
        "struct evtchn_alloc_unbound", "struct evtchn_bind_interdomain", "struct evtchn_bind_virq",
        "struct evtchn_bind_ipi", "struct evtchn_send", "struct evtchn_close", "struct evtchn_status",
        "struct evtchn_unmask", "struct evtchn_bind_vcpu",
        "struct grant_entry_v1", "struct gnttab_setup_table", "struct gnttab_query_size",
        "struct gnttab_map_grant_ref", "struct gnttab_unmap_grant_ref", "struct gnttab_copy",
        "struct blkif_request", "struct blkif_request_segment", "struct blkif_request_indirect",
        "struct blkif_request_discard", "struct blkif_response", "struct blkif_sring",
        "struct netif_tx_request", "struct netif_tx_response", "struct netif_rx_request",
        "struct netif_rx_response", "struct netif_extra_info", "struct netif_tx_sring", "struct netif_rx_sring",
        "struct xencons_interface", "struct xsd_sockmsg", "struct xenstore_domain_interface",
        "struct xen_hvm_param", "struct xen_memory_reservation", "struct xen_memory_map",
        "struct xen_add_to_physmap", "struct vcpu_register_vcpu_info", "struct vcpu_set_singleshot_timer",
        "struct sched_shutdown", "struct sched_poll",
        "struct hvm_start_info", "struct hvm_memmap_table_entry", "struct hvm_modlist_entry",
        "struct vcpu_hvm_context", "struct vcpu_hvm_x86_64", "struct vcpu_hvm_x86_32",
    ]

    @Test func vireoHeadersMatchXenWithZeroMismatches() throws {
        guard Self.requireXenHeaders() else { return }
        let comparison = try Self.comparison(include: Self.root.appendingPathComponent("Hypercalls/include").path)
        let report = try comparison.compare()
        for mismatch in report.mismatches { Issue.record("ABI mismatch: \(mismatch)") }
        #expect(report.mismatches.isEmpty)
        for record in Self.requiredRecords {
            let compared = report.records.contains(record)
            #expect(compared, "\(record) was not compared: is it missing from Hypercalls/?")
        }
        // Families of constants the headers must state.
        for constant in ["__HYPERVISOR_event_channel_op", "EVTCHNOP_send", "GNTTABOP_copy", "GTF_permit_access",
                         "XENMEM_add_to_physmap", "XENMAPSPACE_shared_info", "VCPUOP_set_singleshot_timer",
                         "SCHEDOP_shutdown", "SHUTDOWN_poweroff", "HVMOP_get_param", "HVM_PARAM_STORE_PFN",
                         "XENVER_version", "XEN_ELFNOTE_PHYS32_ENTRY", "XEN_HVM_START_MAGIC_VALUE",
                         "BLKIF_OP_INDIRECT", "NETTXF_more_data", "XS_TRANSACTION_START", "XenbusStateConnected",
                         "XEN_EINVAL", "DOMID_SELF", "VIRQ_TIMER", "CONSOLEIO_write", "xsd_errors"] {
            let compared = report.constants.contains(constant)
            #expect(compared, "\(constant) was not compared")
        }
        print("ABI check: \(report.checked) comparisons (\(report.records.count) structures, \(report.fieldChecks) fields, "
              + "\(report.typedefs.count) typedefs, \(report.constants.count) constants): \(report.mismatches.count) mismatches")
        #expect(report.checked > 1000)
    }

    /// The checker is itself checked: a header with known errors yields exactly those mismatches.
    @Test func comparisonCatchesWrongLayoutsAndValues() throws {
        guard Self.requireXenHeaders() else { return }
        let fake = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-fake-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: fake.appendingPathComponent("vireo"), withIntermediateDirectories: true)
        try """
        #include <stdint.h>
        #define VIREO_EVTCHNOP_send 5            /* Xen: 4 */
        #define VIREO_XS_WRITE_NONE "NOPE"       /* Xen: "NONE" */
        #define VIREO_ABI_SOMETHING_OF_OUR_OWN 7 /* not compared */
        struct vireo_evtchn_close { uint64_t port; };          /* Xen: uint32_t port */
        struct vireo_sched_shutdown { unsigned int reason; };  /* right */
        typedef uint32_t vireo_domid_t;                        /* Xen: uint16_t */
        """.write(to: fake.appendingPathComponent("vireo/vireo.h"), atomically: true, encoding: .utf8)
        let report = try Self.comparison(include: fake.path).compare()
        #expect(Set(report.mismatches.map { $0.split(separator: ":")[0] }) == [
            "EVTCHNOP_send", "XS_WRITE_NONE", "sizeof(struct evtchn_close)", "sizeof(struct evtchn_close.port)",
            "sizeof(domid_t)",
        ])
        #expect(!report.constants.contains("ABI_SOMETHING_OF_OUR_OWN"))
        #expect(report.records.contains("struct sched_shutdown"))
    }

    /// A Vireo name with no Xen counterpart is an error, not silently skipped.
    @Test func nameWithoutXenCounterpartFails() throws {
        guard Self.requireXenHeaders() else { return }
        let fake = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-fake-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: fake.appendingPathComponent("vireo"), withIntermediateDirectories: true)
        try "#define VIREO_EVTCHNOP_teleport 99\n"
            .write(to: fake.appendingPathComponent("vireo/vireo.h"), atomically: true, encoding: .utf8)
        #expect(throws: XenHeaderComparison.Failure.self) { try Self.comparison(include: fake.path).compare() }
    }
}
