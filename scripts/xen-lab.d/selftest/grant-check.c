/*
 * xen-lab selftest, part 2 (built on the host when a C compiler and the
 * Linux Xen UAPI headers are there): grant tables and event channels between
 * the two domUs.
 *   a: allocates one page for the peer (/dev/xen/gntalloc), writes a greeting,
 *      binds an unbound event channel port for the peer (/dev/xen/evtchn),
 *      publishes gref and port in its xenstore data dir (readable by the
 *      peer), then waits for the doorbell and checks the peer's reply.
 *   b: reads gref and port, maps the page (/dev/xen/gntdev), checks the
 *      greeting, writes a reply, binds the interdomain channel and notifies.
 */
#include <stdint.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

#define PAGE 4096
#define GREETING "ivcom xen-lab greeting from a"
#define REPLY "ivcom xen-lab reply from b"
#define REPLY_OFF 2048

static int fail(const char *what) {
  perror(what);
  return 1;
}

/* Read an integer from xenstore, retrying until it exists and is readable. */
static long xs_read_long(const char *path, int seconds) {
  char cmd[256], buf[64];
  snprintf(cmd, sizeof cmd, "xenstore-read %s 2>/dev/null", path);
  for (int i = 0; i < seconds; i++) {
    FILE *p = popen(cmd, "r");
    if (p) {
      int ok = fgets(buf, sizeof buf, p) != NULL;
      int st = pclose(p);
      if (ok && st == 0) return strtol(buf, NULL, 10);
    }
    sleep(1);
  }
  fprintf(stderr, "grant-check: timed out reading %s\n", path);
  exit(2);
}

static int role_a(int self, int peer, int ev) {
  int ga = open("/dev/xen/gntalloc", O_RDWR);
  if (ga < 0) return fail("open /dev/xen/gntalloc");
  struct ioctl_gntalloc_alloc_gref *req = calloc(1, sizeof *req + sizeof(uint32_t));
  if (!req) return fail("calloc");
  req->domid = (uint16_t)peer;
  req->flags = GNTALLOC_FLAG_WRITABLE;
  req->count = 1;
  if (ioctl(ga, IOCTL_GNTALLOC_ALLOC_GREF, req)) return fail("IOCTL_GNTALLOC_ALLOC_GREF");
  char *pg = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, ga, (off_t)req->index);
  if (pg == MAP_FAILED) return fail("mmap gntalloc");
  memset(pg, 0, PAGE);
  strcpy(pg, GREETING);

  struct ioctl_evtchn_bind_unbound_port ub = {.remote_domain = (unsigned)peer};
  int port = ioctl(ev, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &ub);
  if (port < 0) return fail("IOCTL_EVTCHN_BIND_UNBOUND_PORT");

  char cmd[512];
  snprintf(cmd, sizeof cmd,
           "xenstore-write data/lab-gref %u data/lab-port %d && "
           "xenstore-chmod data/lab-gref n%d r%d && xenstore-chmod data/lab-port n%d r%d",
           req->gref_ids[0], port, self, peer, self, peer);
  if (system(cmd) != 0) {
    fprintf(stderr, "grant-check: publishing in xenstore failed\n");
    return 1;
  }
  printf("grant-check a: shared gref %u with dom %d, event port %d\n", req->gref_ids[0], peer, port);
  fflush(stdout);

  uint32_t fired;
  if (read(ev, &fired, sizeof fired) != (ssize_t)sizeof fired) return fail("read /dev/xen/evtchn");
  int ok = strncmp(pg + REPLY_OFF, REPLY, sizeof REPLY) == 0;
  printf("grant-check a: doorbell on port %u, page says \"%.40s\": %s\n", fired, pg + REPLY_OFF,
         ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}

static int role_b(int peer, int ev) {
  char path[128];
  snprintf(path, sizeof path, "/local/domain/%d/data/lab-port", peer);
  long port = xs_read_long(path, 240);
  snprintf(path, sizeof path, "/local/domain/%d/data/lab-gref", peer);
  long gref = xs_read_long(path, 30);

  int gd = open("/dev/xen/gntdev", O_RDWR);
  if (gd < 0) return fail("open /dev/xen/gntdev");
  struct ioctl_gntdev_map_grant_ref map = {.count = 1};
  map.refs[0].domid = (uint32_t)peer;
  map.refs[0].ref = (uint32_t)gref;
  if (ioctl(gd, IOCTL_GNTDEV_MAP_GRANT_REF, &map)) return fail("IOCTL_GNTDEV_MAP_GRANT_REF");
  char *pg = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gd, (off_t)map.index);
  if (pg == MAP_FAILED) return fail("mmap gntdev");
  int ok = strncmp(pg, GREETING, sizeof GREETING) == 0;
  printf("grant-check b: mapped gref %ld of dom %d: \"%.40s\": %s\n", gref, peer, pg,
         ok ? "OK" : "MISMATCH");
  if (!ok) return 1;
  strcpy(pg + REPLY_OFF, REPLY);

  struct ioctl_evtchn_bind_interdomain bi = {.remote_domain = (unsigned)peer,
                                             .remote_port = (unsigned)port};
  int local = ioctl(ev, IOCTL_EVTCHN_BIND_INTERDOMAIN, &bi);
  if (local < 0) return fail("IOCTL_EVTCHN_BIND_INTERDOMAIN");
  struct ioctl_evtchn_notify n = {.port = (unsigned)local};
  if (ioctl(ev, IOCTL_EVTCHN_NOTIFY, &n)) return fail("IOCTL_EVTCHN_NOTIFY");
  printf("grant-check b: rang the doorbell (local port %d -> remote port %ld)\n", local, port);
  munmap(pg, PAGE);
  return 0;
}

int main(void) {
  const char *role = getenv("LAB_ROLE");
  const char *s = getenv("LAB_SELF_DOMID"), *p = getenv("LAB_PEER_DOMID");
  if (!role || !s || !p) {
    fprintf(stderr, "grant-check: LAB_ROLE, LAB_SELF_DOMID, LAB_PEER_DOMID needed\n");
    return 2;
  }
  alarm(300); /* never hang */
  int ev = open("/dev/xen/evtchn", O_RDWR);
  if (ev < 0) return fail("open /dev/xen/evtchn");
  if (strcmp(role, "a") == 0) return role_a(atoi(s), atoi(p), ev);
  return role_b(atoi(p), ev);
}
