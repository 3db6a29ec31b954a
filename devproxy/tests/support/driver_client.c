/* Test client that talks to the (simulated) driver through the devproxy,
 * the way libnvidia does: the version handshake, a root client, a device
 * and a subdevice, the GPU's name, free. Then the calls a hostile tenant
 * would try, each of which the proxy must refuse before the driver sees
 * it. One line per call: NAME rc=RC errno=ERRNO status=STATUS [extra]
 *
 * usage: driver_client DIR FILTER [uvm]
 *        (DIR holds nvidiactl and nvidia0, and nvidia-uvm with "uvm";
 *        FILTER is the proxy's generated filter, raw sock_filter records,
 *        or "-" inside a sandbox, whose pid 1 installed it already;
 *        "uvm" adds an admitted UVM call, which runs natively, and one
 *        that is not admitted)
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
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "notify.h"

#define IOWR_F(nr, size) (0xC0000000u | ((uint32_t)(size) << 16) | (0x46u << 8) | (nr))

struct nvos64 { uint32_t hRoot, hObjectParent, hObjectNew, hClass; uint64_t pAllocParms, pRightsRequested; uint32_t paramsSize, flags, status, pad; };
struct nvos54 { uint32_t hClient, hObject, cmd, flags; uint64_t params; uint32_t paramsSize, status; };
struct nvos00 { uint32_t hRoot, hObjectParent, hObjectOld, status; };

static void report(const char *name, long rc, uint32_t status, const char *extra) {
    int e = rc < 0 ? errno : 0;
    printf("%s rc=%ld errno=%d status=%u%s%s\n", name, rc, e, status, extra ? " " : "", extra ? extra : "");
    fflush(stdout);
}

static long alloc(int fd, uint32_t root, uint32_t parent, uint32_t new, uint32_t class,
                  void *params, uint32_t *status, uint32_t *handle) {
    struct nvos64 a = {root, parent, new, class, (uint64_t)(uintptr_t)params, 0, 0, 0, 0, 0};
    long rc = ioctl(fd, IOWR_F(0x2b, 48), &a);
    *status = a.status;
    if (handle) *handle = a.hObjectNew;
    return rc;
}

static int thread_ctl, thread_errno;
static long thread_rc;
static unsigned char thread_v[72];

static void *thread_handshake(void *arg) {
    (void)arg;
    thread_v[0] = '2';
    thread_rc = ioctl(thread_ctl, IOWR_F(210, 72), thread_v);
    thread_errno = errno;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) return 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/nvidiactl", argv[1]);
    int ctl = open(path, O_RDWR);
    snprintf(path, sizeof path, "%s/nvidia0", argv[1]);
    int gpu = open(path, O_RDWR);
    if (ctl < 0 || gpu < 0) return 3;

    if (strcmp(argv[2], "-") != 0) {
        int err = install_notify_filter(argv[2]);
        if (err) return err;
    }

    long rc;
    uint32_t st = 0, client = 0;
    /* The handshake, query mode. */
    unsigned char v[72] = {0};
    v[0] = '2';
    rc = ioctl(ctl, IOWR_F(210, 72), v);
    report("version", rc, *(uint32_t *)(v + 4), (char *)v + 8);
    /* The GPUs it may see: the granted ones only, numbered as its nodes. */
    static unsigned char cards[8 * 72];
    rc = ioctl(ctl, IOWR_F(200, sizeof cards), cards);
    char seen[256] = "";
    for (int i = 0; i < 8; i++) {
        unsigned char *e = cards + i * 72;
        if (!e[0]) continue;
        char one[32];
        snprintf(one, sizeof one, "%s%#x:%u", seen[0] ? "," : "",
                 *(uint32_t *)(e + 16), *(uint32_t *)(e + 56));
        strncat(seen, one, sizeof seen - strlen(seen) - 1);
    }
    report("cards", rc, 0, seen);
    /* Root client, device, subdevice. */
    uint32_t none = 0;
    rc = alloc(ctl, 0, 0, 0, 0x41, &none, &st, &client);
    char h[32];
    snprintf(h, sizeof h, "%#x", client);
    report("client", rc, st, h);
    unsigned char devparams[56] = {0};
    rc = alloc(ctl, client, client, 0x1000, 0x80, devparams, &st, NULL);
    report("device", rc, st, NULL);
    uint32_t subdev_id = 0;
    rc = alloc(ctl, client, 0x1000, 0x2000, 0x2080, &subdev_id, &st, NULL);
    report("subdevice", rc, st, NULL);
    /* The GPU's name. */
    unsigned char name[132] = {0};
    struct nvos54 c = {client, 0x2000, 0x20800110, 0, (uint64_t)(uintptr_t)name, 132, 0};
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &c);
    report("name", rc, c.status, (char *)name + 4);

    /* GPU enumeration: only the granted GPUs show; only they are named. */
    uint32_t ids[32];
    struct nvos54 e = {client, client, 0x201, 0, (uint64_t)(uintptr_t)ids, sizeof ids, 0};
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &e);
    char listed[256] = "";
    for (int i = 0; i < 32 && ids[i] != 0xffffffffu; i++) {
        char one[16];
        snprintf(one, sizeof one, "%s%#x", listed[0] ? "," : "", ids[i]);
        strncat(listed, one, sizeof listed - strlen(listed) - 1);
    }
    report("attached", rc, e.status, listed);
    uint32_t mask = 0;
    struct nvos54 m = {client, client, 0x204, 0, (uint64_t)(uintptr_t)&mask, sizeof mask, 0};
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &m);
    char ms[16];
    snprintf(ms, sizeof ms, "%#x", mask);
    report("device_ids", rc, m.status, ms);
    unsigned char otherdev[56] = {0};
    otherdev[0] = 1; /* device instance 1: GPU 0x200, not granted */
    rc = alloc(ctl, client, client, 0x1001, 0x80, otherdev, &st, NULL);
    report("device_not_granted", rc, st, NULL);
    uint32_t pci[3] = {0x300, 0, 0};
    struct nvos54 p = {client, client, 0x21b, 0, (uint64_t)(uintptr_t)pci, sizeof pci, 0};
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &p);
    report("pci_granted", rc, p.status, NULL);
    pci[0] = 0x200;
    p.status = 0;
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &p);
    report("pci_not_granted", rc, p.status, NULL);

    /* What a hostile tenant tries; none may reach the driver. */
    struct nvos54 bad = c;
    rc = ioctl(ctl, IOWR_F(0x2a, 31), &bad);
    report("control_short", rc, 0, NULL);
    rc = ioctl(gpu, IOWR_F(0x2a, 32), &bad);
    report("control_on_gpu_node", rc, bad.status, NULL);
    bad = c; bad.cmd = 0x2080dead;
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &bad);
    report("control_unknown", rc, bad.status, NULL);
    bad = c; bad.paramsSize = 131;
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &bad);
    report("control_wrong_params_size", rc, bad.status, NULL);
    bad = c; bad.params = 0x10;
    rc = ioctl(ctl, IOWR_F(0x2a, 32), &bad);
    report("control_wild_pointer", rc, bad.status, NULL);
    rc = alloc(ctl, client, client, 0x3000, 0xdead, NULL, &st, NULL);
    report("alloc_unknown_class", rc, st, NULL);
    rc = alloc(gpu, client, client, 0x3001, 0x80, devparams, &st, NULL);
    report("alloc_on_gpu_node", rc, st, NULL);
    struct { uint32_t cmd, size; uint64_t ptr; } xfer = {IOWR_F(0x2a, 32), 32, (uint64_t)(uintptr_t)&c};
    rc = ioctl(ctl, IOWR_F(211, 16), &xfer);
    report("xfer", rc, 0, NULL);
    rc = ioctl(ctl, IOWR_F(0x39, 40), v); /* I2C access: not admitted */
    report("i2c", rc, 0, NULL);

    /* The same handshake from another thread: CUDA calls from many. */
    pthread_t t;
    thread_ctl = ctl;
    if (pthread_create(&t, NULL, thread_handshake, NULL) == 0 && pthread_join(t, NULL) == 0) {
        errno = thread_errno;
        report("thread_version", thread_rc, *(uint32_t *)(thread_v + 4), (char *)thread_v + 8);
    }

    if (argc == 4 && strcmp(argv[3], "uvm") == 0) {
        snprintf(path, sizeof path, "%s/nvidia-uvm", argv[1]);
        int uvm = open(path, O_RDWR);
        if (uvm < 0) return 3;
        unsigned char ubuf[64] = {0};
        rc = ioctl(uvm, 23 /* UVM_CREATE_RANGE_GROUP */, ubuf);
        report("uvm_admitted", rc, 0, NULL);
        rc = ioctl(uvm, 10 /* UVM_ADD_SESSION: tools, not admitted */, ubuf);
        report("uvm_not_admitted", rc, 0, NULL);
        close(uvm);
    }

    /* Free the client (and everything under it). */
    struct nvos00 fr = {client, 0, client, 0};
    rc = ioctl(ctl, IOWR_F(0x29, 16), &fr);
    report("free", rc, fr.status, NULL);
    return 0;
}
