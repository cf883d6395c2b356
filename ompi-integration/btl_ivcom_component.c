/*
 * btl/ivcom: component (parameters, init, modex).
 */
#include "opal_config.h"

#include <dlfcn.h>
#include <libgen.h>
#include <stdarg.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

#include "opal/mca/btl/base/base.h"
#include "opal/mca/installdirs/installdirs.h"
#include "opal/runtime/opal.h"
#include "opal/util/output.h"
#include "opal/util/show_help.h"

#include "btl_ivcom.h"
#include "btl_ivcom_compat.h"
#include "btl_ivcom_frag.h"

static int ivcom_register(void);
static int ivcom_open(void);
static int ivcom_close(void);
static mca_btl_base_module_t **ivcom_init(int *num_btls, bool enable_progress_threads,
                                          bool enable_mpi_threads);

mca_btl_ivcom_component_t mca_btl_ivcom_component = {
    .super = {
        .btl_version = {
            MCA_BTL_DEFAULT_VERSION("ivcom"),
            .mca_open_component = ivcom_open,
            .mca_close_component = ivcom_close,
            .mca_register_component_params = ivcom_register,
        },
        .btl_data = {
            .param_field = MCA_BASE_METADATA_PARAM_NONE,
        },
        .btl_init = ivcom_init,
        .btl_progress = mca_btl_ivcom_progress,
    },
};

/* The implementation's entry point, looked up by the loader
 * (btl_ivcom_loader.c, the mca_btl_ivcom.so Open MPI loads): this
 * component, if the loader was built against the same Open MPI release. */
__attribute__((visibility("default"))) mca_btl_base_component_t *
mca_btl_ivcom_impl(const char *built_for)
{
    if (NULL == built_for || 0 != strcmp(built_for, IVCOM_BUILT_FOR)) {
        return NULL;
    }
    return &mca_btl_ivcom_component.super;
}

/* The default ring: 512 KiB per direction (records of btl_max_send_size,
 * 64 KiB, set in ivcom_register), half of the 1 MiB L2 cache of a core of
 * this project's machines: a stream through it stays in the two cores'
 * own caches. 4 MiB rings streamed faster in some rounds and below 0.9 of
 * vader's rate in 14 of 24 (down to 0.14), where the shared cache they run
 * through was contended; 512 KiB rings in 1 of 24 (docs/PERFORMANCE.md,
 * "Rings that fit the private caches"). Under the ring budget a ring
 * touches at most its share of it (docs/design.md). */
#define IVCOM_DEFAULT_RING (512UL << 10)
/* The smallest btl_ivcom_min_record: any record of the smallest ring (4
 * KiB of data holds records of up to 2,040 bytes) qualifies. */
#define IVCOM_MIN_RECORD 1024

#define IVCOM_HELP_FILE "help-mpi-btl-ivcom.txt"

/* Where the help file is: beside the component (a build directory, or
 * make install), else in Open MPI's own help directory (the Debian
 * package puts it there, with Open MPI's help files). Looked up once; the
 * directory beside the component is added to show_help's search path. */
static bool help_found(void)
{
    static int found = -1;
    char path[4096];
    Dl_info info;
    if (found >= 0) {
        return found;
    }
    found = 0;
    if (dladdr((void *) &mca_btl_ivcom_component, &info) && info.dli_fname) {
        char *copy = strdup(info.dli_fname);
        if (copy) {
            const char *dir = dirname(copy);
            snprintf(path, sizeof(path), "%s/%s", dir, IVCOM_HELP_FILE);
            if (0 == access(path, R_OK)) {
                opal_show_help_add_dir(dir);
                found = 1;
            }
            free(copy);
        }
    }
    if (!found && NULL != opal_install_dirs.opaldatadir) {
        snprintf(path, sizeof(path), "%s/%s", opal_install_dirs.opaldatadir, IVCOM_HELP_FILE);
        found = 0 == access(path, R_OK);
    }
    return found;
}

