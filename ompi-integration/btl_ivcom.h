/*
 * btl/ivcom: the Open MPI BTL component of ivcom (Open MPI 4.1 and 5.0).
 *
 * A thin layer: it translates Open MPI's BTL calls into the ivcom C ABI
 * (btl-ivcom/include/ivcom.h). Every peer is reachable: on a shared ring
 * when co-resident (chosen by the core's probe), over TCP otherwise. Links
 * are opened lazily, on the first message to a peer.
 *
 * Files, one concern each:
 *   btl_ivcom_component.c  parameters, init
 *   btl_ivcom_modex.c      locality cards through the modex
 *   btl_ivcom_module.c     add_procs/del_procs/finalize/register_error, the module
 *   btl_ivcom_endpoint.c   peers: links, paths, failures, orphan links
 *   btl_ivcom_frag.c       send descriptors (btl_ivcom_frag.h: their inline helpers)
 *   btl_ivcom_send.c       alloc/free/prepare_src/send/sendi, the pending queue
 *   btl_ivcom_recv.c       progress: accepting links, polling, delivering upward
 *   btl_ivcom_compat.h     what differs between Open MPI 4.1 and 5.0
 *   btl_ivcom_loader.c     mca_btl_ivcom.so: checks the Open MPI series, then
 *                          loads this implementation (ivcom_btl_impl.so)
 */
#ifndef MCA_BTL_IVCOM_H
#define MCA_BTL_IVCOM_H

#include "opal_config.h"

#include "opal/class/opal_free_list.h"
#include "opal/class/opal_list.h"
#include "opal/mca/btl/btl.h"
#include "opal/mca/btl/base/base.h"
#include "opal/util/proc.h"

#include "btl_ivcom_compat.h"
#include IVCOM_MUTEX_HEADER
#include "ivcom.h"

BEGIN_C_DECLS

struct mca_btl_ivcom_frag_t;

/* Bytes of every message copied into private memory before the upper
 * layer parses them (btl_ivcom_recv.c). */
#define IVCOM_HEAD 256

/* One peer. Under MPI_THREAD_MULTIPLE, `lock` guards everything below it
 * but `failed`, `rx`, `rx_claim` and `npending`; when Open MPI runs
 * without threads the lock costs nothing (OPAL_THREAD_LOCK is a branch).
 * The receive side is claimed with `rx_claim` (one compare-exchange), so no
 * two threads deliver one link's messages. On a ring, the claim is all a
 * poll takes: it polls the link's receiving side alone (`rx`,
 * ivcom_rx_take), which shares nothing with the senders, who take the
 * lock; anything else (TCP, a fragment, a control record, sends waiting
 * in `pending`, the idle check) also takes the lock, dropped around each
 * upcall (which may send on this endpoint). Either way a sender never
 * waits for a receiver's upcall. */
struct mca_btl_base_endpoint_t {
    opal_list_item_t super;
    opal_mutex_t lock;
    opal_proc_t *proc;      /* NULL while the peer is not added (its link
                             * came first: ob1 adds remote peers lazily) */
    uint8_t *card;          /* the peer's full card (from the modex) */
    size_t card_len;
    uint64_t card_id;       /* its id: links are matched to endpoints by it */
    ivcom_link *link;       /* NULL until first use */
    bool self;              /* this process: messages are delivered in place */
    bool ring;              /* link is on the shared ring (fixed once attached) */
    bool queue;             /* link is on the queue path (fixed once attached) */
    size_t max_send;        /* largest descriptor this link takes in one piece:
                             * btl_max_send_size, or less on a ring whose
                             * records were shrunk to fit the backend */
    volatile bool failed;   /* link broken or could not be opened */
    bool closed;            /* peer closed cleanly (finalize) */
    int32_t rx_claim;       /* 1 while a thread delivers this link's messages */
    const ivcom_rx *rx;     /* the link's receiving side alone (ring links
                             * whose peer polls; set once, with the link) */
    int32_t npending;       /* length of `pending`, stored under the lock as
                             * it changes: the lock-free poll's hint */
    uint64_t kept_core;     /* idle progress calls that kept the core while
                             * the peer took our messages (peers_at_work) */
    uint64_t queued;        /* sends that waited here, in order, for room
                             * (the pending list) */
    uint64_t parked;        /* sends handed back to the upper layer to retry
                             * later, without a descriptor (ob1 then starts
                             * them after later ones): only when memory runs
                             * out (btl_ivcom_send.c, "Order") */
    uint64_t pieces_nt;     /* large pieces copied around the caches
                             * (btl_ivcom_nt_copy; relaxed atomic: a piece
                             * is copied without the lock) */
    /* btl_ivcom_nt_copy 2: where the peer's CPU is, as the probes read it
     * (btl_ivcom_send.c, "Where the peer's CPU is"). Relaxed atomics: a
     * piece is copied without the lock, and with threads two may probe at
     * once (a window a probe short or long decides as well). */
    uint32_t nt_probes;     /* probes in the current window */
    uint32_t nt_pieces;     /* pieces that could have gone around */
    uint32_t nt_slow;       /* probes of the window that read far */
    int32_t nt_far;         /* 1: the last window read the peer's CPU far */
    uint64_t nt_windows_far;
    uint64_t nt_windows_near;
    struct mca_btl_ivcom_frag_t *reserved; /* frag holding the ring reservation */
    opal_list_t pending;    /* frags waiting for ring space, in order */
    /* What a link's messages go up in (deliver, btl_ivcom_recv.c): the
     * private copy of a message's head and the descriptor around it. One
     * thread at a time delivers a link's messages (progress does not nest;
     * with threads, rx_claim), so they live here, not in thread-local
     * storage, whose every use in a dlopen()ed library is a call. (The self
     * endpoint has no link: its messages go up through
     * mca_btl_ivcom_deliver_private.) */
    size_t recv_head_used;  /* bytes of recv_head that hold an older message */
    mca_btl_base_segment_t recv_seg[2];
    ivcom_recv_desc_t recv_des;
    uint8_t recv_head[IVCOM_HEAD];
};
typedef struct mca_btl_base_endpoint_t mca_btl_base_endpoint_t;
OBJ_CLASS_DECLARATION(mca_btl_base_endpoint_t);

