/*
 * vireo_atomics.h — atomic operations and fences on shared memory that Swift does not own:
 * ring indices, grant flags and event bits in pages a guest shares with the host.
 *
 * Freestanding C11 (compiler builtins only), so the host, C guests and Embedded Swift guests
 * use the same code. Every pointer must be naturally aligned for its width.
 * Orders: load_acquire / store_release pair a producer's index update with the consumer's
 * read of the entries behind it; the fetch/exchange/compare-exchange operations are
 * sequentially consistent (a full barrier), as Xen's test_and_set_bit and cmpxchg are.
 */
#ifndef VIREO_ATOMICS_H
#define VIREO_ATOMICS_H

#include <stdbool.h>
#include <stdint.h>

#define VIREO_ATOMIC_OPS(bits)                                                                  \
    static inline uint##bits##_t vireo_load_relaxed_u##bits(const void *p) {                   \
        return __atomic_load_n((const uint##bits##_t *)p, __ATOMIC_RELAXED);                    \
    }                                                                                           \
    static inline uint##bits##_t vireo_load_acquire_u##bits(const void *p) {                   \
        return __atomic_load_n((const uint##bits##_t *)p, __ATOMIC_ACQUIRE);                    \
    }                                                                                           \
    static inline void vireo_store_relaxed_u##bits(void *p, uint##bits##_t v) {                \
        __atomic_store_n((uint##bits##_t *)p, v, __ATOMIC_RELAXED);                             \
    }                                                                                           \
    static inline void vireo_store_release_u##bits(void *p, uint##bits##_t v) {               \
        __atomic_store_n((uint##bits##_t *)p, v, __ATOMIC_RELEASE);                             \
    }                                                                                           \
    static inline uint##bits##_t vireo_exchange_u##bits(void *p, uint##bits##_t v) {           \
        return __atomic_exchange_n((uint##bits##_t *)p, v, __ATOMIC_SEQ_CST);                   \
    }                                                                                           \
    static inline uint##bits##_t vireo_fetch_or_u##bits(void *p, uint##bits##_t v) {           \
        return __atomic_fetch_or((uint##bits##_t *)p, v, __ATOMIC_SEQ_CST);                     \
    }                                                                                           \
    static inline uint##bits##_t vireo_fetch_and_u##bits(void *p, uint##bits##_t v) {          \
        return __atomic_fetch_and((uint##bits##_t *)p, v, __ATOMIC_SEQ_CST);                    \
    }                                                                                           \
    static inline uint##bits##_t vireo_fetch_add_u##bits(void *p, uint##bits##_t v) {          \
        return __atomic_fetch_add((uint##bits##_t *)p, v, __ATOMIC_SEQ_CST);                    \
    }                                                                                           \
    /* Returns the value seen; the swap happened iff it equals `expected`. */                  \
    static inline uint##bits##_t vireo_compare_exchange_u##bits(void *p, uint##bits##_t expected, \
                                                                 uint##bits##_t desired) {     \
        __atomic_compare_exchange_n((uint##bits##_t *)p, &expected, desired, false,             \
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
        return expected;                                                                        \
    }

VIREO_ATOMIC_OPS(8)
VIREO_ATOMIC_OPS(16)
VIREO_ATOMIC_OPS(32)
VIREO_ATOMIC_OPS(64)

#undef VIREO_ATOMIC_OPS

/* Full barrier: no load or store moves across it (Xen's mb()). */
static inline void vireo_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* Later loads stay after earlier loads (Xen's rmb()). */
static inline void vireo_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* Earlier stores stay before later stores (Xen's wmb()). */
static inline void vireo_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* A spin-wait hint for the CPU. */
static inline void vireo_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

#endif /* VIREO_ATOMICS_H */