/* show_help with our help file; a plain message if the file is missing. */
void mca_btl_ivcom_help(const char *topic, const char *fallback, ...)
{
    va_list ap;
    va_start(ap, fallback);
    /* Rendered here and printed directly: forwarding through the runtime's
     * show_help aggregation fails for messages raised during MPI_Init. */
    char *text = help_found() ? opal_show_help_vstring(IVCOM_HELP_FILE, topic, true, ap) : NULL;
    if (NULL != text) {
        opal_output(0, "%s", text);
        free(text);
    } else {
        char *msg = NULL;
        if (vasprintf(&msg, fallback, ap) >= 0) {
            opal_output(0, "btl/ivcom: %s", msg);
            free(msg);
        }
    }
    va_end(ap);
}

static int reg_string(const char *name, const char *desc, char **storage, const char *def)
{
    *storage = (char *) def;
    return mca_base_component_var_register(&mca_btl_ivcom_component.super.btl_version, name, desc,
                                           MCA_BASE_VAR_TYPE_STRING, NULL, 0, 0, OPAL_INFO_LVL_4,
                                           MCA_BASE_VAR_SCOPE_READONLY, storage);
}

static int reg_ulong(const char *name, const char *desc, unsigned long *storage, unsigned long def)
{
    *storage = def;
    return mca_base_component_var_register(&mca_btl_ivcom_component.super.btl_version, name, desc,
                                           MCA_BASE_VAR_TYPE_UNSIGNED_LONG, NULL, 0, 0,
                                           OPAL_INFO_LVL_4, MCA_BASE_VAR_SCOPE_READONLY, storage);
}

static int reg_int(const char *name, const char *desc, int *storage, int def)
{
    *storage = def;
    return mca_base_component_var_register(&mca_btl_ivcom_component.super.btl_version, name, desc,
                                           MCA_BASE_VAR_TYPE_INT, NULL, 0, 0, OPAL_INFO_LVL_4,
                                           MCA_BASE_VAR_SCOPE_READONLY, storage);
}

