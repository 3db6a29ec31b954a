/* Test client for controls whose params embed pointers and fds, the way
 * CUDA's and nvidia-smi's first calls carry them: the class list (asked
 * for its length with a NULL list, then fetched), the build version (three
 * string buffers) and an object export naming a control fd. Then what a
 * hostile tenant tries with them: a count past the driver's bound, a
 * list pointer that is not mapped, an fd that is not an nvidia node.
 * One line per call: NAME rc=RC errno=ERRNO status=STATUS [extra]
 *
 * usage: embedded_client DIR FILTER|-
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "notify.h"

#define IOWR_F(nr, size) (0xC0000000u | ((uint32_t)(size) << 16) | (0x46u << 8) | (nr))

struct nvos64 { uint32_t hRoot, hObjectParent, hObjectNew, hClass; uint64_t pAllocParms, pRightsRequested; uint32_t paramsSize, flags, status, pad; };
struct nvos54 { uint32_t hClient, hObject, cmd, flags; uint64_t params; uint32_t paramsSize, status; };
struct classlist { uint32_t numClasses, pad; uint64_t classList; };
struct build { uint32_t sizeOfStrings, pad; uint64_t drv, ver, title; uint32_t cl, ocl; };
struct export_fd { unsigned char object[16]; int32_t fd; uint32_t flags; };

static void report(const char *name, long rc, uint32_t status, const char *extra) {
    int e = rc < 0 ? errno : 0;
    printf("%s rc=%ld errno=%d status=%u%s%s\n", name, rc, e, status, extra ? " " : "", extra ? extra : "");
    fflush(stdout);
}

static long control(int fd, uint32_t client, uint32_t obj, uint32_t cmd, void *p, uint32_t size, uint32_t *status) {
    struct nvos54 c = {client, obj, cmd, 0, (uint64_t)(uintptr_t)p, size, 0};
    long rc = ioctl(fd, IOWR_F(0x2a, 32), &c);
    *status = c.status;
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/nvidiactl", argv[1]);
    int ctl = open(path, O_RDWR);
    if (ctl < 0) return 3;
    if (strcmp(argv[2], "-") != 0) {
        int err = install_notify_filter(argv[2]);
        if (err) return err;
    }
    long rc;
    uint32_t st = 0, client = 0, none = 0;
    struct nvos64 a = {0, 0, 0, 0x41, (uint64_t)(uintptr_t)&none, 0, 0, 0, 0, 0};
    rc = ioctl(ctl, IOWR_F(0x2b, 48), &a);
    client = a.hObjectNew;
    report("client", rc, a.status, NULL);
    unsigned char devparams[56] = {0};
    struct nvos64 d = {client, client, 0x1000, 0x80, (uint64_t)(uintptr_t)devparams, 0, 0, 0, 0, 0};
    rc = ioctl(ctl, IOWR_F(0x2b, 48), &d);
    report("device", rc, d.status, NULL);

    /* The class list: its length first, then the list itself. */
    struct classlist q = {0, 0, 0};
    rc = control(ctl, client, 0x1000, 0x800201, &q, sizeof q, &st);
    char n[32];
    snprintf(n, sizeof n, "%u", q.numClasses);
    report("classes_count", rc, st, n);
    uint32_t *list = calloc(q.numClasses ? q.numClasses : 1, 4);
    struct classlist l = {q.numClasses, 0, (uint64_t)(uintptr_t)list};
    rc = control(ctl, client, 0x1000, 0x800201, &l, sizeof l, &st);
    char seen[256] = "";
    for (uint32_t i = 0; i < l.numClasses && i < 16; i++) {
        char one[16];
        snprintf(one, sizeof one, "%s%#x", seen[0] ? "," : "", list[i]);
        strncat(seen, one, sizeof seen - strlen(seen) - 1);
    }
    report("classes", rc, st, seen);
    /* The sandbox's own address of the list: the driver must never see it. */
    printf("list_addr %#lx\n", (unsigned long)(uintptr_t)list);
    /* The pointer is given back as it was. */
    printf("list_kept %d\n", l.classList == (uint64_t)(uintptr_t)list);

    /* The build version: three strings. */
    char drv[64] = "", ver[64] = "", title[64] = "";
    struct build b = {sizeof drv, 0, (uint64_t)(uintptr_t)drv, (uint64_t)(uintptr_t)ver,
                      (uint64_t)(uintptr_t)title, 0, 0};
    rc = control(ctl, client, client, 0x101, &b, sizeof b, &st);
    char strings[256];
    snprintf(strings, sizeof strings, "%s|%s|%s|%u", drv, ver, title, b.cl);
    report("build", rc, st, strings);

    /* An export naming the caller's control fd, at a number the proxy
     * itself is unlikely to have open: the driver resolves it in the
     * calling process's table. */
    int ctl2 = dup2(ctl, 900);
    struct export_fd x = {{0}, ctl2, 0};
    rc = control(ctl, client, client, 0x3d05, &x, sizeof x, &st);
    snprintf(n, sizeof n, "%d", x.fd == ctl2);
    report("export", rc, st, n);

    /* An OS event: its `data` is the fd its events are queued on. */
    struct nv0005 { uint32_t hParentClient, hSrcResource, hClass, notifyIndex; uint64_t data; };
    struct nv0005 ev = {client, client, 0x79, 0, (uint64_t)ctl2};
    struct nvos64 e = {client, client, 0x3000, 0x79, (uint64_t)(uintptr_t)&ev, 0, 0, 0, 0, 0};
    rc = ioctl(ctl, IOWR_F(0x2b, 48), &e);
    snprintf(n, sizeof n, "%d", ev.data == (uint64_t)ctl2);
    report("event", rc, e.status, n);

    /* What a hostile tenant tries. */
    struct classlist huge = {0x10000000u, 0, (uint64_t)(uintptr_t)list};
    rc = control(ctl, client, 0x1000, 0x800201, &huge, sizeof huge, &st);
    report("classes_huge", rc, st, NULL);
    struct classlist wild = {5, 0, 0x10};
    rc = control(ctl, client, 0x1000, 0x800201, &wild, sizeof wild, &st);
    report("classes_wild", rc, st, NULL);
    int null = open("/dev/null", O_RDWR);
    struct export_fd y = {{0}, null, 0};
    rc = control(ctl, client, client, 0x3d05, &y, sizeof y, &st);
    report("export_not_device", rc, st, NULL);
    struct export_fd z = {{0}, 999, 0};
    rc = control(ctl, client, client, 0x3d05, &z, sizeof z, &st);
    report("export_bad_fd", rc, st, NULL);
    struct nv0005 other = {0xc1d0fffe, client, 0x79, 0, (uint64_t)ctl2};
    e.hObjectNew = 0x3001;
    e.pAllocParms = (uint64_t)(uintptr_t)&other;
    e.status = 0;
    rc = ioctl(ctl, IOWR_F(0x2b, 48), &e);
    report("event_other_client", rc, e.status, NULL);
    struct nv0005 nodev = {client, client, 0x79, 0, (uint64_t)null};
    e.hObjectNew = 0x3002;
    e.pAllocParms = (uint64_t)(uintptr_t)&nodev;
    e.status = 0;
    rc = ioctl(ctl, IOWR_F(0x2b, 48), &e);
    report("event_not_device", rc, e.status, NULL);
    /* Register ops stay refused: their shape is not marshalled. */
    unsigned char regops[48] = {0};
    rc = control(ctl, client, client, 0x20800122, regops, sizeof regops, &st);
    report("reg_ops", rc, st, NULL);
    return 0;
}
