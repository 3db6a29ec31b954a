/* Benchmark client: the cost of one RM control (the GPU name) and of one
 * refused call, on the SIMULATED driver's nvidiactl in DIR, directly or
 * through a sandbox's device proxy (run it inside a sandbox with --gpu).
 * Prints: control_ns MEAN, refused_ns MEAN (nanoseconds per call).
 *
 * usage: ioctl_bench DIR N
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define IOWR_F(nr, size) (0xC0000000u | ((uint32_t)(size) << 16) | (0x46u << 8) | (nr))

struct nvos64 { uint32_t hRoot, hObjectParent, hObjectNew, hClass; uint64_t pAllocParms, pRightsRequested; uint32_t paramsSize, flags, status, pad; };
struct nvos54 { uint32_t hClient, hObject, cmd, flags; uint64_t params; uint32_t paramsSize, status; };

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long n = atol(argv[2]);
    char path[4096];
    snprintf(path, sizeof path, "%s/nvidiactl", argv[1]);
    int ctl = open(path, O_RDWR);
    if (ctl < 0) return 3;
    uint32_t none = 0, subdev_id = 0;
    unsigned char devparams[56] = {0};
    struct nvos64 a = {0, 0, 0, 0x41, (uint64_t)(uintptr_t)&none, 0, 0, 0, 0, 0};
    if (ioctl(ctl, IOWR_F(0x2b, 48), &a) != 0 || a.status) return 4;
    uint32_t client = a.hObjectNew;
    /* The first GPU it may use, and its device instance, as a real
     * client finds them. */
    uint32_t ids[32], info[8] = {0};
    struct nvos54 q = {client, client, 0x201, 0, (uint64_t)(uintptr_t)ids, sizeof ids, 0};
    if (ioctl(ctl, IOWR_F(0x2a, 32), &q) != 0 || q.status) return 8;
    info[0] = ids[0];
    struct nvos54 qi = {client, client, 0x205, 0, (uint64_t)(uintptr_t)info, sizeof info, 0};
    if (ioctl(ctl, IOWR_F(0x2a, 32), &qi) != 0 || qi.status) return 9;
    memcpy(devparams, &info[2], 4);
    struct nvos64 d = {client, client, 0x1000, 0x80, (uint64_t)(uintptr_t)devparams, 0, 0, 0, 0, 0};
    struct nvos64 s = {client, 0x1000, 0x2000, 0x2080, (uint64_t)(uintptr_t)&subdev_id, 0, 0, 0, 0, 0};
    if (ioctl(ctl, IOWR_F(0x2b, 48), &d) != 0 || d.status) return 5;
    if (ioctl(ctl, IOWR_F(0x2b, 48), &s) != 0 || s.status) return 6;
    unsigned char name[132];
    struct nvos54 c = {client, 0x2000, 0x20800110, 0, (uint64_t)(uintptr_t)name, 132, 0};
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
        c.status = 0;
        if (ioctl(ctl, IOWR_F(0x2a, 32), &c) != 0 || c.status) return 7;
    }
    double t1 = now_ns();
    /* Refused by the proxy (an unknown control); the driver's own
     * NOT_SUPPORTED when there is no proxy. */
    struct nvos54 bad = c;
    for (long i = 0; i < n; i++) {
        bad.cmd = 0x2080dead;
        ioctl(ctl, IOWR_F(0x2a, 32), &bad);
    }
    double t2 = now_ns();
    printf("control_ns %.0f\nrefused_ns %.0f\n", (t1 - t0) / n, (t2 - t1) / n);
    return 0;
}