static int ivcom_register(void)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    mca_btl_base_module_t *m = &mca_btl_ivcom_module.super;

    reg_string("backend",
               "How co-resident peers share memory: auto (xen on a Xen guest with /dev/xen, "
               "host otherwise), host (shared memory of one kernel: processes, containers, "
               "network-namespace VMs), xen (grant tables and event channels), none (TCP for "
               "every peer)",
               &c->backend, "auto");
    reg_string("host_dir",
               "Hypervisor directory of the host backend: processes that see the same "
               "directory are co-resident (default: $IVCOM_HOST_DIR or /dev/shm/ivcom)",
               &c->host_dir, "");
    reg_ulong("ring_size",
              "Bytes of each ring direction between two co-resident peers (power of two, "
              "4096 to 1073741824); halved for a pair whose backend cannot share that much "
              "(Xen's gntalloc page limit, btl_ivcom_shm_limit), with smaller records once "
              "the largest no longer fits, down to records of btl_ivcom_min_record, then TCP",
              &c->ring_size, IVCOM_DEFAULT_RING);
    reg_ulong("min_record",
              "Smallest records a ring shrunk to fit its backend may have (Xen's gntalloc "
              "page limit shared by many pairs, btl_ivcom_shm_limit); below them the pair uses "
              "TCP. 0: btl_ivcom_eager_limit (rings of at least 32 KiB, 18 pages a pair). 1024 "
              "to btl_ivcom_eager_limit: smaller rings, down to 4 KiB (records of 2040 bytes, 4 "
              "pages a pair), keep more pairs of a crowded pool off TCP; messages larger than "
              "the records go as runs of records. Measured on Xen under emulation (6 ranks on 2 "
              "CPUs), 4 KiB rings took half of TCP's time up to 1 KiB and up to 1.9 times it "
              "from 2 KiB",
              &c->min_record, 0);
    reg_ulong("max_record",
              "Largest ring record in bytes; must hold btl_ivcom_max_send_size (0: exactly "
              "btl_ivcom_max_send_size, which lets a backend with little shareable memory, "
              "e.g. Xen's gntalloc limit, get smaller rings instead of TCP)",
              &c->max_record, 0);
    reg_ulong("shm_limit",
              "Bytes of rings the host backend of this process may share at once (0: no "
              "limit); a pair whose rings do not fit gets smaller rings, then TCP. Rings are "
              "sealed memory of the process that offers them, not files of host_dir",
              &c->shm_limit, 0);
    reg_ulong("ring_budget",
              "Bytes of ring data the rings this process sends on share (0: no budget, each "
              "ring whole): each ring's records stay within its share (the budget divided by "
              "the rings, at least 24 KiB, at most the ring), and large messages are cut into "
              "pieces that fit twice in it, so with many co-resident peers each ring touches "
              "few of its pages however much is in flight. A process with one co-resident "
              "peer and a ring larger than the budget uses it whole once it sends records of "
              "btl_ivcom_max_send_size (a stream of large messages)",
              &c->ring_budget, 7UL << 18);
    reg_ulong("queue_size",
              "Data bytes of each receive queue; 0 (the default): no queue path, each pair "
              "of co-resident ranks gets rings of its own. Otherwise a power of two from "
              "4 KiB to 1 GiB: each process keeps one receive queue per peer domain (with "
              "the host backend a network namespace: an emulated VM, a container; all "
              "ranks of one machine's mpirun are one domain), written by all of that "
              "domain's ranks, and co-resident pairs talk through those queues instead of "
              "rings, so shared memory grows with the domains, not with the pairs. Under "
              "xen a domain is a domU (its ranks use host queues among themselves); there "
              "a pair whose fair share of gntalloc's page pool holds no rings takes queues "
              "that fit the pool even when this is 0",
              &c->queue_size, 0);
    reg_int("crowded_queues",
            "Xen: 1 (the default): a pair whose fair share of gntalloc's page pool (1,024 "
            "pages a domain by default, shared by the rings of all its ranks) holds no rings "
            "with records of btl_ivcom_min_record takes receive queues that fit the pool (one "
            "per process and peer domain, shared by that domain's ranks: with 8 domUs of 8 "
            "ranks, queues of 64 KiB); 0: rings while the pool holds them (first come, first "
            "served), then TCP. No effect when "
            "btl_ivcom_queue_size is set, nor under the host backend",
            &c->crowded_queues, 1);
    reg_ulong("piece_size",
              "Bytes of the pieces a large message is cut into while the receiver keeps up "
              "(less than btl_ivcom_max_send_size of this pair's sent data not yet taken): "
              "it copies one piece out while the sender copies the next in; pieces of "
              "btl_ivcom_max_send_size otherwise (a stream). Raised to btl_ivcom_eager_limit; "
              "0, or btl_ivcom_max_send_size or more: never cut",
              &c->piece_size, 16UL << 10);
    reg_int("nt_copy",
            "How this process copies the large pieces of a message (4 KiB or more of "
            "contiguous data) into a ring or receive queue. 2 (the default): through the "
            "caches while the peer's CPU shares a cache with this one, around them "
            "(non-temporal stores) while it does not, as timed reads of the lines the peer "
            "last held tell (btl_ivcom_nt_far_ns); 0: always through; 1: always around. "
            "Far apart (another core complex of an AMD EPYC, another socket) a line copied "
            "through the caches crosses twice, around them once; within one core complex a "
            "copy around them halves the rate. x86-64 only (elsewhere: through)",
            &c->nt_copy, 2);
    reg_int("nt_far_ns",
            "With btl_ivcom_nt_copy 2: the time, in nanoseconds beyond a read from this "
            "CPU's own first-level cache, from which a read of a line the peer last held "
            "counts as far (the peer's CPU shares no cache with this one). 8 reads a window, "
            "one every 8 large pieces; a window where most read far sends the next pieces "
            "around the caches. 1 to 1000",
            &c->nt_far_ns, 100);
    reg_string("if_include",
               "Comma-separated interfaces or IPv4 subnets (CIDR) whose address this process "
               "publishes for TCP and the ring handshake (like btl_tcp_if_include)",
               &c->if_include, "");
    reg_string("if_exclude",
               "Comma-separated interfaces or IPv4 subnets never to publish (ignored when "
               "btl_ivcom_if_include is set)",
               &c->if_exclude, "");
    reg_int("verbose",
            "0: quiet; 1: print the path chosen for each peer and why, and per-peer counters "
            "at finalize; 2: also the core's connection messages",
            &c->verbose, 0);
    reg_int("connect_timeout", "Seconds allowed to connect to a peer and agree on a path",
            &c->connect_timeout, 30);
    reg_int("tcp",
            "1: peers that cannot share memory with this process (other hosts, another "
            "backend) go over ivcom's own TCP path; 0: ivcom leaves them to the other BTLs of "
            "the job's list, e.g. --mca btl ivcom,tcp,self for Open MPI's btl/tcp (which sends "
            "messages of up to 64 KiB eagerly where ivcom's eager limit, shared with the "
            "rings, is 8 KiB); with no other BTL such peers are unreachable. Under Xen every Xen "
            "guest counts as able to share (the grant mapping decides)",
            &c->tcp, 1);
    c->peer_timeout = 4.0;
    (void) mca_base_component_var_register(
        &mca_btl_ivcom_component.super.btl_version, "peer_timeout",
        "Seconds of silence after which a peer is declared gone: its host or VM acknowledged "
        "nothing, not even the keepalive probe sent every second, for this long (a destroyed, "
        "crashed or cut-off VM). A peer that is only slow (stopped, busy, or its VM paused for "
        "less) is not. The job then ends with an error naming the peer. 0: never (only a "
        "closed connection counts); otherwise at least 1",
        MCA_BASE_VAR_TYPE_DOUBLE, NULL, 0, 0, OPAL_INFO_LVL_4, MCA_BASE_VAR_SCOPE_READONLY,
        &c->peer_timeout);

    /* Module defaults, then the generic BTL parameters (btl_ivcom_eager_limit,
     * btl_ivcom_max_send_size, btl_ivcom_exclusivity, ...). */
    m->btl_exclusivity = MCA_BTL_EXCLUSIVITY_DEFAULT;
    /* ob1 sends a message eagerly when it fits the eager limit less the
     * size of its largest header (measured: 56 bytes in Open MPI 4.1, 80
     * in 5.0), so with 8 KiB exactly an application's 8 KiB message went
     * by rendezvous: an acknowledgement's round trip more. 8 KiB + 128
     * sends it whole under both (osu_latency 8 KiB 1.12x -> 0.99x vader,
     * docs/PERFORMANCE.md) and keeps the smallest rings (32 KiB) that
     * hold an eager record. */
    m->btl_eager_limit = 8 * 1024 + 128;
    m->btl_rndv_eager_limit = 8 * 1024;
    /* 64 KiB pieces: the receiver copies one piece out while the sender
     * copies the next in, so large messages arrive sooner than in 256 KiB
     * pieces, at the same bandwidth (docs/PERFORMANCE.md, "Fragment size"). */
    m->btl_max_send_size = 64 * 1024;
    m->btl_rdma_pipeline_send_length = 256 * 1024;
    m->btl_rdma_pipeline_frag_size = 256 * 1024;
    m->btl_min_rdma_pipeline_size = 0;
    m->btl_flags = MCA_BTL_FLAGS_SEND;
    m->btl_latency = 1;
    m->btl_bandwidth = 40000;
    return mca_btl_base_param_register(&c->super.btl_version, m);
}

