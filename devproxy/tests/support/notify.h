/* The sandbox side of the test clients: install the proxy's generated
 * filter (raw sock_filter records in FILTER) with a listener, print the
 * listener's fd number for the proxy to take, and wait until it says go.
 * Returns 0, or the client's exit code for what failed. */
#ifndef AIRLOCK_TEST_NOTIFY_H
#define AIRLOCK_TEST_NOTIFY_H

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int install_notify_filter(const char *filter) {
    static struct sock_filter f[4096];
    FILE *ff = fopen(filter, "rb");
    if (!ff) return 7;
    size_t n = fread(f, sizeof f[0], sizeof f / sizeof f[0], ff);
    fclose(ff);
    struct sock_fprog prog = { .len = (unsigned short)n, .filter = f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return 4;
    int listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                           SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (listener < 0) return 5;
    printf("LISTENER %d\n", listener);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 6;
    return 0;
}

#endif
