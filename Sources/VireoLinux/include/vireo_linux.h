/*
 * vireo_linux.h — the few Linux calls Swift cannot make directly (variadic ioctl, calls the
 * Glibc module does not export). Host-only; every call Vireo makes to the kernel for memory
 * and, later, KVM goes through these, so they can be traced in one place.
 */
#ifndef VIREO_LINUX_H
#define VIREO_LINUX_H

#include <stdint.h>

/* memfd_create(2); returns the fd or -1 with errno set. */
int vireo_memfd_create(const char *name, unsigned int flags);
/* MFD_CLOEXEC, for Swift. */
unsigned int vireo_mfd_cloexec(void);

/* ioctl(2) with a pointer or an integer argument; returns the result or -1 with errno set. */
int vireo_ioctl_ptr(int fd, unsigned long request, void *arg);
int vireo_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* unshare(CLONE_NEWNET) (needs _GNU_SOURCE): the calling thread alone moves into a new, empty
 * network namespace (tests that make bridges and TAPs without touching the host's). 0 or -1. */
int vireo_unshare_network(void);

/*
 * futex(2) on a 32-bit word: wait while *addr == expected (up to timeout_ns, or forever when
 * negative); returns 0 when woken, -1 with errno EAGAIN (value changed), ETIMEDOUT or EINTR.
 * wake wakes up to `count` waiters and returns how many woke.
 */
int vireo_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns);
int vireo_futex_wake(uint32_t *addr, int count);

/* The calling thread's ID (gettid(2)): what a cgroup's `tasks` or `cgroup.threads` takes. */
int vireo_gettid(void);

/*
 * CPU affinity of the calling thread (sched_getaffinity(2) / sched_setaffinity(2), which need
 * _GNU_SOURCE). allowed_cpus writes up to `capacity` CPU numbers the thread may run on, in
 * order, and returns how many (or -1 with errno set); pin_thread restricts the thread to one
 * CPU and returns 0 (or -1 with errno set). Benchmarks use them to keep two sides on two cores.
 */
int vireo_allowed_cpus(int *cpus, int capacity);
int vireo_pin_thread(int cpu);

/*
 * Waking a thread out of a blocking call (a vCPU thread in KVM_RUN) with a signal whose
 * handler does nothing: the call returns EINTR. wakeup_signal is the signal Vireo uses
 * (a real-time one, SIGRTMIN); install_wakeup_handler installs the empty handler for it
 * process-wide (idempotent; 0 or -1 with errno set); unblock_signal unblocks it in the
 * calling thread; current_thread is pthread_self(); signal_thread is pthread_kill(), which
 * returns 0 or an errno value (the thread must still exist).
 */
int vireo_wakeup_signal(void);
int vireo_install_wakeup_handler(int signo);
int vireo_unblock_signal(int signo);
unsigned long vireo_current_thread(void);
int vireo_signal_thread(unsigned long thread, int signo);

/*
 * fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (which need _GNU_SOURCE and
 * <linux/falloc.h>): frees the byte range [offset, offset + length) of a regular file, which
 * then reads as zeros, without changing the file's size. 0, or -1 with errno set (EOPNOTSUPP
 * where the file system cannot punch holes).
 */
int vireo_punch_hole(int fd, int64_t offset, int64_t length);

#endif
