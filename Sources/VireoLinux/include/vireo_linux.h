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

#endif
