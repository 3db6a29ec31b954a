/* Test client for the devproxy forwarder: the sandbox side of the
 * mechanism, without a GPU. It installs a seccomp filter that sends every
 * ioctl to a listener (except request 37, a UVM number, allowed natively),
 * prints the listener's fd number, waits for the proxy to attach, then
 * makes a series of calls on DEVICE (which the test tells the proxy to
 * treat as /dev/nvidiactl) and prints one line per call:
 *   NAME rc=RC errno=ERRNO status=STATUS
 *
 * The filter is the one the proxy generates for the sandbox
 * (`filter::ioctl_filter`), read from FILTER as raw sock_filter records.
 *
 * usage: client DEVICE CONTROL_CMD CONTROL_SIZE FILTER
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
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

struct nvos54 { /* NVOS54_PARAMETERS */
    uint32_t hClient, hObject, cmd, flags;
    uint64_t params;
    uint32_t paramsSize, status;
};

/* errno is read before anything else can change it. */
static void report(const char *name, long rc, uint32_t status) {
    int e = rc < 0 ? errno : 0;
    printf("%s rc=%ld errno=%d status=%u\n", name, rc, e, status);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    uint32_t ctl_cmd = (uint32_t)strtoul(argv[2], NULL, 0);
    uint32_t ctl_size = (uint32_t)strtoul(argv[3], NULL, 0);
    int dev = open(argv[1], O_RDWR);
    int pipefd[2];
    if (dev < 0 || pipe(pipefd) < 0) return 3;

    int err = install_notify_filter(argv[4]);
    if (err) return err;

    /* The version handshake, query mode: forwarded (the stand-in device
     * answers ENOTTY: it reached it). */
    unsigned char version[72] = {0};
    version[0] = '2';
    report("version", ioctl(dev, IOWR_F(210, 72), version), 0);
    /* Its type and direction bits changed: the driver ignores them, and
     * the proxy forwards the canonical request. */
    report("version_odd_bits", ioctl(dev, (72u << 16) | ('X' << 8) | 210, version), 0);
    /* Wrong size: refused, never reaches the device. */
    report("version_bad_size", ioctl(dev, IOWR_F(210, 71), version), 0);
    /* XFER indirection: refused. */
    unsigned char xfer[16] = {0};
    report("xfer", ioctl(dev, IOWR_F(211, 16), xfer), 0);
    /* An unknown control: rc 0, status NV_ERR_NOT_SUPPORTED written back. */
    struct nvos54 c = {0};
    c.cmd = 0xdeadbeef;
    long rc = ioctl(dev, IOWR_F(0x2a, 32), &c); /* before reading c.status */
    report("control_unknown", rc, c.status);
    /* An admitted control: its params are copied into the proxy and the
     * call forwarded. */
    void *params = calloc(1, ctl_size);
    struct nvos54 ok = {0};
    ok.cmd = ctl_cmd;
    ok.params = (uint64_t)(uintptr_t)params;
    ok.paramsSize = ctl_size;
    rc = ioctl(dev, IOWR_F(0x2a, 32), &ok);
    report("control_ok", rc, ok.status);
    /* The pointer survives the round trip unchanged. */
    printf("control_ok_pointer %s\n", ok.params == (uint64_t)(uintptr_t)params ? "same" : "changed");
    /* A wild params pointer: EFAULT, never performed. */
    struct nvos54 wild = ok;
    wild.params = 0x10;
    rc = ioctl(dev, IOWR_F(0x2a, 32), &wild);
    report("control_wild", rc, wild.status);
    /* A wild block pointer. */
    report("block_wild", ioctl(dev, IOWR_F(210, 72), (void *)0x10), 0);
    /* Not a device: ENOTTY. */
    report("pipe", ioctl(pipefd[0], IOWR_F(210, 72), version), 0);
    /* A UVM number: allowed by the filter itself, no notification. */
    report("uvm_native", ioctl(dev, 37, version), 0);
    /* Another device's request sharing an escape's nr (TIOCGPTPEER, nr
     * 0x41) on a pipe: notified, and let through as made (no driver could
     * act on its (nr, size)); the pipe answers ENOTTY itself. */
    report("pipe_other_device", ioctl(pipefd[0], 0x5441, 0), 0);
    /* Another device's ioctl (TCGETS): not the filter's business. */
    report("tcgets", ioctl(pipefd[0], 0x5401, version), 0);
    return 0;
}
