/*
 * btl/ivcom: peers. An endpoint holds a peer's card (from the modex) and,
 * from its first message on, its link: the path (ring or TCP) the core
 * chose, failures reported to the upper layer, and the counters printed
 * at the end. A link a peer opens to us before the upper layer added it
 * gets an endpoint of its own at once (without a proc), which add_procs
 * completes. This process itself has an endpoint too, whose messages are
 * delivered in place (so `--mca btl ivcom` alone works).
 *
 * Threads: the endpoints are published as a snapshot array that progress
 * reads without a lock (mca_btl_ivcom_eps_t); changes to the set happen
 * under the component's lock. Each endpoint's own state is under its lock
 * (btl_ivcom.h).
 */
#include "opal_config.h"

#include <string.h>
#include <unistd.h>

#include "opal/sys/atomic.h"
#include "opal/util/output.h"

#include "btl_ivcom.h"
#include "btl_ivcom_frag.h"

#define C (&mca_btl_ivcom_component)
#define MODULE (&mca_btl_ivcom_module.super)

static void ep_construct(mca_btl_base_endpoint_t *ep)
{
    OBJ_CONSTRUCT(&ep->lock, opal_mutex_t);
    ep->proc = NULL;
    ep->card = NULL;
    ep->card_len = 0;
    ep->card_id = 0;
    ep->link = NULL;
    ep->self = false;
    ep->ring = false;
    ep->queue = false;
    ep->max_send = 0;
    ep->failed = false;
    ep->closed = false;
    ep->rx_claim = 0;
    ep->rx = NULL;
    ep->npending = 0;
    ep->kept_core = 0;
    ep->queued = 0;
    ep->parked = 0;
    ep->pieces_nt = 0;
    ep->nt_probes = 0;
    ep->nt_pieces = 0;
    ep->nt_slow = 0;
    ep->nt_far = 0;
    ep->nt_windows_far = 0;
    ep->nt_windows_near = 0;
    ep->reserved = NULL;
    OBJ_CONSTRUCT(&ep->pending, opal_list_t);
    ep->recv_head_used = 0;
    memset(ep->recv_seg, 0, sizeof(ep->recv_seg));
    memset(&ep->recv_des, 0, sizeof(ep->recv_des));
    memset(ep->recv_head, 0, sizeof(ep->recv_head));
}

static void ep_destruct(mca_btl_base_endpoint_t *ep)
{
    free(ep->card);
    OBJ_DESTRUCT(&ep->pending);
    OBJ_DESTRUCT(&ep->lock);
}

OBJ_CLASS_INSTANCE(mca_btl_base_endpoint_t, opal_list_item_t, ep_construct, ep_destruct);

static uint32_t my_rank(void)
{
    return OPAL_PROC_MY_NAME.vpid;
}

static uint32_t peer_rank(mca_btl_base_endpoint_t *ep)
{
    return ep->proc ? ep->proc->proc_name.vpid : (uint32_t) -1;
}

static const char *peer_host(mca_btl_base_endpoint_t *ep)
{
    const char *host = ep->proc ? opal_get_proc_hostname(ep->proc) : NULL;
    return host ? host : "unknown";
}

/* The path of a link, as the verbose lines name it. */
static const char *path_name(const ivcom_link *link)
{
    switch (ivcom_link_path(link)) {
    case IVCOM_PATH_RING:
        return "ring";
    case IVCOM_PATH_QUEUE:
        return "queue";
    default:
        return "tcp";
    }
}

static void print_stats(mca_btl_base_endpoint_t *ep)
{
    ivcom_stats s;
    if (NULL == ep->link || C->verbose < 1) {
        return;
    }
    ivcom_link_stats(ep->link, &s);
    opal_output(0,
                "[ivcom] stats rank=%u peer=%u path=%s tx_msgs=%" PRIu64 " tx_bytes=%" PRIu64
                " tx_doorbells=%" PRIu64 " rx_msgs=%" PRIu64 " rx_bytes=%" PRIu64
                " rx_doorbells=%" PRIu64 " tx_reach=%" PRIu64 " kept_core=%" PRIu64
                " queued=%" PRIu64 " parked=%" PRIu64 " pieces_nt=%" PRIu64
                " windows_far=%" PRIu64 " windows_near=%" PRIu64,
                my_rank(), peer_rank(ep), path_name(ep->link), s.tx_msgs,
                s.tx_bytes, s.tx_doorbells, s.rx_msgs, s.rx_bytes, s.rx_doorbells, s.tx_reach,
                ep->kept_core, ep->queued, ep->parked,
                __atomic_load_n(&ep->pieces_nt, __ATOMIC_RELAXED),
                __atomic_load_n(&ep->nt_windows_far, __ATOMIC_RELAXED),
                __atomic_load_n(&ep->nt_windows_near, __ATOMIC_RELAXED));
}

