/*
 * btl/ivcom: send descriptors ("frags") and their inline helpers.
 *
 * A frag's payload is either ring space reserved in place (zero copy) or a
 * private buffer copied into the ring or socket at send.
 */
#ifndef MCA_BTL_IVCOM_FRAG_H
#define MCA_BTL_IVCOM_FRAG_H

#include "btl_ivcom.h"

BEGIN_C_DECLS

typedef struct mca_btl_ivcom_frag_t {
    mca_btl_base_descriptor_t base;
    mca_btl_base_segment_t segment;
    struct mca_btl_base_endpoint_t *endpoint;
    uint8_t *heap;          /* private buffer (kept across reuse) */
    size_t heap_size;
    bool in_ring;           /* segment points at the link's reservation */
    size_t sent;            /* bytes of a message larger than the pair's
                               records already in the ring (it waits at the
                               head of the pending list for the rest); set
                               by mca_btl_ivcom_send */
    mca_btl_base_tag_t tag;
} mca_btl_ivcom_frag_t;
OBJ_CLASS_DECLARATION(mca_btl_ivcom_frag_t);

static inline mca_btl_ivcom_frag_t *mca_btl_ivcom_frag_get(mca_btl_base_endpoint_t *ep)
{
    mca_btl_ivcom_frag_t *f =
        (mca_btl_ivcom_frag_t *) opal_free_list_get(&mca_btl_ivcom_component.frags);
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

static inline void mca_btl_ivcom_frag_return(mca_btl_ivcom_frag_t *f)
{
    opal_free_list_return(&mca_btl_ivcom_component.frags, &f->base.super);
}

/* Points the frag's payload at its private buffer, grown to `size`. */
bool mca_btl_ivcom_frag_heap(mca_btl_ivcom_frag_t *f, size_t size);

/* A descriptor the caller keeps (no MCA_BTL_DES_FLAGS_BTL_OWNERSHIP) is the
 * caller's again once its send completed, and may be rewritten and sent
 * again (Open MPI 5's active-message RDMA sends large operations piece by
 * piece through one descriptor). Its payload must then stay in memory the
 * caller owns: it never points into ring space, which belongs to the peer
 * once committed. */
static inline bool mca_btl_ivcom_caller_keeps(uint32_t flags)
{
    return !(flags & MCA_BTL_DES_FLAGS_BTL_OWNERSHIP);
}

/* Whether the endpoint's link takes messages written in place
 * (ivcom_link_reserve): a ring or a receive queue, not TCP. */
static inline bool mca_btl_ivcom_in_place(const mca_btl_base_endpoint_t *ep)
{
    return ep->ring || ep->queue;
}

/* Places the frag's payload in ring or queue space when it can be sent in
 * order; called with the endpoint's lock held, its link opened. (A queue
 * reservation holds the peer's queue until it is committed or cancelled:
 * ob1 sends or frees a descriptor right after packing it.) */
static inline bool mca_btl_ivcom_frag_ring(mca_btl_base_endpoint_t *ep, mca_btl_ivcom_frag_t *f,
                                           size_t size)
{
    uint8_t *p = NULL;
    if (NULL == ep->link || NULL != ep->reserved || !opal_list_is_empty(&ep->pending)
        || !mca_btl_ivcom_in_place(ep) || size > ep->max_send) {
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
static inline void mca_btl_ivcom_frag_done(mca_btl_ivcom_frag_t *f, bool always)
{
    uint32_t flags = f->base.des_flags;
    if ((always || (flags & MCA_BTL_DES_SEND_ALWAYS_CALLBACK)) && NULL != f->base.des_cbfunc) {
        f->base.des_cbfunc(&mca_btl_ivcom_module.super, f->endpoint, &f->base, OPAL_SUCCESS);
    }
    if (flags & MCA_BTL_DES_FLAGS_BTL_OWNERSHIP) {
        mca_btl_ivcom_frag_return(f);
    }
}

END_C_DECLS

#endif
