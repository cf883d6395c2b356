/*
 * btl/ivcom: the module (adding and removing peers, finalize, the error
 * callback) and the table of its functions.
 */
#include "opal_config.h"

#include <stdlib.h>
#include <string.h>

#include "btl_ivcom.h"

#define C (&mca_btl_ivcom_component)

static int ivcom_add_procs(struct mca_btl_base_module_t *btl, size_t nprocs,
                           struct opal_proc_t **procs, struct mca_btl_base_endpoint_t **peers,
                           opal_bitmap_t *reachable)
{
    opal_proc_t *me = opal_proc_local_get();
    (void) btl;
    /* With a ring backend, the whole job's cards first: on Xen each offer
     * takes a fair share of the grant pool, and on any backend the ring
     * budget is divided among the co-resident peers from the start */
    OPAL_THREAD_LOCK(&C->lock);
    if (!C->job_admitted && NULL != C->node) {
        char status[64];
        C->job_admitted = true;
        if (1 == ivcom_node_ring_status(C->node, status, sizeof(status))) {
            mca_btl_ivcom_admit_job(C->node);
        }
    }
    OPAL_THREAD_UNLOCK(&C->lock);
    for (size_t i = 0; i < nprocs; i++) {
        uint8_t *data = NULL;
        size_t size = 0;
        mca_btl_base_endpoint_t *ep;
        int rc;
        if (procs[i] == me) {
            /* This process: delivered in place (with btl/self in the list,
             * its higher exclusivity wins for this peer). */
            if (OPAL_SUCCESS != mca_btl_ivcom_endpoint_self(procs[i], &ep)) {
                return OPAL_ERR_OUT_OF_RESOURCE;
            }
            peers[i] = ep;
            opal_bitmap_set_bit(reachable, (int) i);
            continue;
        }
        if (OPAL_SUCCESS != mca_btl_ivcom_card_fetch(procs[i], &data, &size)) {
            continue; /* the peer runs without ivcom */
        }
        if (0 == C->tcp && NULL != C->node
            && 0 == ivcom_node_ring_candidate(C->node, data, size)) {
            /* It cannot share memory with us, and TCP is left to the other
             * BTLs (btl_ivcom_tcp 0): unreachable here. (A malformed card
             * goes on, to be refused by name below.) */
            free(data);
            continue;
        }
        rc = mca_btl_ivcom_endpoint_add(procs[i], data, size, &ep);
        if (OPAL_ERR_UNREACH == rc) {
            continue; /* its card is unusable (said above): unreachable here */
        }
        if (OPAL_SUCCESS != rc) {
            return rc;
        }
        peers[i] = ep;
        opal_bitmap_set_bit(reachable, (int) i);
    }
    return OPAL_SUCCESS;
}

static int ivcom_del_procs(struct mca_btl_base_module_t *btl, size_t nprocs,
                           struct opal_proc_t **procs, struct mca_btl_base_endpoint_t **peers)
{
    (void) btl;
    (void) procs;
    for (size_t i = 0; i < nprocs; i++) {
        if (NULL != peers[i]) {
            mca_btl_ivcom_endpoint_remove(peers[i]);
        }
    }
    return OPAL_SUCCESS;
}

void mca_btl_ivcom_close_all(void)
{
    mca_btl_ivcom_endpoints_close();
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
        .btl_alloc = mca_btl_ivcom_alloc,
        .btl_free = mca_btl_ivcom_free,
        .btl_prepare_src = mca_btl_ivcom_prepare_src,
        .btl_send = mca_btl_ivcom_send,
        .btl_sendi = mca_btl_ivcom_sendi,
        .btl_register_error = ivcom_register_error,
    },
};
