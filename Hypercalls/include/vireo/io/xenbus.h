/*
 * vireo/io/xenbus.h — the connection states a split driver's two ends publish in xenstore,
 * and the order in which they walk through them.
 *
 * Numbers: Xen's public io/xenbus.h. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x).
 *
 * ---------------------------------------------------------------------------------------
 * The state nodes
 *
 * Every device has two xenstore directories (for example, for a disk, the frontend's
 * /local/domain/<front-domid>/device/vbd/<devid> and the backend's
 * /local/domain/<back-domid>/backend/vbd/<front-domid>/<devid>; each names the other in
 * "backend" / "frontend"). Each holds a "state" node whose value is one of the numbers
 * below in decimal ASCII ("4"). The frontend writes only its own state node, the backend
 * only its own; each watches the other's and acts on changes. The toolstack creates both
 * nodes with Initialising (1). A missing or unparsable node reads as Unknown (0).
 *
 * Connecting
 *
 *   step  who       does                                                       then writes
 *   1     backend   opens the device model, publishes its features and      InitWait (2)
 *                   limits (feature-*, max-ring-page-order, ...)
 *   2     frontend  waits for InitWait, reads the backend's features,         Initialised (3)
 *                   allocates and grants the rings, allocates event channels,
 *                   writes ring-ref*, event-channel*, protocol and its own
 *                   feature keys (in one xenstore transaction)
 *   3     backend   waits for Initialised (or Connected), reads those keys,   Connected (4)
 *                   maps the rings, binds the event channels, publishes the
 *                   device's properties (sectors, info, ...)
 *   4     frontend  waits for Connected, reads the properties, starts I/O     Connected (4)
 *
 * Some frontends skip states: Linux's netfront goes from Initialising to Connected in
 * step 2, and a frontend with nothing to negotiate may write Initialised without waiting
 * for InitWait. A backend therefore treats "frontend is Initialised or Connected" as "its
 * keys are published", and does any work of a skipped step before the current one.
 *
 * Disconnecting (unplug, shutdown, or an error on either side)
 *
 *   - The end that starts it writes Closing (5). On a fatal error it usually also writes
 *     an "error" node in its directory.
 *   - Seeing the backend in Closing, the frontend finishes or fails outstanding requests,
 *     stops using the rings, revokes its grants and closes its ports, and writes
 *     Closed (6) (through Closing if it was not there yet).
 *   - Seeing the frontend in Closing or Closed, the backend unmaps the rings, unbinds the
 *     ports and writes Closed (6) (through Closing if it was not there yet).
 *   - Once both are Closed the toolstack may remove the directories. A frontend in Closed
 *     that sees the backend go back to InitWait connects again from step 2 (this is how a
 *     backend is restarted without unplugging the device).
 *
 * Reconfiguring (7) and Reconfigured (8) are used only by PCI passthrough; Vireo's backends
 * never write them.
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_XENBUS_H
#define VIREO_ABI_IO_XENBUS_H

enum vireo_xenbus_state {
    VIREO_XenbusStateUnknown       = 0, /* no state node, or an unreadable one */
    VIREO_XenbusStateInitialising  = 1, /* created by the toolstack; setting up */
    VIREO_XenbusStateInitWait      = 2, /* backend: features published, waiting for the
                                           frontend's rings */
    VIREO_XenbusStateInitialised   = 3, /* frontend: rings and ports published, waiting for
                                           the backend to connect */
    VIREO_XenbusStateConnected     = 4, /* in service */
    VIREO_XenbusStateClosing       = 5, /* shutting down (unplug or error) */
    VIREO_XenbusStateClosed        = 6, /* disconnected; nothing is mapped */
    VIREO_XenbusStateReconfiguring = 7, /* PCI passthrough only */
    VIREO_XenbusStateReconfigured  = 8, /* PCI passthrough only */
};
typedef enum vireo_xenbus_state vireo_XenbusState;

#endif /* VIREO_ABI_IO_XENBUS_H */
