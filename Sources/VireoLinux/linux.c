#define _GNU_SOURCE
#include <sys/ioctl.h>
#include <sys/mman.h>
#include "vireo_linux.h"

int vireo_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
unsigned int vireo_mfd_cloexec(void) { return MFD_CLOEXEC; }
int vireo_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int vireo_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