static int ivcom_open(void)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    c->node = NULL;
    c->eps = NULL;
    c->dropped_tags = 0;
    c->neps_linked = 0;
    c->warned_degraded = false;
    c->job_admitted = false;
    c->error_cb = NULL;
    mca_btl_ivcom_nt_open();
    OBJ_CONSTRUCT(&c->frags, opal_free_list_t);
    OBJ_CONSTRUCT(&c->lock, opal_mutex_t);
    return OPAL_SUCCESS;
}

static int ivcom_close(void)
{
    mca_btl_ivcom_close_all();
    OBJ_DESTRUCT(&mca_btl_ivcom_component.frags);
    OBJ_DESTRUCT(&mca_btl_ivcom_component.lock);
    return OPAL_SUCCESS;
}

static void ivcom_log(void *ctx, const char *msg)
{
    (void) ctx;
    opal_output(0, "[ivcom] %s", msg);
}

static int parse_backend(const char *s)
{
    if (0 == strcmp(s, "auto")) return IVCOM_BACKEND_AUTO;
    if (0 == strcmp(s, "host")) return IVCOM_BACKEND_HOST;
    if (0 == strcmp(s, "xen")) return IVCOM_BACKEND_XEN;
    if (0 == strcmp(s, "none") || 0 == strcmp(s, "tcp")) return IVCOM_BACKEND_NONE;
    return -1;
}

