/*
 * btl/ivcom: module (peers, descriptors, send paths, progress).
 *
 * Send paths, fastest first:
 *   sendi        header + payload packed straight into a ring record;
 *   alloc/prepare_src
 *                the descriptor's payload *is* ring space when the link is a
 *                ring and has no other reservation outstanding (zero copy:
 *                one copy in, one copy out); otherwise a private buffer,
 *                copied into the ring or socket by send;
 *   send         commits the reservation, or copies the private buffer; if
 *                the ring is full the descriptor waits in the endpoint's
 *                pending list and progress sends it (completion callback).
 * Receive: progress polls every link; each message is handed to ob1 in
 * place (pointer into ring space or the socket buffer).
 */
#include "opal_config.h"

#include <string.h>

#include "opal/datatype/opal_convertor.h"
#include "opal/mca/pmix/pmix.h"
#include "opal/util/output.h"
#include "opal/util/show_help.h"

#include "btl_ivcom.h"

static void frag_construct(mca_btl_ivcom_frag_t *f)
{
    f->base.des_segments = &f->segment;
    f->base.des_segment_count = 1;
    f->heap = NULL;
    f->heap_size = 0;
    f->in_ring = false;
    f->endpoint = NULL;
}

static void frag_destruct(mca_btl_ivcom_frag_t *f)
{
    free(f->heap);
}

OBJ_CLASS_INSTANCE(mca_btl_ivcom_frag_t, mca_btl_base_descriptor_t, frag_construct, frag_destruct);

static void ep_construct(mca_btl_base_endpoint_t *ep)
{
    ep->proc = NULL;
    ep->card = NULL;
    ep->card_len = 0;
    ep->link = NULL;
    ep->ring = false;
    ep->max_send = 0;
    ep->failed = false;
    ep->closed = false;
    ep->reserved = NULL;
    OBJ_CONSTRUCT(&ep->pending, opal_list_t);
}

static void ep_destruct(mca_btl_base_endpoint_t *ep)
{
    free(ep->card);
    OBJ_DESTRUCT(&ep->pending);
}

OBJ_CLASS_INSTANCE(mca_btl_base_endpoint_t, opal_list_item_t, ep_construct, ep_destruct);

#define C (&mca_btl_ivcom_component)
#define MODULE (&mca_btl_ivcom_module.super)

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
    return (ep->proc && ep->proc->proc_hostname) ? ep->proc->proc_hostname : "unknown";
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
                " rx_doorbells=%" PRIu64,
                my_rank(), peer_rank(ep),
                ep->ring ? "ring" : "tcp", s.tx_msgs,
                s.tx_bytes, s.tx_doorbells, s.rx_msgs, s.rx_bytes, s.rx_doorbells);
}

static void attach(mca_btl_base_endpoint_t *ep, ivcom_link *link)
{
    char reason[512];
    ep->link = link;
    ep->ring = IVCOM_PATH_RING == ivcom_link_path(link);
    ep->max_send = MODULE->btl_max_send_size;
    if (ep->ring && ivcom_link_max_inline(link) < ep->max_send) {
        ep->max_send = ivcom_link_max_inline(link);
    }
    C->neps_linked++;
    ivcom_link_reason(link, reason, sizeof(reason));
    IVCOM_VERBOSE(1, "[ivcom] path rank=%u peer=%u path=%s reason=\"%s\"", my_rank(),
                  peer_rank(ep), ep->ring ? "ring" : "tcp",
                  reason);
    if (ivcom_link_degraded(link) && !C->warned_degraded) {
        C->warned_degraded = true;
        mca_btl_ivcom_help("degraded", "co-resident peer %s on TCP: %s",
                           opal_process_info.nodename, peer_host(ep), reason);
    }
}