/* Gives `ep` its link; called with the endpoint's lock held. */
void mca_btl_ivcom_endpoint_attach(mca_btl_base_endpoint_t *ep, ivcom_link *link)
{
    char reason[512];
    ep->link = link;
    ep->ring = IVCOM_PATH_RING == ivcom_link_path(link);
    ep->queue = IVCOM_PATH_QUEUE == ivcom_link_path(link);
    /* (published last: a poller that sees it sees the link) */
    __atomic_store_n(&ep->rx, ep->ring ? ivcom_link_rx(link) : NULL, __ATOMIC_RELEASE);
    ep->max_send = MODULE->btl_max_send_size;
    /* A ring's or a queue's records bound what goes in one (a TCP frame
     * takes any message this component sends). */
    if (IVCOM_PATH_TCP != ivcom_link_path(link) && ivcom_link_max_inline(link) < ep->max_send) {
        ep->max_send = ivcom_link_max_inline(link);
    }
    OPAL_THREAD_ADD_FETCH32(&C->neps_linked, 1);
    if (NULL == ep->proc) {
        return; /* said by mca_btl_ivcom_endpoint_add, once the peer is known */
    }
    ivcom_link_reason(link, reason, sizeof(reason));
    IVCOM_VERBOSE(1, "[ivcom] path rank=%u peer=%u path=%s reason=\"%s\"", my_rank(),
                  peer_rank(ep), path_name(link), reason);
    if (ivcom_link_degraded(link) && !C->warned_degraded) {
        C->warned_degraded = true;
        mca_btl_ivcom_help("degraded", "on %s: co-resident peer %s on TCP: %s",
                           opal_process_info.nodename, peer_host(ep), reason);
    }
}

/* Reports a broken link to ob1 (which aborts the job). Called without the
 * endpoint's lock; the first report of a failure wins. */
void mca_btl_ivcom_endpoint_failed(mca_btl_base_endpoint_t *ep, int rc)
{
    char err[512];
    bool first;
    ivcom_last_error(err, sizeof(err));
    OPAL_THREAD_LOCK(&ep->lock);
    if (IVCOM_E_CLOSED == rc && opal_list_is_empty(&ep->pending)) {
        /* The peer finalized: nothing more will come. */
        __atomic_store_n(&ep->closed, true, __ATOMIC_RELAXED);
        OPAL_THREAD_UNLOCK(&ep->lock);
        return;
    }
    first = !ep->failed;
    ep->failed = true;
    OPAL_THREAD_UNLOCK(&ep->lock);
    if (!first) {
        return;
    }
    char who[160];
    snprintf(who, sizeof(who), "rank %u on %s", peer_rank(ep), peer_host(ep));
    mca_btl_ivcom_help("peer failed", "on %s: lost peer %s: %s", opal_process_info.nodename, who,
                       err);
    if (NULL != C->error_cb && NULL != ep->proc) {
        char info[600];
        snprintf(info, sizeof(info), "btl/ivcom: peer rank %u: %s", peer_rank(ep), err);
        C->error_cb(MODULE, MCA_BTL_ERROR_FLAGS_FATAL, ep->proc, info);
    }
}

/* Opens the link of an endpoint that has none (mca_btl_ivcom_endpoint_ready),
 * with its lock held: other threads sending to this peer wait for the
 * handshake, progress passes it by. */
int mca_btl_ivcom_endpoint_connect(mca_btl_base_endpoint_t *ep, int *failed_rc)
{
    ivcom_link *link = NULL;
    int rc;
    if (ep->failed || NULL == C->node || NULL == ep->card) {
        return OPAL_ERR_UNREACH;
    }
    rc = ivcom_link_open(C->node, ep->card, ep->card_len, &link);
    if (IVCOM_OK != rc) {
        *failed_rc = rc;
        return OPAL_ERR_UNREACH;
    }
    mca_btl_ivcom_endpoint_attach(ep, link);
    return OPAL_SUCCESS;
}

