/*
 * A C guest that exercises the runtime's heap and memory functions and prints one line per
 * check ("ok NAME" or "FAIL NAME"), then "heap done".
 */
#include <vireo_guest.h>

static void say(const char *text) { vireo_guest_console_write(text, strlen(text)); }

static int failures;

static void check(int ok, const char *name) {
    say(ok ? "ok " : "FAIL ");
    say(name);
    say("\n");
    if (!ok) failures++;
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    void *page = 0;
    check(posix_memalign(&page, 4096, 100) == 0 && ((uintptr_t)page & 4095) == 0, "aligned 4096");
    check(posix_memalign(&page, 24, 8) != 0, "alignment not a power of two refused");

    char *a = malloc(40);
    check(a && ((uintptr_t)a & 15) == 0, "malloc 16-byte aligned");
    free(a);
    char *b = malloc(40);
    check(b == a, "a freed block is reused for the same size class");

    char *big = malloc(8u << 20);
    check(big != 0, "8 MiB from the heap (beyond the 1 MiB minimum: the memory map was read)");
    if (big) {
        memset(big, 0x5a, 8u << 20);
        check(big[0] == 0x5a && big[(8u << 20) - 1] == 0x5a, "memset over 8 MiB");
        free(big);
    }
    check(malloc((size_t)1 << 40) == 0, "an impossible size returns NULL");

    char text[16] = "abcdefghij";
    memmove(text + 2, text, 8);
    check(memcmp(text, "ababcdefgh", 10) == 0, "memmove overlapping upwards");
    memmove(text, text + 2, 8);
    check(memcmp(text, "abcdefghgh", 10) == 0, "memmove overlapping downwards");
    check(memcmp("abc", "abd", 3) < 0 && memcmp("abd", "abc", 3) > 0, "memcmp orders bytes");

    int *zeros = calloc(64, sizeof(int));
    int all_zero = zeros != 0;
    for (int i = 0; zeros && i < 64; i++) all_zero &= zeros[i] == 0;
    check(all_zero, "calloc zeroes");

    say("heap done\n");
    return failures;
}
