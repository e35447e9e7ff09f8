/*
 * Compiling this file compiles every ABI header with its _Static_asserts, as part of every
 * build of Vireo; it also gives the C module a symbol to link.
 */
#include "vireo/vireo.h"

const unsigned vireo_abi_version = VIREO_ABI_VERSION;