/* The current snapshot of endpoints. */
static inline mca_btl_ivcom_eps_t *eps_now(void)
{
    mca_btl_ivcom_eps_t *e = C->eps;
    opal_atomic_rmb();
    return e;
}

static mca_btl_base_endpoint_t *find(uint64_t id)
{
    mca_btl_ivcom_eps_t *e = eps_now();
    for (int i = 0; NULL != e && i < e->n; i++) {
        if (e->ep[i]->card_id == id && !e->ep[i]->self) {
            return e->ep[i];
        }
    }
    return NULL;
}

/* Publishes the set of endpoints with `add` in it and `drop` out of it
 * (either may be NULL); called with the component's lock held. */
static int eps_replace(mca_btl_base_endpoint_t *add, mca_btl_base_endpoint_t *drop)
{
    mca_btl_ivcom_eps_t *old = C->eps, *e;
    int n = old ? old->n : 0;
    e = malloc(sizeof(*e) + (size_t) (n + 1) * sizeof(e->ep[0]));
    if (NULL == e) {
        return OPAL_ERR_OUT_OF_RESOURCE;
    }
    e->n = 0;
    for (int i = 0; i < n; i++) {
        if (old->ep[i] != drop) {
            e->ep[e->n++] = old->ep[i];
        }
    }
    if (NULL != add) {
        e->ep[e->n++] = add;
    }
    /* Threads may still be reading the old snapshot: it is kept until
     * close. */
    e->retired = old;
    opal_atomic_wmb();
    C->eps = e;
    return OPAL_SUCCESS;
}

/* Links peers opened to us: each goes to its endpoint (unless a thread is
 * busy with that endpoint: then it opens the link itself, taking this
 * one), or gets a new endpoint without a proc until add_procs. */
void mca_btl_ivcom_adopt_incoming(void)
{
    uint64_t ids[64];
    size_t n;
    if (0 != OPAL_THREAD_TRYLOCK(&C->lock)) {
        return; /* another thread is at it */
    }
    n = ivcom_node_pending_ids(C->node, ids, 64);
    for (size_t i = 0; i < n && i < 64; i++) {
        ivcom_link *link = NULL;
        mca_btl_base_endpoint_t *ep = find(ids[i]);
        if (NULL != ep) {
            if (0 != OPAL_THREAD_TRYLOCK(&ep->lock)) {
                continue;
            }
            if (NULL == ep->link && 1 == ivcom_node_take(C->node, ids[i], &link)) {
                mca_btl_ivcom_endpoint_attach(ep, link);
            }
            OPAL_THREAD_UNLOCK(&ep->lock);
            continue;
        }
        if (1 != ivcom_node_take(C->node, ids[i], &link)) {
            continue;
        }
        /* A member of this job (the core authenticated it and the resolver
         * found its card) that ob1 has not added yet. At most one such
         * endpoint per rank of the job. */
        ep = OBJ_NEW(mca_btl_base_endpoint_t);
        if (NULL == ep) {
            ivcom_link_free(link);
            continue;
        }
        ep->card_id = ids[i];
        mca_btl_ivcom_endpoint_attach(ep, link);
        if (OPAL_SUCCESS != eps_replace(ep, NULL)) {
            ivcom_link_free(link);
            OBJ_RELEASE(ep);
        }
    }
    OPAL_THREAD_UNLOCK(&C->lock);
}

/* The endpoint of `proc`, taking ownership of `card` (malloc'ed): the one
 * its link made if the link came first, or a new one. */
