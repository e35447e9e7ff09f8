/* The atomics are static inline in vireo_atomics.h; this file gives the C module a unit to build. */
#include "vireo_atomics.h"