/* Reports a broken link to ob1 (which aborts the job). */
static void link_failed(mca_btl_base_endpoint_t *ep, int rc)
{
    char err[512];
    if (IVCOM_E_CLOSED == rc && opal_list_is_empty(&ep->pending)) {
        /* The peer finalized: nothing more will come. */
        ep->closed = true;
        return;
    }
    if (ep->failed) {
        return;
    }
    ep->failed = true;
    ivcom_last_error(err, sizeof(err));
    mca_btl_ivcom_help("peer failed", "lost peer %s: %s", opal_process_info.nodename,
                       peer_host(ep), err);
    if (NULL != C->error_cb) {
        char info[600];
        snprintf(info, sizeof(info), "btl/ivcom: peer rank %u: %s", peer_rank(ep), err);
        C->error_cb(MODULE, MCA_BTL_ERROR_FLAGS_FATAL, ep->proc, info);
    }
}

static int ensure_link(mca_btl_base_endpoint_t *ep)
{
    ivcom_link *link = NULL;
    int rc;
    if (OPAL_LIKELY(NULL != ep->link)) {
        return OPAL_SUCCESS;
    }
    if (ep->failed || NULL == C->node) {
        return OPAL_ERR_UNREACH;
    }
    rc = ivcom_link_open(C->node, ep->card, ep->card_len, &link);
    if (IVCOM_OK != rc) {
        link_failed(ep, rc);
        return OPAL_ERR_UNREACH;
    }
    attach(ep, link);
    return OPAL_SUCCESS;
}

static mca_btl_ivcom_frag_t *frag_get(mca_btl_base_endpoint_t *ep)
{
    mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) opal_free_list_get(&C->frags);
    if (NULL != f) {
        f->endpoint = ep;
        f->in_ring = false;
        f->base.des_cbfunc = NULL;
        f->base.des_cbdata = NULL;
        f->base.des_flags = 0;
        f->base.order = MCA_BTL_NO_ORDER;
    }
    return f;
}

static void frag_return(mca_btl_ivcom_frag_t *f)
{
    opal_free_list_return(&C->frags, &f->base.super);
}

static bool frag_heap(mca_btl_ivcom_frag_t *f, size_t size)
{
    if (f->heap_size < size) {
        size_t want = size < 4096 ? 4096 : size;
        uint8_t *p = realloc(f->heap, want);
        if (NULL == p) {
            return false;
        }
        f->heap = p;
        f->heap_size = want;
    }
    f->segment.seg_addr.pval = f->heap;
    return true;
}

/* Places the frag's payload in ring space when it can be sent in order. */
static bool frag_ring(mca_btl_base_endpoint_t *ep, mca_btl_ivcom_frag_t *f, size_t size)
{
    uint8_t *p = NULL;
    if (OPAL_SUCCESS != ensure_link(ep) || NULL != ep->reserved
        || !opal_list_is_empty(&ep->pending) || !ep->ring || size > ep->max_send) {
        return false;
    }
    if (1 != ivcom_link_reserve(ep->link, size, &p)) {
        return false;
    }
    f->in_ring = true;
    f->segment.seg_addr.pval = p;
    ep->reserved = f;
    return true;
}

/* Completion of a frag whose data left: callback and release as asked. */
static void frag_done(mca_btl_ivcom_frag_t *f, bool always)
{
    uint32_t flags = f->base.des_flags;
    if ((always || (flags & MCA_BTL_DES_SEND_ALWAYS_CALLBACK)) && NULL != f->base.des_cbfunc) {
        f->base.des_cbfunc(MODULE, f->endpoint, &f->base, OPAL_SUCCESS);
    }
    if (flags & MCA_BTL_DES_FLAGS_BTL_OWNERSHIP) {
        frag_return(f);
    }
}

static int try_send_frag(mca_btl_base_endpoint_t *ep, mca_btl_ivcom_frag_t *f)
{
    ivcom_iov iov = {.base = f->segment.seg_addr.pval, .len = (size_t) f->segment.seg_len};
    return ivcom_link_try_send(ep->link, f->tag, &iov, 1);
}

/* Sends queued frags in order while the ring has room. */
static void drain_pending(mca_btl_base_endpoint_t *ep)
{
    while (!opal_list_is_empty(&ep->pending) && NULL == ep->reserved && !ep->failed) {
        mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) opal_list_get_first(&ep->pending);
        int rc = try_send_frag(ep, f);
        if (0 == rc) {
            return;
        }
        opal_list_remove_first(&ep->pending);
        if (rc < 0) {
            link_failed(ep, rc);
            return;
        }
        frag_done(f, true);
    }
}