int mca_btl_ivcom_endpoint_add(opal_proc_t *proc, uint8_t *card, size_t card_len,
                               mca_btl_base_endpoint_t **out)
{
    uint64_t id = ivcom_card_id(card, card_len);
    mca_btl_base_endpoint_t *ep;
    int rc = OPAL_SUCCESS;
    /* The peer may connect to us from now on. */
    if (0 == id || IVCOM_OK != ivcom_node_admit(C->node, card, card_len)) {
        char err[512];
        ivcom_last_error(err, sizeof(err));
        opal_output(0, "btl/ivcom: rank %u published an unusable card: %s",
                    proc->proc_name.vpid, err);
        free(card);
        return OPAL_ERR_UNREACH;
    }
    OPAL_THREAD_LOCK(&C->lock);
    ep = find(id);
    if (NULL != ep) {
        OPAL_THREAD_LOCK(&ep->lock);
        if (NULL == ep->proc) {
            ep->proc = proc;
            ep->card = card;
            ep->card_len = card_len;
            card = NULL;
            if (NULL != ep->link) {
                char reason[512];
                ivcom_link_reason(ep->link, reason, sizeof(reason));
                IVCOM_VERBOSE(1, "[ivcom] path rank=%u peer=%u path=%s reason=\"%s\"",
                              my_rank(), peer_rank(ep), path_name(ep->link), reason);
            }
        }
        OPAL_THREAD_UNLOCK(&ep->lock);
        free(card);
    } else {
        ep = OBJ_NEW(mca_btl_base_endpoint_t);
        if (NULL == ep) {
            free(card);
            rc = OPAL_ERR_OUT_OF_RESOURCE;
        } else {
            ep->proc = proc;
            ep->card = card;
            ep->card_len = card_len;
            ep->card_id = id;
            rc = eps_replace(ep, NULL);
            if (OPAL_SUCCESS != rc) {
                OBJ_RELEASE(ep);
            }
        }
    }
    OPAL_THREAD_UNLOCK(&C->lock);
    if (OPAL_SUCCESS == rc) {
        *out = ep;
    }
    return rc;
}

/* The endpoint of this process itself: messages to it are delivered in
 * place (no link), so a job runs with `--mca btl ivcom` alone. */
int mca_btl_ivcom_endpoint_self(opal_proc_t *proc, mca_btl_base_endpoint_t **out)
{
    int rc;
    mca_btl_base_endpoint_t *ep = OBJ_NEW(mca_btl_base_endpoint_t);
    if (NULL == ep) {
        return OPAL_ERR_OUT_OF_RESOURCE;
    }
    ep->proc = proc;
    ep->self = true;
    ep->max_send = MODULE->btl_max_send_size;
    OPAL_THREAD_LOCK(&C->lock);
    rc = eps_replace(ep, NULL);
    OPAL_THREAD_UNLOCK(&C->lock);
    if (OPAL_SUCCESS != rc) {
        OBJ_RELEASE(ep);
        return rc;
    }
    *out = ep;
    return OPAL_SUCCESS;
}

/* Prints the counters, drops queued frags, flushes and frees the link,
 * and releases the endpoint. */
static void endpoint_release(mca_btl_base_endpoint_t *ep)
{
    opal_list_item_t *item;
    print_stats(ep);
    while (NULL != (item = opal_list_remove_first(&ep->pending))) {
        mca_btl_ivcom_frag_return((mca_btl_ivcom_frag_t *) item);
    }
    mca_btl_ivcom_pending_changed(ep);
    if (NULL != ep->link) {
        /* Push what TCP still holds, briefly. */
        for (int i = 0; i < 1000 && ivcom_link_flush(ep->link) > 0; i++) {
            usleep(1000);
        }
        __atomic_store_n(&ep->rx, NULL, __ATOMIC_RELEASE); /* (the link's) */
        ivcom_link_free(ep->link);
        ep->link = NULL;
        OPAL_THREAD_ADD_FETCH32(&C->neps_linked, -1);
    }
    OBJ_RELEASE(ep);
}

/* Forgets and releases one endpoint of this process (del_procs: the
 * upper layer no longer uses it). */
void mca_btl_ivcom_endpoint_remove(mca_btl_base_endpoint_t *ep)
{
    mca_btl_ivcom_eps_t *e;
    bool found = false;
    OPAL_THREAD_LOCK(&C->lock);
    e = C->eps;
    for (int i = 0; NULL != e && i < e->n; i++) {
        found = found || e->ep[i] == ep;
    }
    if (found && OPAL_SUCCESS == eps_replace(NULL, ep)) {
        OPAL_THREAD_UNLOCK(&C->lock);
        endpoint_release(ep);
        return;
    }
    OPAL_THREAD_UNLOCK(&C->lock);
}

/* Releases every endpoint and every snapshot (finalize, close: no other
 * thread runs in this component any more). */
void mca_btl_ivcom_endpoints_close(void)
{
    mca_btl_ivcom_eps_t *e = C->eps;
    for (int i = 0; NULL != e && i < e->n; i++) {
        endpoint_release(e->ep[i]);
    }
    while (NULL != e) {
        mca_btl_ivcom_eps_t *r = e->retired;
        free(e);
        e = r;
    }
    C->eps = NULL;
}