/* The endpoints of this process, as progress reads them: a snapshot that
 * is replaced (never changed) when endpoints come or go, so a thread that
 * polls needs no lock; old snapshots are freed at close. */
typedef struct mca_btl_ivcom_eps_t {
    int n;
    struct mca_btl_ivcom_eps_t *retired; /* the snapshot this one replaced */
    mca_btl_base_endpoint_t *ep[];
} mca_btl_ivcom_eps_t;

typedef struct mca_btl_ivcom_component_t {
    mca_btl_base_component_3_0_0_t super;

    /* MCA parameters */
    char *backend;
    char *host_dir;
    unsigned long ring_size;
    unsigned long max_record;
    unsigned long min_record;
    unsigned long shm_limit;
    unsigned long ring_budget;
    unsigned long queue_size;
    int crowded_queues;     /* 1: Xen pairs a crowded grant pool holds no
                             * rings for take receive queues; 0: TCP */
    unsigned long piece_size;
    int nt_copy;            /* 1: large pieces around the caches; 2: when
                             * the probes read the peer's CPU far */
    int nt_far_ns;          /* a probe's time from which a CPU is far */
    uint64_t nt_tsc0;       /* TSC and monotonic clock at open: calibrate */
    uint64_t nt_ns0;        /* (the probes count from 1 ms after open) */
    uint64_t nt_far_ticks;  /* nt_far_ns in TSC ticks (0: not yet known) */
    uint64_t nt_noise_ticks; /* a probe this slow says nothing (2 us) */
    uint32_t nt_base_ticks; /* a probe's own cost (a line in L1) */
    char *if_include;
    char *if_exclude;
    int verbose;
    int connect_timeout;
    double peer_timeout;
    int tcp;                /* 1: peers that cannot share memory with us go over
                             * ivcom's TCP path; 0: left to the other BTLs */

    /* state */
    ivcom_node *node;
    opal_free_list_t frags;
    opal_mutex_t lock;               /* endpoints coming and going, links adopted */
    mca_btl_ivcom_eps_t *volatile eps; /* endpoints of this process (snapshot) */
    uint64_t dropped_tags;           /* messages to tags nobody registered */
    volatile int32_t neps_linked;    /* endpoints with a link */
    bool warned_degraded;
    bool job_admitted;               /* the whole job's cards were admitted (Xen) */
    mca_btl_base_module_error_cb_fn_t error_cb;
} mca_btl_ivcom_component_t;

typedef struct mca_btl_ivcom_module_t {
    mca_btl_base_module_t super;
} mca_btl_ivcom_module_t;

extern mca_btl_ivcom_component_t mca_btl_ivcom_component;
extern mca_btl_ivcom_module_t mca_btl_ivcom_module;

/* btl_ivcom_component.c */
void mca_btl_ivcom_help(const char *topic, const char *fallback, ...);

/* btl_ivcom_module.c */
void mca_btl_ivcom_close_all(void);