static mca_btl_base_descriptor_t *ivcom_alloc(struct mca_btl_base_module_t *btl,
                                              struct mca_btl_base_endpoint_t *ep, uint8_t order,
                                              size_t size, uint32_t flags)
{
    mca_btl_ivcom_frag_t *f;
    (void) btl;
    (void) order;
    /* ob1 allocates at most btl_eager_limit bytes, which every link takes
     * (the smallest record a ring may shrink to). */
    if (size > MODULE->btl_max_send_size
        || (OPAL_SUCCESS == ensure_link(ep) && size > ep->max_send)) {
        return NULL;
    }
    f = frag_get(ep);
    if (NULL == f) {
        return NULL;
    }
    if (!frag_ring(ep, f, size) && !frag_heap(f, size)) {
        frag_return(f);
        return NULL;
    }
    f->segment.seg_len = size;
    f->base.des_flags = flags;
    return &f->base;
}

static int ivcom_free(struct mca_btl_base_module_t *btl, mca_btl_base_descriptor_t *des)
{
    mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) des;
    (void) btl;
    if (f->in_ring) {
        ivcom_link_cancel(f->endpoint->link);
        f->endpoint->reserved = NULL;
        f->in_ring = false;
    }
    frag_return(f);
    return OPAL_SUCCESS;
}

static mca_btl_base_descriptor_t *ivcom_prepare_src(struct mca_btl_base_module_t *btl,
                                                    struct mca_btl_base_endpoint_t *ep,
                                                    struct opal_convertor_t *conv, uint8_t order,
                                                    size_t reserve, size_t *size, uint32_t flags)
{
    mca_btl_ivcom_frag_t *f;
    struct iovec iov;
    uint32_t iov_count = 1;
    size_t max = *size;
    size_t limit = MODULE->btl_max_send_size;
    (void) btl;
    (void) order;
    /* A ring with shrunk records takes smaller pieces: ob1 sends the rest
     * in further fragments. */
    if (OPAL_SUCCESS == ensure_link(ep)) {
        limit = ep->max_send;
    }
    if (reserve >= limit) {
        return NULL;
    }
    if (reserve + max > limit) {
        max = limit - reserve;
    }
    f = frag_get(ep);
    if (NULL == f) {
        return NULL;
    }
    if (!frag_ring(ep, f, reserve + max)) {
        /* On a ring link with no room now, decline: ob1 keeps the request
         * pending and retries from its progress, instead of this BTL
         * packing into a private buffer that waits in a queue (an extra
         * copy and unbounded memory while a fast sender outruns the
         * receiver). TCP links always pack into a private buffer. */
        if (ep->ring) {
            frag_return(f);
            return NULL;
        }
        if (!frag_heap(f, reserve + max)) {
            frag_return(f);
            return NULL;
        }
    }
    iov.iov_base = (uint8_t *) f->segment.seg_addr.pval + reserve;
    iov.iov_len = max;
    if (opal_convertor_pack(conv, &iov, &iov_count, &max) < 0) {
        ivcom_free(btl, &f->base);
        return NULL;
    }
    *size = max;
    f->segment.seg_len = reserve + max;
    f->base.des_flags = flags;
    return &f->base;
}

static int ivcom_send(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                      struct mca_btl_base_descriptor_t *des, mca_btl_base_tag_t tag)
{
    mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) des;
    int rc;
    (void) btl;
    f->tag = tag;
    f->endpoint = ep;
    if (OPAL_UNLIKELY(ep->failed)) {
        return OPAL_ERR_UNREACH;
    }
    if (f->in_ring) {
        rc = ivcom_link_commit(ep->link, (size_t) f->segment.seg_len, tag);
        f->in_ring = false;
        ep->reserved = NULL;
        if (IVCOM_OK != rc) {
            link_failed(ep, rc);
            return OPAL_ERROR;
        }
        drain_pending(ep);
        frag_done(f, false);
        return 1;
    }
    if (OPAL_SUCCESS != ensure_link(ep)) {
        return OPAL_ERR_UNREACH;
    }
    if (opal_list_is_empty(&ep->pending) && NULL == ep->reserved) {
        rc = try_send_frag(ep, f);
        if (1 == rc) {
            frag_done(f, false);
            return 1;
        }
        if (rc < 0) {
            link_failed(ep, rc);
            return OPAL_ERROR;
        }
    }
    /* Ring full (or ordered behind others): progress sends it. */
    f->base.des_flags |= MCA_BTL_DES_SEND_ALWAYS_CALLBACK;
    opal_list_append(&ep->pending, &f->base.super.super);
    return OPAL_SUCCESS;
}

