/*
 * vireo/hvm/params.h — HVM parameters: per-domain 64-bit values read and written with
 * hvm_op(HVMOP_get_param / HVMOP_set_param) (hvm/hvm_op.h).
 *
 * Numbers are Xen's public ABI for x86_64 (Xen's hvm/params.h); see Hypercalls/README.md
 * for the naming rules. Every index is listed so the numbering is complete; "Vireo:"
 * marks the ones Vireo gives a meaning to. A PVH guest learns where its XenStore and
 * console rings are from these parameters, and tells the host how to deliver upcalls.
 */
#ifndef VIREO_ABI_HVM_PARAMS_H
#define VIREO_ABI_HVM_PARAMS_H

#include <stdint.h>

#include "hvm_op.h"

/* ---------------------------------------------------------------------------------------
 * HVM_PARAM_CALLBACK_IRQ (guest writes): how event-channel upcalls reach the guest.
 *   value == 0: no upcalls (events still set pending bits; the guest must poll).
 *   otherwise bits 63:56 hold the type (mask below) and the low bits its argument:
 *     TYPE_GSI:      bits 55:0 = a GSI (not 0, which would read as "no upcalls");
 *                    the line is asserted while vCPU 0 has an upcall pending.
 *     TYPE_PCI_INTX: bits 47:32 PCI segment, 31:16 bus, 15:8 device/function,
 *                    1:0 INTx pin (0 = INTA); asserted like TYPE_GSI.
 *     TYPE_VECTOR:   bits 7:0 = an IDT vector, delivered to each vCPU that has an
 *                    upcall pending, like an edge-triggered interrupt that needs no EOI.
 *                    Available when XENFEAT_hvm_callback_vector is set.
 * Vireo delivers upcalls by vector only. Until the guest sets TYPE_VECTOR, events only
 * set pending bits.
 * ------------------------------------------------------------------------------------- */

#define VIREO_HVM_PARAM_CALLBACK_IRQ           0  /* Vireo: used (TYPE_VECTOR) */
#define VIREO_HVM_PARAM_CALLBACK_IRQ_TYPE_MASK 0xFF00000000000000ULL
/* Xen has only the mask (a plain literal here, not UINT64_C(), so that Swift imports it);
 * Vireo names the shift that goes with it. */
#define VIREO_ABI_HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT 56

#define VIREO_HVM_PARAM_CALLBACK_TYPE_GSI      0  /* Vireo: not supported */
#define VIREO_HVM_PARAM_CALLBACK_TYPE_PCI_INTX 1  /* Vireo: not supported */
#define VIREO_HVM_PARAM_CALLBACK_TYPE_VECTOR   2  /* Vireo: supported (x86 only in Xen) */

/* ---------------------------------------------------------------------------------------
 * The XenStore and console rings (the toolstack sets these; the guest reads them).
 * ------------------------------------------------------------------------------------- */

/* GFN of the page holding the XenStore ring (io/xs_wire.h). Vireo: used. */
#define VIREO_HVM_PARAM_STORE_PFN       1
/* Port the guest notifies, and is notified on, for the XenStore ring. Vireo: used. */
#define VIREO_HVM_PARAM_STORE_EVTCHN    2
/* GFN of the page holding the console ring (io/console.h). Vireo: used. */
#define VIREO_HVM_PARAM_CONSOLE_PFN    17
/* Port for the console ring. Vireo: used. */
#define VIREO_HVM_PARAM_CONSOLE_EVTCHN 18

/* ---------------------------------------------------------------------------------------
 * The rest of the numbering. Vireo gives none of these a meaning.
 *
 * Xen also numbers 4 (PAE_ENABLED), 13 (DM_DOMAIN), 20-25 and 30 (memory events,
 * NESTEDHVM) and 26 (BUFIOREQ_EVTCHN), but those are deprecated, have no defined
 * meaning, and Xen's header shows them to the toolstack only; they are not part of the
 * guest ABI. 3, 7 and 8 are unassigned.
 * ------------------------------------------------------------------------------------- */

#define VIREO_HVM_PARAM_IOREQ_PFN                5  /* device-model I/O request page */
#define VIREO_HVM_PARAM_BUFIOREQ_PFN             6  /* device-model buffered I/O request page */
#define VIREO_HVM_PARAM_VIRIDIAN                 9  /* Hyper-V enlightenment mask */
#define VIREO_HVM_PARAM_TIMER_MODE              10  /* emulated-timer policy, VIREO_HVMPTM_* */
#define VIREO_HVM_PARAM_HPET_ENABLED            11  /* boolean: emulate an HPET */
#define VIREO_HVM_PARAM_IDENT_PT                12  /* identity page table for EPT without paging */
#define VIREO_HVM_PARAM_ACPI_S_STATE            14  /* current ACPI sleep state */
#define VIREO_HVM_PARAM_VM86_TSS                15  /* TSS for real-mode emulation */
#define VIREO_HVM_PARAM_VPT_ALIGN               16  /* boolean: align periodic timers */
#define VIREO_HVM_PARAM_ACPI_IOPORTS_LOCATION   19  /* 0: old PM1a/TMR ports, 1: QEMU's */
#define VIREO_HVM_PARAM_PAGING_RING_PFN         27  /* memory-event rings (toolstack) */
#define VIREO_HVM_PARAM_MONITOR_RING_PFN        28
#define VIREO_HVM_PARAM_SHARING_RING_PFN        29
#define VIREO_HVM_PARAM_TRIPLE_FAULT_REASON     31  /* SHUTDOWN_* reason on a triple fault */
#define VIREO_HVM_PARAM_IOREQ_SERVER_PFN        32  /* first ioreq-server page */
#define VIREO_HVM_PARAM_NR_IOREQ_SERVER_PAGES   33
#define VIREO_HVM_PARAM_VM_GENERATION_ID_ADDR   34  /* guest address of the VM generation ID */
#define VIREO_HVM_PARAM_ALTP2M                  35  /* alternate-p2m mode */
#define VIREO_HVM_PARAM_X87_FIP_WIDTH           36  /* x87 FIP/FDP save width: 0, 4 or 8 */
#define VIREO_HVM_PARAM_VM86_TSS_SIZED          37  /* TSS address (low 32) and size (high 32) */
#define VIREO_HVM_PARAM_MCA_CAP                 38  /* machine-check capabilities */

/* Parameter indices are below this. */
#define VIREO_HVM_NR_PARAMS 39

/* Values of HVM_PARAM_TIMER_MODE: what emulated timers do about ticks a vCPU missed. */
#define VIREO_HVMPTM_delay_for_missed_ticks    0 /* deliver them late; guest time lags */
#define VIREO_HVMPTM_no_delay_for_missed_ticks 1 /* deliver them late; guest time keeps up */
#define VIREO_HVMPTM_no_missed_ticks_pending   2 /* drop them */
#define VIREO_HVMPTM_one_missed_tick_pending   3 /* deliver one for all of them */

#endif /* VIREO_ABI_HVM_PARAMS_H */
