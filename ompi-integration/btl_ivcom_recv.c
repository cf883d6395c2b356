/*
 * btl/ivcom: receive. Progress accepts the links peers opened to us, sends
 * what waits for ring space, and polls every link; each message is handed
 * to the upper layer by deliver (a link's messages, inlined into
 * rx_deliver and the poll callbacks) or mca_btl_ivcom_deliver_private
 * (this process's own, on the self endpoint), the two places that call
 * up.
 */
#include "opal_config.h"

#include <string.h>
#include <unistd.h>

#include "opal/sys/atomic.h"
#include "opal/runtime/opal_progress.h"

#include "btl_ivcom.h"
#include "btl_ivcom_compat.h"
#include "btl_ivcom_frag.h"

#define C (&mca_btl_ivcom_component)
#define MODULE (&mca_btl_ivcom_module.super)

/* On a ring, a message lies in memory the peer can still write, and the
 * upper layer parses its header (raw pointers among it) and may read it
 * more than once: nothing it parses may change under it. So the head of
 * every message (IVCOM_HEAD bytes: more than any header of ob1 or of the
 * base active-message protocols) is copied into private memory first, and
 * a message that short is copied whole; the rest of a longer message,
 * which the upper layer only copies out as data, is handed over in place
 * as a second segment. The private head is zero-filled past the message,
 * so a message shorter than the header its type implies reads zeros,
 * never the rest of an earlier message. Each endpoint has its own head and
 * descriptor (btl_ivcom.h): the upper layer only reads them during the
 * call, and one thread at a time delivers a link's messages, one message
 * at a time (progress does not nest). Only the bytes of the head that held an
 * older message need zeroing past a shorter one: a run of small messages
 * zeroes nothing. */

/* The callback the upper layer registered for `tag` in the base trigger
 * table (ob1's tags, and in Open MPI 5 also those of the active-message
 * RDMA emulation that osc/rdma wraps around a BTL without put/get: it
 * answers through the endpoint, which 5.0's descriptor carries), or NULL,
 * counted as a dropped message, when nobody registered one. `tag` is below
 * MCA_BTL_TAG_MAX: the core breaks a link for any other, and this
 * process's own sends use ob1's tags. */