static int ivcom_sendi(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                       struct opal_convertor_t *conv, void *header, size_t header_size,
                       size_t payload_size, uint8_t order, uint32_t flags,
                       mca_btl_base_tag_t tag, mca_btl_base_descriptor_t **descriptor)
{
    size_t total = header_size + payload_size;
    uint8_t *dst = NULL;
    int rc;
    (void) btl;
    (void) order;
    (void) flags;
    if (NULL != descriptor) {
        *descriptor = NULL;
    }
    if (OPAL_UNLIKELY(OPAL_SUCCESS != ensure_link(ep))) {
        return OPAL_ERR_UNREACH;
    }
    if (NULL != ep->reserved || !opal_list_is_empty(&ep->pending) || total > ep->max_send) {
        return OPAL_ERR_RESOURCE_BUSY;
    }
    if (ep->ring) {
        rc = ivcom_link_reserve(ep->link, total, &dst);
        if (1 != rc) {
            if (rc < 0) {
                link_failed(ep, rc);
                return OPAL_ERROR;
            }
            return OPAL_ERR_RESOURCE_BUSY;
        }
    } else {
        /* TCP: gather into a scratch frag; the link queues what the socket
         * does not take. */
        mca_btl_ivcom_frag_t *f = frag_get(ep);
        if (NULL == f || !frag_heap(f, total)) {
            if (f) frag_return(f);
            return OPAL_ERR_RESOURCE_BUSY;
        }
        dst = f->heap;
        memcpy(dst, header, header_size);
        if (payload_size) {
            struct iovec iov = {.iov_base = dst + header_size, .iov_len = payload_size};
            uint32_t n = 1;
            size_t max = payload_size;
            opal_convertor_pack(conv, &iov, &n, &max);
        }
        ivcom_iov v = {.base = dst, .len = total};
        rc = ivcom_link_try_send(ep->link, tag, &v, 1);
        frag_return(f);
        if (rc < 0) {
            link_failed(ep, rc);
            return OPAL_ERROR;
        }
        return OPAL_SUCCESS;
    }
    memcpy(dst, header, header_size);
    if (payload_size) {
        struct iovec iov = {.iov_base = dst + header_size, .iov_len = payload_size};
        uint32_t n = 1;
        size_t max = payload_size;
        if (opal_convertor_pack(conv, &iov, &n, &max) < 0) {
            ivcom_link_cancel(ep->link);
            return OPAL_ERROR;
        }
        total = header_size + max;
    }
    rc = ivcom_link_commit(ep->link, total, tag);
    if (IVCOM_OK != rc) {
        link_failed(ep, rc);
        return OPAL_ERROR;
    }
    return OPAL_SUCCESS;
}

/* Receive: hand one message to the upper layer, in place. The descriptor
 * is built once: progress never runs nested (in_progress), so one at a time
 * is in use, and the upper layer only reads it during the call. */
static mca_btl_base_segment_t recv_seg;
static mca_btl_base_descriptor_t recv_des = {.des_segments = &recv_seg, .des_segment_count = 1};

static void recv_cb(void *ctx, uint8_t tag, const uint8_t *data, size_t len)
{
    const mca_btl_active_message_callback_t *reg = mca_btl_base_active_message_trigger + tag;
    (void) ctx;
    if (OPAL_UNLIKELY(NULL == reg->cbfunc)) {
        return;
    }
    recv_seg.seg_addr.pval = (void *) data;
    recv_seg.seg_len = len;
    reg->cbfunc(MODULE, tag, &recv_des, reg->cbdata);
}

