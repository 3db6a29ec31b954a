/* Test client for the fd-swap race: one thread issues RM_CONTROL (which
 * the driver takes only on nvidiactl) on fd N in a loop while another
 * keeps swapping nvidia0 and nvidiactl onto N with dup2. A proxy that
 * checked one file and then let the call run on whatever N is at that
 * moment would deliver some controls to nvidia0. Prints the counts of
 * results: "done OK EINVAL OTHER".
 *
 * usage: race_client DIR ROUNDS FILTER
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "notify.h"

#define IOWR_F(nr, size) (0xC0000000u | ((uint32_t)(size) << 16) | (0x46u << 8) | (nr))

struct nvos54 { uint32_t hClient, hObject, cmd, flags; uint64_t params; uint32_t paramsSize, status; };

static int ctl, gpu, target = 100;
static volatile int stop;

static void *swapper(void *arg) {
    (void)arg;
    while (!stop) {
        dup2(gpu, target);
        dup2(ctl, target);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int rounds = atoi(argv[2]);
    char path[4096];
    snprintf(path, sizeof path, "%s/nvidiactl", argv[1]);
    ctl = open(path, O_RDWR);
    snprintf(path, sizeof path, "%s/nvidia0", argv[1]);
    gpu = open(path, O_RDWR);
    if (ctl < 0 || gpu < 0 || dup2(ctl, target) < 0) return 3;
    int err = install_notify_filter(argv[3]);
    if (err) return err;
    pthread_t t;
    pthread_create(&t, NULL, swapper, NULL);
    int ok = 0, einval = 0, other = 0;
    static unsigned char params[132];
    for (int i = 0; i < rounds; i++) {
        /* An unknown object: the simulator answers a status; only where
         * the call went matters. */
        struct nvos54 c = {1, 2, 0x20800110, 0, (uint64_t)(uintptr_t)params, 132, 0};
        long rc = ioctl(target, IOWR_F(0x2a, 32), &c);
        if (rc == 0) ok++;
        else if (errno == EINVAL) einval++;
        else other++;
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("done %d %d %d\n", ok, einval, other);
    fflush(stdout);
    return 0;
}