static inline const mca_btl_active_message_callback_t *callback_for(mca_btl_base_tag_t tag)
{
    const mca_btl_active_message_callback_t *reg = mca_btl_base_active_message_trigger + tag;
    if (OPAL_UNLIKELY(NULL == reg->cbfunc)) {
        __atomic_fetch_add(&mca_btl_ivcom_component.dropped_tags, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    return reg;
}

/* The head copy of a message that fits in it, whole: false, nothing
 * copied, when it is longer than IVCOM_HEAD. ob1's small messages (its
 * header and a few bytes, 16 to 32 bytes) are tested first and copied as
 * two fixed-size moves that may overlap, which the compiler inlines (a call
 * to memcpy and its size dispatch cost more than the copy); so are 8 to 15
 * bytes; each byte of dst is written from one read of src. */
static inline bool copy_whole(uint8_t *dst, const uint8_t *src, size_t len)
{
    if (OPAL_LIKELY(len >= 16 && len <= 32)) {
        uint8_t a[16], b[16];
        memcpy(a, src, 16);
        memcpy(b, src + len - 16, 16);
        memcpy(dst, a, 16);
        memcpy(dst + len - 16, b, 16);
    } else if (len > IVCOM_HEAD) {
        return false;
    } else if (len >= 8 && len < 16) {
        uint64_t a, b;
        memcpy(&a, src, 8);
        memcpy(&b, src + len - 8, 8);
        memcpy(dst, &a, 8);
        memcpy(dst + len - 8, &b, 8);
    } else {
        memcpy(dst, src, len);
    }
    return true;
}

/* Hands one message from peer `ep` to the upper layer. */
static inline void deliver(mca_btl_base_endpoint_t *ep, mca_btl_base_tag_t tag,
                           const uint8_t *data, size_t len)
{
    const mca_btl_active_message_callback_t *reg = callback_for(tag);
    if (NULL == reg) {
        return;
    }
    ep->recv_des.des_segments = ep->recv_seg;
    ep->recv_seg[0].seg_addr.pval = ep->recv_head;
    if (OPAL_LIKELY(copy_whole(ep->recv_head, data, len))) {
        if (OPAL_UNLIKELY(ep->recv_head_used > len)) {
            memset(ep->recv_head + len, 0, ep->recv_head_used - len);
        }
        ep->recv_head_used = len;
        ep->recv_seg[0].seg_len = len;
        ep->recv_des.des_segment_count = 1;
    } else {
        memcpy(ep->recv_head, data, IVCOM_HEAD);
        ep->recv_head_used = IVCOM_HEAD;
        ep->recv_seg[0].seg_len = IVCOM_HEAD;
        ep->recv_seg[1].seg_addr.pval = (void *) (data + IVCOM_HEAD);
        ep->recv_seg[1].seg_len = len - IVCOM_HEAD;
        ep->recv_des.des_segment_count = 2;
    }
    ivcom_upcall(MODULE, reg, &ep->recv_des, ep, tag);
}

/* Hands up a message that this process wrote into a buffer of its own (the
 * self endpoint's sends): nobody else can change it, so it goes up in
 * place, without the head copy, under a descriptor of this call's own:
 * several threads may send to themselves at once, and the endpoint's
 * descriptor belongs to the one thread that polls its link. */
void mca_btl_ivcom_deliver_private(mca_btl_base_endpoint_t *ep, mca_btl_base_tag_t tag,
                                   uint8_t *data, size_t len)
{
    const mca_btl_active_message_callback_t *reg = callback_for(tag);
    mca_btl_base_segment_t seg;
    ivcom_recv_desc_t des;
    if (NULL == reg) {
        return;
    }
    memset(&seg, 0, sizeof(seg));
    memset(&des, 0, sizeof(des));
    seg.seg_addr.pval = data;
    seg.seg_len = len;
    des.des_segments = &seg;
    des.des_segment_count = 1;
    ivcom_upcall(MODULE, reg, &des, ep, tag);
}

/* ivcom_link_poll's callback; ctx is the endpoint. */
static void recv_cb(void *ctx, uint8_t tag, const uint8_t *data, size_t len)
{
    deliver((mca_btl_base_endpoint_t *) ctx, tag, data, len);
}

/* Completes frags whose data left (callbacks run without any lock: they
 * may send again); returns how many. */
int mca_btl_ivcom_complete(opal_list_t *done)
{
    opal_list_item_t *item;
    int n = 0;
    while (NULL != (item = opal_list_remove_first(done))) {
        mca_btl_ivcom_frag_done((mca_btl_ivcom_frag_t *) item, true);
        n++;
    }
    return n;
}

/* The link's idle check (ivcom_rx_take asked for it), under the lock; a
 * sender that holds it makes this check wait for the next one (4,096
 * quiet polls on): a poller never waits for a sender. Without threads
 * the lock is a branch. */
static __attribute__((noinline)) void idle_check(mca_btl_base_endpoint_t *ep)
{
    int rc = IVCOM_OK;
    if (0 != OPAL_THREAD_TRYLOCK(&ep->lock)) {
        return;
    }
    if (mca_btl_ivcom_link_open(ep)) {
        rc = ivcom_link_idle_check(ep->link);
    }
    OPAL_THREAD_UNLOCK(&ep->lock);
    if (rc < 0) {
        mca_btl_ivcom_endpoint_failed(ep, rc);
    }
}

/* A ring link's receiving side alone (rx): takes the whole messages that
 * wait, up to 16, and hands each up here (deliver, inlined: no callback
 * across the C ABI and no call frame per message), the link's space
 * released after each batch. Returns how many, or what the first
 * ivcom_rx_take said when it took nothing (0, IVCOM_RX_FULL,
 * IVCOM_RX_CHECK). */
static int rx_deliver(mca_btl_base_endpoint_t *ep, const ivcom_rx *rx)
{
    ivcom_msg m[IVCOM_RX_BATCH];
    int n = 0;
    for (;;) {
        int rc = ivcom_rx_take(rx, m, IVCOM_RX_BATCH - n);
        if (rc <= 0) {
            return n > 0 ? n : rc;
        }
        for (int i = 0; i < rc; i++) {
            deliver(ep, m[i].tag, m[i].data, m[i].len);
        }
        n += rc;
        if (!ivcom_rx_done(rx) || n >= IVCOM_RX_BATCH) {
            return n;
        }
    }
}

/* A queue link's own whole messages in place (ivcom_link_take), up to 16,
 * handed up here as rx_deliver does a ring's, released after each batch.
 * Returns how many, or what the first ivcom_link_take said when it took
 * nothing (0, or IVCOM_RX_FULL: the link's own poll is due); a link that
 * broke on release is reported here (and counts what went up). */
static int link_deliver(mca_btl_base_endpoint_t *ep)
{
    ivcom_msg m[IVCOM_RX_BATCH];
    int n = 0;
    for (;;) {
        int rc = ivcom_link_take(ep->link, m, IVCOM_RX_BATCH - n);
        if (rc <= 0) {
            return n > 0 ? n : rc;
        }
        for (int i = 0; i < rc; i++) {
            deliver(ep, m[i].tag, m[i].data, m[i].len);
        }
        n += rc;
        rc = ivcom_link_done(ep->link);
        if (OPAL_UNLIKELY(rc < 0)) {
            mca_btl_ivcom_endpoint_failed(ep, rc);
            return n;
        }
        if (0 == rc || n >= IVCOM_RX_BATCH) {
            return n;
        }
    }
}

/* One endpoint without threads, past its common case (poll_single):
 * sends that wait for ring space go first, then a ring link's receiving
 * side alone unless poll_single just found it needs more (`rx_tried`:
 * then no send waits, since rx_deliver handed nothing up);
 * a queue link's own messages in batches (link_deliver); else the link
 * delivers them itself, one call across the C ABI. Out of line, so that
 * progress, which inlines poll_single, keeps a small frame. */
static __attribute__((noinline)) int poll_single_rest(mca_btl_base_endpoint_t *ep, bool rx_tried)
{
    int rc, sent = 0;
    if (!opal_list_is_empty(&ep->pending)) {
        opal_list_t done;
        int failed = 0;
        OBJ_CONSTRUCT(&done, opal_list_t);
        mca_btl_ivcom_drain_pending(ep, &done, &failed);
        sent = mca_btl_ivcom_complete(&done);
        OBJ_DESTRUCT(&done);
        if (failed) {
            mca_btl_ivcom_endpoint_failed(ep, failed);
            return sent;
        }
    }
    /* A ring link's receiving side first: the common case in the fewest
     * steps (rx_deliver); the whole link for anything else. */
    if (NULL != ep->rx && !rx_tried) {
        rc = rx_deliver(ep, ep->rx);
        if (rc >= 0) {
            return rc + sent;
        }
        if (IVCOM_RX_CHECK == rc) {
            idle_check(ep);
            return sent;
        }
    }
    /* A queue link's own messages in batches, the same way; the link's
     * poll for anything else. */
    if (ep->queue) {
        rc = link_deliver(ep);
        if (rc >= 0) {
            return rc + sent;
        }
    }
    rc = ivcom_link_poll(ep->link, 16, recv_cb, ep);
    if (rc < 0) {
        mca_btl_ivcom_endpoint_failed(ep, rc);
        return sent;
    }
    return rc + sent;
}

/* One endpoint without threads: up to 16 messages. The common case, a
 * ring link with no send waiting for space, in the fewest steps: its
 * receiving side alone (rx_deliver); an idle check it asks for here too;
 * anything else in poll_single_rest (sends that wait, a queue link, what
 * the receiving side leaves for the whole link). Returns the messages
 * delivered and the waiting sends that went: both are progress (with
 * mpi_yield_when_idle, a call that reports none gives the core away). */
static inline int poll_single(mca_btl_base_endpoint_t *ep)
{
    const ivcom_rx *rx = ep->rx;
    if (OPAL_LIKELY(NULL != rx && opal_list_is_empty(&ep->pending))) {
        int rc = rx_deliver(ep, rx);
        if (OPAL_LIKELY(rc >= 0)) {
            return rc;
        }
        if (IVCOM_RX_CHECK == rc) {
            idle_check(ep);
            return 0;
        }
        return poll_single_rest(ep, true);
    }
    return poll_single_rest(ep, false);
}

/* ivcom_link_poll's callback with threads: the endpoint's lock is dropped
 * around the upcall (which may send on this endpoint) and held again when
 * the link resumes; the claim keeps other threads from polling meanwhile. */
static void recv_cb_unlocked(void *ctx, uint8_t tag, const uint8_t *data, size_t len)
{
    mca_btl_base_endpoint_t *ep = (mca_btl_base_endpoint_t *) ctx;
    OPAL_THREAD_UNLOCK(&ep->lock);
    deliver(ep, tag, data, len);
    OPAL_THREAD_LOCK(&ep->lock);
}

/* The whole link polled under its lock (the claim held): sends waiting
 * for ring space go first, then ivcom_link_poll, the lock dropped around
 * each upcall. The list of sends completed here is built only when sends
 * wait. Returns what poll_single returns. */
static int poll_locked(mca_btl_base_endpoint_t *ep)
{
    opal_list_t done;
    bool waiting = false;
    int failed = 0, rc = 0, sent = 0;
    if (0 != OPAL_THREAD_TRYLOCK(&ep->lock)) {
        return 0;
    }
    if (!mca_btl_ivcom_link_open(ep)) {
        OPAL_THREAD_UNLOCK(&ep->lock);
        return 0;
    }
    if (!opal_list_is_empty(&ep->pending)) {
        OBJ_CONSTRUCT(&done, opal_list_t);
        waiting = true;
        mca_btl_ivcom_drain_pending(ep, &done, &failed);
    }
    if (!failed) {
        rc = ivcom_link_poll(ep->link, 16, recv_cb_unlocked, ep);
        if (rc < 0) {
            failed = rc;
        }
    }
    OPAL_THREAD_UNLOCK(&ep->lock);
    if (waiting) {
        sent = mca_btl_ivcom_complete(&done);
        OBJ_DESTRUCT(&done);
    }
    if (failed < 0) {
        mca_btl_ivcom_endpoint_failed(ep, failed);
        return sent;
    }
    return rc + sent;
}

/* One endpoint with threads: claimed for receiving (an endpoint another
 * thread holds is passed by: that thread delivers its messages). A ring
 * link with no sends waiting is polled on its receiving side alone, with
 * no lock, each upcall made straight from the poll (rx_deliver); what
 * that cannot do (ivcom_rx_take says which) and any other link go through
 * poll_locked.
 * Returns what poll_single returns. */
static int poll_threaded(mca_btl_base_endpoint_t *ep)
{
    const ivcom_rx *rx = __atomic_load_n(&ep->rx, __ATOMIC_ACQUIRE);
    int32_t free_claim = 0;
    int rc = 0;
    if (!__atomic_compare_exchange_n(&ep->rx_claim, &free_claim, 1, false, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED)) {
        return 0;
    }
    if (NULL != rx && 0 == __atomic_load_n(&ep->npending, __ATOMIC_RELAXED)
        && !ep->failed && !__atomic_load_n(&ep->closed, __ATOMIC_RELAXED)) {
        rc = rx_deliver(ep, rx);
        if (IVCOM_RX_CHECK == rc) {
            idle_check(ep);
            rc = 0;
        } else if (IVCOM_RX_FULL == rc) {
            rc = poll_locked(ep);
        }
    } else {
        rc = poll_locked(ep);
    }
    __atomic_store_n(&ep->rx_claim, 0, __ATOMIC_RELEASE);
    return rc;
}

/* Progress does not nest within a thread (an upcall may call progress):
 * the thread's flag, and the count of its calls (which paces the check for
 * new links). Without threads, plain statics: a thread-local in a
 * dlopen()ed library costs a call on every use. */
typedef struct {
    bool in_progress;
    unsigned calls;
} progress_state_t;
static __thread progress_state_t progress_tls;
static progress_state_t progress_st;

/* Whether this host runs at most two ranks of the job per CPU (this rank
 * and its co-resident peers, against the CPUs online), the case
 * peers_at_work is for. With more, the answer a rank waits for depends on
 * ranks that wait for its own core, and keeping it costs them: 32 and 64
 * ranks on 2 cores ran osu_alltoall 1.1-1.3x slower when ranks kept their
 * cores (docs/PERFORMANCE.md, "Ranks that outnumber the cores").
 * Recounted when the set of endpoints changes. */
static bool few_ranks_per_core(const mca_btl_ivcom_eps_t *eps)
{
    static const mca_btl_ivcom_eps_t *counted;
    static int counted_n = -1;
    static bool few;
    if (eps != counted || (NULL != eps && eps->n != counted_n)) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        size_t ranks = ivcom_node_coresident(C->node) + 1;
        few = cpus > 0 && ranks <= 2 * (size_t) cpus;
        counted = eps;
        counted_n = NULL != eps ? eps->n : -1;
    }
    return few;
}

/* A call that found nothing, with mpi_yield_when_idle on (ranks outnumber
 * the cores: Open MPI gives the core away after each such call): counts
 * the peers at work on messages we sent (ivcom_link_peer_draining). A
 * rank that waits for an answer while its peer drains its stream on
 * another core keeps its core, as it does over shared memory when its
 * buffers come back; without it, two senders that share a core handed it
 * to each other at every wait, a context switch per window, and their
 * receivers followed (docs/PERFORMANCE.md, "Ranks that outnumber the
 * cores"). From the first such call on, this process's receiving sides
 * tell their peers where they run (ivcom_tell_cpu), so that a peer on
 * this very core is told apart. A peer that has taken everything costs a
 * comparison; one that lies about its index breaks its link. Without
 * threads only: the links are this thread's. */
static int peers_at_work(const mca_btl_ivcom_eps_t *eps)
{
    static bool told;
    int n = 0;
    if (!told) {
        /* our receiving sides tell their peers where they run, from now on */
        ivcom_tell_cpu();
        told = true;
    }
    for (int i = 0; NULL != eps && i < eps->n; i++) {
        mca_btl_base_endpoint_t *ep = eps->ep[i];
        int rc;
        if (!mca_btl_ivcom_link_open(ep)) {
            continue;
        }
        rc = ivcom_link_peer_draining(ep->link);
        if (OPAL_UNLIKELY(rc < 0)) {
            mca_btl_ivcom_endpoint_failed(ep, rc);
        } else if (rc > 0) {
            ep->kept_core++;
            n += rc;
        }
    }
    return n;
}

/* Links that peers opened: checked every 16th call of a thread (an FFI
 * call and an atomic load), and on every call while we have no link at
 * all. */
static inline void adopt_due(progress_state_t *ps)
{
    if ((0 == (++ps->calls & 15) || 0 == C->neps_linked) && ivcom_node_pending(C->node) > 0) {
        mca_btl_ivcom_adopt_incoming();
    }
}

/* Progress with threads (MPI_THREAD_MULTIPLE): each endpoint claimed for
 * receiving (poll_threaded), the state this thread's own. Out of line:
 * the single-threaded path below stays small. */
static __attribute__((noinline)) int progress_threaded(void)
{
    int count = 0;
    mca_btl_ivcom_eps_t *eps;
    progress_state_t *ps = &progress_tls;
    if (ps->in_progress || NULL == C->node) {
        return 0;
    }
    ps->in_progress = true;
    adopt_due(ps);
    eps = C->eps;
    opal_atomic_rmb();
    for (int i = 0; NULL != eps && i < eps->n; i++) {
        count += poll_threaded(eps->ep[i]);
    }
    ps->in_progress = false;
    return count;
}

/* A single-threaded call that found nothing, with mpi_yield_when_idle on:
 * whether to keep the core (peers_at_work). Out of line, as above. */
static __attribute__((noinline)) int idle_progress(const mca_btl_ivcom_eps_t *eps)
{
    return few_ranks_per_core(eps) ? peers_at_work(eps) : 0;
}

int mca_btl_ivcom_progress(void)
{
    int count = 0;
    mca_btl_ivcom_eps_t *eps;
    if (opal_using_threads()) {
        return progress_threaded();
    }
    if (progress_st.in_progress || NULL == C->node) {
        return 0;
    }
    progress_st.in_progress = true;
    adopt_due(&progress_st);
    eps = C->eps;
    opal_atomic_rmb();
    if (NULL != eps) {
        for (int i = 0; i < eps->n; i++) {
            mca_btl_base_endpoint_t *ep = eps->ep[i];
            if (OPAL_LIKELY(mca_btl_ivcom_link_open(ep))) {
                count += poll_single(ep);
            }
        }
    }
    if (0 == count && opal_progress_yield_when_idle) {
        count = idle_progress(eps);
    }
    progress_st.in_progress = false;
    return count;
}