static bool bad(const char *param, const char *value, const char *problem)
{
    mca_btl_ivcom_help("bad param", "invalid value of %s: '%s': %s", param, value, problem);
    return false;
}

/* True when the parameter `name` has its default value: the user set it
 * nowhere (command line, environment, files). */
static bool left_default(const char *name)
{
    int idx = -1;
    const void *value = NULL;
    mca_base_var_source_t source = MCA_BASE_VAR_SOURCE_DEFAULT;
    if (OPAL_SUCCESS != mca_base_var_find_by_name(name, &idx)
        || OPAL_SUCCESS != mca_base_var_get_value(idx, &value, &source, NULL)) {
        return false;
    }
    return MCA_BASE_VAR_SOURCE_DEFAULT == source;
}

/* Checks every parameter; reports the first bad one by name. */
static bool check_params(ivcom_config *cfg)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    mca_btl_base_module_t *m = &mca_btl_ivcom_module.super;
    char buf[64], err[512];

    if (parse_backend(c->backend ? c->backend : "auto") < 0) {
        return bad("btl_ivcom_backend", c->backend, "expected auto, host, xen or none");
    }
    /* Open MPI reads a negative value of an unsigned parameter as a huge
     * one (-5 as 2^64 - 5), which these would take for "no limit". */
    const struct {
        const char *name;
        unsigned long value;
    } sizes[] = {
        {"btl_ivcom_ring_size", c->ring_size},     {"btl_ivcom_max_record", c->max_record},
        {"btl_ivcom_shm_limit", c->shm_limit},     {"btl_ivcom_ring_budget", c->ring_budget},
        {"btl_ivcom_piece_size", c->piece_size},   {"btl_ivcom_min_record", c->min_record},
        {"btl_ivcom_queue_size", c->queue_size},
    };
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        if (sizes[i].value > (unsigned long) LONG_MAX) {
            snprintf(buf, sizeof(buf), "%ld", (long) sizes[i].value);
            return bad(sizes[i].name, buf, "must not be negative");
        }
    }
    cfg->ring_size = c->ring_size;
    cfg->max_record = 0;
    if (IVCOM_OK != ivcom_config_check(cfg)) {
        ivcom_last_error(err, sizeof(err));
        snprintf(buf, sizeof(buf), "%lu", c->ring_size);
        return bad("btl_ivcom_ring_size", buf, err);
    }
    cfg->max_record = c->max_record;
    if (IVCOM_OK != ivcom_config_check(cfg)) {
        ivcom_last_error(err, sizeof(err));
        snprintf(buf, sizeof(buf), "%lu", c->max_record);
        return bad("btl_ivcom_max_record", buf, err);
    }
    size_t max_record = ivcom_config_max_record(cfg);
    /* A smaller btl_ivcom_ring_size alone brings the sizes it bounds down
     * with it when the user left them at their defaults: the largest send
     * to the ring's records, the eager limit to the largest send. Set
     * explicitly, they are checked as given. */
    if (m->btl_max_send_size > max_record && left_default("btl_ivcom_max_send_size")) {
        m->btl_max_send_size = max_record;
    }
    if (m->btl_eager_limit > m->btl_max_send_size && left_default("btl_ivcom_eager_limit")) {
        m->btl_eager_limit = m->btl_max_send_size;
    }
    if (m->btl_max_send_size > max_record || m->btl_max_send_size < 1024) {
        snprintf(buf, sizeof(buf), "%zu", m->btl_max_send_size);
        snprintf(err, sizeof(err), "must be between 1024 and the largest ring record (%zu bytes)",
                 max_record);
        return bad("btl_ivcom_max_send_size", buf, err);
    }
    /* Sends never exceed btl_max_send_size: records of that size let the core
     * halve the rings as far as possible before it must shrink the records
     * too (below). */
    if (0 == c->max_record) {
        cfg->max_record = m->btl_max_send_size;
    }
    if (m->btl_eager_limit > m->btl_max_send_size || m->btl_eager_limit < 64) {
        snprintf(buf, sizeof(buf), "%zu", m->btl_eager_limit);
        snprintf(err, sizeof(err), "must be between 64 and btl_ivcom_max_send_size (%zu)",
                 m->btl_max_send_size);
        return bad("btl_ivcom_eager_limit", buf, err);
    }
    /* Pieces between the eager limit and a whole piece (which is no cut). */
    if (0 != c->piece_size && c->piece_size < m->btl_eager_limit) {
        c->piece_size = m->btl_eager_limit;
    }
    if (c->piece_size >= m->btl_max_send_size) {
        c->piece_size = 0;
    }
    if (m->btl_rndv_eager_limit > m->btl_eager_limit) {
        m->btl_rndv_eager_limit = m->btl_eager_limit;
    }
    /* A pair whose backend cannot share the configured rings (a crowded
     * grant pool, a share limit) gets smaller rings, then smaller records,
     * down to btl_ivcom_min_record (by default the eager limit), before it
     * falls back to TCP. Below the eager limit a send larger than the
     * records goes as a run of records (btl_ivcom_send.c). */
    if (0 != c->min_record
        && (c->min_record < IVCOM_MIN_RECORD || c->min_record > m->btl_eager_limit)) {
        snprintf(buf, sizeof(buf), "%lu", c->min_record);
        snprintf(err, sizeof(err), "must be 0 or between %d and btl_ivcom_eager_limit (%zu)",
                 IVCOM_MIN_RECORD, m->btl_eager_limit);
        return bad("btl_ivcom_min_record", buf, err);
    }
    cfg->min_record = 0 != c->min_record ? c->min_record : m->btl_eager_limit;
    /* ob1 polls through opal_progress and this component never waits on a
     * ring: peers may publish to it without the doorbell handshake. */
    cfg->poll_only = 1;
    if (c->connect_timeout <= 0 || c->connect_timeout > 3600) {
        snprintf(buf, sizeof(buf), "%d", c->connect_timeout);
        return bad("btl_ivcom_connect_timeout", buf, "must be 1 to 3600 seconds");
    }
    if (0 != c->tcp && 1 != c->tcp) {
        snprintf(buf, sizeof(buf), "%d", c->tcp);
        return bad("btl_ivcom_tcp", buf, "expected 0 or 1");
    }
    if (0 != c->crowded_queues && 1 != c->crowded_queues) {
        snprintf(buf, sizeof(buf), "%d", c->crowded_queues);
        return bad("btl_ivcom_crowded_queues", buf, "expected 0 or 1");
    }
    if (c->nt_copy < 0 || c->nt_copy > 2) {
        snprintf(buf, sizeof(buf), "%d", c->nt_copy);
        return bad("btl_ivcom_nt_copy", buf, "expected 0, 1 or 2");
    }
    if (c->nt_far_ns < 1 || c->nt_far_ns > 1000) {
        snprintf(buf, sizeof(buf), "%d", c->nt_far_ns);
        return bad("btl_ivcom_nt_far_ns", buf, "must be 1 to 1000 nanoseconds");
    }
    if (c->peer_timeout != 0.0 && (c->peer_timeout < 1.0 || c->peer_timeout > 86400.0)) {
        snprintf(buf, sizeof(buf), "%g", c->peer_timeout);
        return bad("btl_ivcom_peer_timeout", buf, "must be 0 (never) or 1 to 86400 seconds");
    }
    cfg->peer_timeout_ms = 0.0 == c->peer_timeout ? UINT32_MAX
                                                   : (uint32_t) (c->peer_timeout * 1000.0);
    if (c->verbose < 0) {
        snprintf(buf, sizeof(buf), "%d", c->verbose);
        return bad("btl_ivcom_verbose", buf, "must be 0 or more");
    }
    return true;
}

