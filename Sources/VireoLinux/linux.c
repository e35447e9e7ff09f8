#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include "vireo_linux.h"

int vireo_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
unsigned int vireo_mfd_cloexec(void) { return MFD_CLOEXEC; }
int vireo_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int vireo_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

int vireo_unshare_network(void) { return unshare(CLONE_NEWNET); }

int vireo_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = 0;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, tsp, 0, 0);
}

int vireo_futex_wake(uint32_t *addr, int count) {
    return (int)syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, count, 0, 0, 0);
}

int vireo_gettid(void) {
    return (int)syscall(SYS_gettid);
}

int vireo_allowed_cpus(int *cpus, int capacity) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    }
    return count;
}

int vireo_pin_thread(int cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) { errno = EINVAL; return -1; }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

static void vireo_wakeup_handler(int signo) { (void)signo; }

int vireo_wakeup_signal(void) { return SIGRTMIN; }

int vireo_install_wakeup_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = vireo_wakeup_handler;
    sigemptyset(&action.sa_mask);
    /* SA_RESTART keeps other threads' restartable calls from seeing EINTR if a late kick
       lands on them; KVM_RUN returns EINTR regardless. */
    action.sa_flags = SA_RESTART;
    return sigaction(signo, &action, 0);
}

int vireo_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    int error = pthread_sigmask(SIG_UNBLOCK, &set, 0);
    if (error != 0) { errno = error; return -1; }
    return 0;
}

unsigned long vireo_current_thread(void) { return (unsigned long)pthread_self(); }

int vireo_signal_thread(unsigned long thread, int signo) { return pthread_kill((pthread_t)thread, signo); }

int vireo_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}