static bool same_card(mca_btl_base_endpoint_t *ep, const uint8_t *card, size_t len)
{
    return ep->card_len == len && 0 == memcmp(ep->card, card, len);
}

static void push_orphan(ivcom_link *link)
{
    if (C->norphans == C->cap_orphans) {
        int cap = C->cap_orphans ? 2 * C->cap_orphans : 8;
        ivcom_link **p = realloc(C->orphans, cap * sizeof(*p));
        if (NULL == p) {
            ivcom_link_free(link);
            return;
        }
        C->orphans = p;
        C->cap_orphans = cap;
    }
    C->orphans[C->norphans++] = link;
}

/* Links peers opened to us: give each to its endpoint. */
static void accept_incoming(void)
{
    ivcom_link *link;
    uint8_t card[128];
    while (1 == ivcom_node_accept(C->node, &link)) {
        size_t len = ivcom_link_peer_card(link, card, sizeof(card));
        bool placed = false;
        for (int i = 0; i < C->neps && !placed; i++) {
            mca_btl_base_endpoint_t *ep = C->eps[i];
            if (len <= sizeof(card) && same_card(ep, card, len)) {
                if (NULL == ep->link) {
                    attach(ep, link);
                } else {
                    ivcom_link_free(link);
                }
                placed = true;
            }
        }
        if (!placed) {
            push_orphan(link);
        }
    }
}

int mca_btl_ivcom_progress(void)
{
    int count = 0;
    if (C->in_progress || NULL == C->node) {
        return 0;
    }
    C->in_progress = true;
    /* Links that peers opened: checked every 16th call (an FFI call and an
     * atomic load), and on every call while we have no link at all. */
    if ((0 == (++C->progress_calls & 15) || 0 == C->neps_linked) && ivcom_node_pending(C->node) > 0) {
        accept_incoming();
    }
    for (int i = 0; i < C->neps; i++) {
        mca_btl_base_endpoint_t *ep = C->eps[i];
        int rc;
        if (NULL == ep->link || ep->failed || ep->closed) {
            continue;
        }
        if (!opal_list_is_empty(&ep->pending)) {
            drain_pending(ep);
        }
        rc = ivcom_link_poll(ep->link, 16, recv_cb, ep);
        if (rc > 0) {
            count += rc;
        } else if (rc < 0) {
            link_failed(ep, rc);
        }
    }
    /* Links of peers that ob1 has not added yet (it adds remote peers
     * lazily, on first send): their messages are delivered all the same. */
    for (int k = 0; k < C->norphans; k++) {
        int rc = ivcom_link_poll(C->orphans[k], 16, recv_cb, NULL);
        if (rc > 0) {
            count += rc;
        } else if (rc < 0) {
            char err[512];
            if (IVCOM_E_CLOSED != rc) {
                ivcom_last_error(err, sizeof(err));
                opal_output(0, "btl/ivcom: lost a peer not yet added: %s", err);
            }
            ivcom_link_free(C->orphans[k]);
            C->orphans[k--] = C->orphans[--C->norphans];
        }
    }
    C->in_progress = false;
    return count;
}