/* btl_ivcom_modex.c */
int mca_btl_ivcom_card_publish(ivcom_node *node);
int mca_btl_ivcom_card_fetch(opal_proc_t *proc, uint8_t **card, size_t *len);
void mca_btl_ivcom_admit_job(ivcom_node *node);
uint64_t mca_btl_ivcom_name(opal_process_name_t name);
size_t mca_btl_ivcom_card_resolve(void *ctx, uint64_t name, uint8_t *buf, size_t len);

/* btl_ivcom_endpoint.c */
int mca_btl_ivcom_endpoint_connect(mca_btl_base_endpoint_t *ep, int *failed_rc);
void mca_btl_ivcom_endpoint_attach(mca_btl_base_endpoint_t *ep, ivcom_link *link);
void mca_btl_ivcom_endpoint_failed(mca_btl_base_endpoint_t *ep, int rc);
int mca_btl_ivcom_endpoint_add(opal_proc_t *proc, uint8_t *card, size_t card_len,
                               mca_btl_base_endpoint_t **out);
int mca_btl_ivcom_endpoint_self(opal_proc_t *proc, mca_btl_base_endpoint_t **out);
void mca_btl_ivcom_endpoint_remove(mca_btl_base_endpoint_t *ep);
void mca_btl_ivcom_endpoints_close(void);
void mca_btl_ivcom_adopt_incoming(void);

/* The endpoint's link, opened on first use; call with the endpoint's lock
 * held. A failure to open it is left in *failed_rc for the caller to report
 * (mca_btl_ivcom_endpoint_failed) once it dropped the lock. */
static inline int mca_btl_ivcom_endpoint_ready(mca_btl_base_endpoint_t *ep, int *failed_rc)
{
    if (OPAL_LIKELY(NULL != ep->link || ep->self)) {
        return OPAL_SUCCESS;
    }
    return mca_btl_ivcom_endpoint_connect(ep, failed_rc);
}

/* Whether the endpoint has a link that still carries messages (opened, not
 * broken, not closed by the peer). */
static inline bool mca_btl_ivcom_link_open(const mca_btl_base_endpoint_t *ep)
{
    return NULL != ep->link && !ep->failed && !ep->closed;
}

/* btl_ivcom_send.c */
mca_btl_base_descriptor_t *mca_btl_ivcom_alloc(struct mca_btl_base_module_t *btl,
                                               struct mca_btl_base_endpoint_t *ep, uint8_t order,
                                               size_t size, uint32_t flags);
int mca_btl_ivcom_free(struct mca_btl_base_module_t *btl, mca_btl_base_descriptor_t *des);
mca_btl_base_descriptor_t *mca_btl_ivcom_prepare_src(struct mca_btl_base_module_t *btl,
                                                     struct mca_btl_base_endpoint_t *ep,
                                                     struct opal_convertor_t *conv, uint8_t order,
                                                     size_t reserve, size_t *size, uint32_t flags);
int mca_btl_ivcom_send(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                       struct mca_btl_base_descriptor_t *des, mca_btl_base_tag_t tag);
int mca_btl_ivcom_sendi(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                        struct opal_convertor_t *conv, void *header, size_t header_size,
                        size_t payload_size, uint8_t order, uint32_t flags,
                        mca_btl_base_tag_t tag, mca_btl_base_descriptor_t **descriptor);
/* Starts the clock that btl_ivcom_nt_copy 2 calibrates its probes by
 * (btl_ivcom_send.c); called when the component opens. */
void mca_btl_ivcom_nt_open(void);
void mca_btl_ivcom_drain_pending(mca_btl_base_endpoint_t *ep, opal_list_t *done, int *failed);

/* Records the length of `ep->pending` after a change (lock held): the
 * lock-free poll reads it to know whether sends wait. */
static inline void mca_btl_ivcom_pending_changed(mca_btl_base_endpoint_t *ep)
{
    __atomic_store_n(&ep->npending, (int32_t) opal_list_get_size(&ep->pending), __ATOMIC_RELAXED);
}

/* btl_ivcom_recv.c */
int mca_btl_ivcom_progress(void);
int mca_btl_ivcom_complete(opal_list_t *done);
void mca_btl_ivcom_deliver_private(mca_btl_base_endpoint_t *ep, mca_btl_base_tag_t tag,
                                   uint8_t *data, size_t len);

#define IVCOM_VERBOSE(level, ...)                                   \
    do {                                                            \
        if (mca_btl_ivcom_component.verbose >= (level)) {           \
            opal_output(0, __VA_ARGS__);                            \
        }                                                           \
    } while (0)

END_C_DECLS

#endif
