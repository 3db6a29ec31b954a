/* The floor of a seccomp user-notification round trip on this machine:
 * one thread makes a notified ioctl, WORKERS threads of the same process
 * answer it at once (no copies, no checks), with and without
 * SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, and with a lock so that only one
 * worker waits in the receive, handed to the next after each answer (the
 * device proxy hands it over only before a call that reaches the driver,
 * so its refused calls cost what one worker's do).
 * Prints one line per case: mean microseconds per round trip.
 *
 * usage: notify_floor [N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#define REQ 0x12345678

static int listener, locked;
static pthread_mutex_t turn = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg) {
    (void)arg;
    struct seccomp_notif n;
    struct seccomp_notif_resp r;
    for (;;) {
        memset(&n, 0, sizeof n);
        if (locked) pthread_mutex_lock(&turn);
        int rc = ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n);
        if (rc < 0) {
            if (locked) pthread_mutex_unlock(&turn);
            if (errno == EINTR || errno == ENOENT) continue;
            return NULL;
        }
        memset(&r, 0, sizeof r);
        r.id = n.id;
        r.error = -ENOTTY;
        ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r);
        if (locked) pthread_mutex_unlock(&turn);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* One case in a child process (a filter cannot be removed). */
static void run(int sync, int workers, int lock, long n) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid != 0) {
        waitpid(pid, NULL, 0);
        return;
    }
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, REQ, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog p = {sizeof f / sizeof f[0], f};
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &p);
    if (listener < 0) _exit(1);
    if (sync && ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, 1UL) < 0) _exit(2);
    locked = lock;
    for (int i = 0; i < workers; i++) {
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
    }
    usleep(20000);
    double t0 = now();
    for (long i = 0; i < n; i++) ioctl(0, REQ, 0);
    double t1 = now();
    printf("| %s | %d | %s | %.1f µs |\n", sync ? "yes" : "no", workers,
           lock ? "one receives" : "all receive", (t1 - t0) / n / 1e3);
    fflush(stdout);
    _exit(0);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000;
    printf("| same-CPU wake-up | workers | waiting | round trip |\n|---|---|---|---|\n");
    run(0, 1, 0, n);
    run(1, 1, 0, n);
    run(1, 4, 0, n);
    run(1, 4, 1, n);
    return 0;
}
