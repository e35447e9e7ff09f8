/*
 * vireo/vireo.h — every header of Vireo's guest ABI, for guests and for Swift's import.
 */
#ifndef VIREO_ABI_VIREO_H
#define VIREO_ABI_VIREO_H

#include "abi.h"
#include "xen.h"
#include "features.h"
#include "event_channel.h"
#include "grant_table.h"
#include "memory.h"
#include "vcpu.h"
#include "sched.h"
#include "version.h"
#include "elfnote.h"
#include "hvm/params.h"
#include "hvm/hvm_op.h"
#include "hvm/start_info.h"
#include "hvm/hvm_vcpu.h"
#include "io/ring.h"
#include "io/blkif.h"
#include "io/netif.h"
#include "io/console.h"
#include "io/xs_wire.h"
#include "io/xenbus.h"

#endif /* VIREO_ABI_VIREO_H */