static int ivcom_add_procs(struct mca_btl_base_module_t *btl, size_t nprocs,
                           struct opal_proc_t **procs, struct mca_btl_base_endpoint_t **peers,
                           opal_bitmap_t *reachable)
{
    opal_proc_t *me = opal_proc_local_get();
    (void) btl;
    for (size_t i = 0; i < nprocs; i++) {
        uint8_t *data = NULL;
        size_t size = 0;
        int rc;
        if (procs[i] == me) {
            continue;
        }
        OPAL_MODEX_RECV(rc, &C->super.btl_version, &procs[i]->proc_name, (void **) &data, &size);
        if (OPAL_SUCCESS != rc || NULL == data) {
            continue; /* the peer runs without ivcom */
        }
        mca_btl_base_endpoint_t *ep = OBJ_NEW(mca_btl_base_endpoint_t);
        if (NULL == ep) {
            free(data);
            return OPAL_ERR_OUT_OF_RESOURCE;
        }
        ep->proc = procs[i];
        ep->card = data;
        ep->card_len = size;
        if (C->neps == C->cap_eps) {
            int cap = C->cap_eps ? 2 * C->cap_eps : 16;
            mca_btl_base_endpoint_t **p = realloc(C->eps, cap * sizeof(*p));
            if (NULL == p) {
                OBJ_RELEASE(ep);
                return OPAL_ERR_OUT_OF_RESOURCE;
            }
            C->eps = p;
            C->cap_eps = cap;
        }
        C->eps[C->neps++] = ep;
        /* A link the peer opened before we knew it. */
        for (int k = 0; k < C->norphans; k++) {
            uint8_t card[128];
            size_t len = ivcom_link_peer_card(C->orphans[k], card, sizeof(card));
            if (len <= sizeof(card) && same_card(ep, card, len)) {
                attach(ep, C->orphans[k]);
                C->orphans[k] = C->orphans[--C->norphans];
                break;
            }
        }
        peers[i] = ep;
        opal_bitmap_set_bit(reachable, (int) i);
    }
    return OPAL_SUCCESS;
}

static void release_endpoint(mca_btl_base_endpoint_t *ep)
{
    opal_list_item_t *item;
    print_stats(ep);
    while (NULL != (item = opal_list_remove_first(&ep->pending))) {
        frag_return((mca_btl_ivcom_frag_t *) item);
    }
    if (NULL != ep->link) {
        /* Push what TCP still holds, briefly. */
        for (int i = 0; i < 1000 && ivcom_link_flush(ep->link) > 0; i++) {
            usleep(1000);
        }
        ivcom_link_free(ep->link);
        ep->link = NULL;
        C->neps_linked--;
    }
    OBJ_RELEASE(ep);
}

static int ivcom_del_procs(struct mca_btl_base_module_t *btl, size_t nprocs,
                           struct opal_proc_t **procs, struct mca_btl_base_endpoint_t **peers)
{
    (void) btl;
    (void) procs;
    for (size_t i = 0; i < nprocs; i++) {
        mca_btl_base_endpoint_t *ep = peers[i];
        if (NULL == ep) {
            continue;
        }
        for (int k = 0; k < C->neps; k++) {
            if (C->eps[k] == ep) {
                C->eps[k] = C->eps[--C->neps];
                release_endpoint(ep);
                break;
            }
        }
    }
    return OPAL_SUCCESS;
}

void mca_btl_ivcom_close_all(void)
{
    while (C->neps > 0) {
        release_endpoint(C->eps[--C->neps]);
    }
    free(C->eps);
    C->eps = NULL;
    C->cap_eps = 0;
    while (C->norphans > 0) {
        ivcom_link_free(C->orphans[--C->norphans]);
    }
    free(C->orphans);
    C->orphans = NULL;
    C->cap_orphans = 0;
    if (NULL != C->node) {
        ivcom_node_free(C->node);
        C->node = NULL;
    }
}

static int ivcom_finalize(struct mca_btl_base_module_t *btl)
{
    (void) btl;
    mca_btl_ivcom_close_all();
    return OPAL_SUCCESS;
}

static int ivcom_register_error(struct mca_btl_base_module_t *btl,
                                mca_btl_base_module_error_cb_fn_t cbfunc)
{
    (void) btl;
    C->error_cb = cbfunc;
    return OPAL_SUCCESS;
}

mca_btl_ivcom_module_t mca_btl_ivcom_module = {
    .super = {
        .btl_component = &mca_btl_ivcom_component.super,
        .btl_add_procs = ivcom_add_procs,
        .btl_del_procs = ivcom_del_procs,
        .btl_finalize = ivcom_finalize,
        .btl_alloc = ivcom_alloc,
        .btl_free = ivcom_free,
        .btl_prepare_src = ivcom_prepare_src,
        .btl_send = ivcom_send,
        .btl_sendi = ivcom_sendi,
        .btl_register_error = ivcom_register_error,
    },
};