static const char *nonempty(const char *s)
{
    return (s && *s) ? s : NULL;
}

static mca_btl_base_module_t **ivcom_init(int *num_btls, bool enable_progress_threads,
                                          bool enable_mpi_threads)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    mca_btl_base_module_t **btls;
    ivcom_config cfg;
    int rc;

    (void) enable_progress_threads;
    /* Every level, MPI_THREAD_MULTIPLE included: with threads, endpoints
     * take their locks (btl_ivcom.h); without, the locks cost a branch. */
    (void) enable_mpi_threads;
    *num_btls = 0;

    ivcom_config_default(&cfg);
    cfg.host_dir = nonempty(c->host_dir);
    cfg.if_include = nonempty(c->if_include);
    cfg.if_exclude = nonempty(c->if_include) ? NULL : nonempty(c->if_exclude);
    if (!check_params(&cfg)) {
        return NULL;
    }
    cfg.backend = parse_backend(c->backend ? c->backend : "auto");
    cfg.connect_timeout_ms = (uint32_t) c->connect_timeout * 1000u;
    if (c->verbose >= 2) {
        cfg.log = ivcom_log;
    }
    /* Only ranks of this job become peers: the card carries our process
     * name, the handshake proves knowledge of the keys the modex carries,
     * and the resolver admits only names of this job. */
    cfg.name = mca_btl_ivcom_name(OPAL_PROC_MY_NAME);
    cfg.resolve = mca_btl_ivcom_card_resolve;
    /* A tag past the trigger table, or a message larger than any this
     * component sends, is a protocol violation that breaks the link. */
    cfg.tag_limit = MCA_BTL_TAG_MAX;
    cfg.max_message = mca_btl_ivcom_module.super.btl_max_send_size;
    cfg.share_limit = c->shm_limit;
    cfg.ring_budget = c->ring_budget;
    cfg.queue_size = c->queue_size;
    cfg.crowded_tcp = 0 == c->crowded_queues;

    rc = ivcom_node_new(&cfg, &c->node);
    if (IVCOM_OK != rc) {
        char err[512];
        ivcom_last_error(err, sizeof(err));
        mca_btl_ivcom_help("node failed", "cannot start on %s: %s",
                           opal_process_info.nodename, err);
        return NULL;
    }

    char status[512];
    if (1 == ivcom_node_backend_note(c->node, status, sizeof(status))) {
        mca_btl_ivcom_help("xen unusable", "on %s: %s", opal_process_info.nodename, status);
    }
    if (0 == ivcom_node_ring_status(c->node, status, sizeof(status))
        && IVCOM_BACKEND_NONE != cfg.backend) {
        mca_btl_ivcom_help("no ring backend", "no shared rings on %s: %s (TCP for every peer)",
                           opal_process_info.nodename, status);
    } else {
        IVCOM_VERBOSE(2, "[ivcom] rank=%u backend %s", OPAL_PROC_MY_NAME.vpid, status);
    }

    if (c->verbose >= 2) {
        uint8_t card[IVCOM_CARD_MAX];
        char desc[256];
        size_t len = ivcom_node_card(c->node, card, sizeof(card));
        if (len <= sizeof(card) && ivcom_card_describe(card, len, desc, sizeof(desc)) > 0) {
            /* the public form: never the key */
            opal_output(0, "[ivcom] rank=%u card %s", OPAL_PROC_MY_NAME.vpid, desc);
        }
    }
    rc = mca_btl_ivcom_card_publish(c->node);
    if (OPAL_SUCCESS != rc) {
        ivcom_node_free(c->node);
        c->node = NULL;
        return NULL;
    }

    rc = opal_free_list_init(&c->frags, sizeof(mca_btl_ivcom_frag_t), opal_cache_line_size,
                             OBJ_CLASS(mca_btl_ivcom_frag_t), 0, opal_cache_line_size, 16, -1, 16,
                             NULL, 0, NULL, NULL, NULL);
    if (OPAL_SUCCESS != rc) {
        ivcom_node_free(c->node);
        c->node = NULL;
        return NULL;
    }

    btls = malloc(sizeof(*btls));
    if (NULL == btls) {
        return NULL;
    }
    btls[0] = &mca_btl_ivcom_module.super;
    *num_btls = 1;
    return btls;
}
