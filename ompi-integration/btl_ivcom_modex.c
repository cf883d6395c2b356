/*
 * btl/ivcom: locality cards through the modex. Every process publishes the
 * full card of its node (backend, host identity, domain, TCP address,
 * random id, its process name, and its secret key: the modex is the job's
 * private channel, the only one the key travels); add_procs reads each
 * peer's card, and the resolver finds the card of a peer that connects
 * before add_procs. The only file that speaks to the modex (its header and
 * scope differ between Open MPI series).
 */
#include "opal_config.h"

#include <stdlib.h>
#include <string.h>

#include "btl_ivcom.h"
#include "btl_ivcom_compat.h"
#include IVCOM_MODEX_HEADER

/* Publishes the card of `node` under this component's name. */
int mca_btl_ivcom_card_publish(ivcom_node *node)
{
    int rc;
    size_t len = ivcom_node_card(node, NULL, 0);
    uint8_t *card = malloc(len);
    if (NULL == card) {
        return OPAL_ERR_OUT_OF_RESOURCE;
    }
    ivcom_node_card(node, card, len);
    OPAL_MODEX_SEND(rc, IVCOM_MODEX_GLOBAL, &mca_btl_ivcom_component.super.btl_version, card, len);
    free(card);
    return OPAL_SUCCESS == rc ? OPAL_SUCCESS : OPAL_ERROR;
}

/* The name a process publishes in its card: its Open MPI process name. */
uint64_t mca_btl_ivcom_name(opal_process_name_t name)
{
    return ((uint64_t) name.jobid << 32) | (uint64_t) name.vpid;
}

/* The card resolver: a peer that proved it knows our key connected before
 * add_procs told us about it (ob1 adds remote peers lazily). It is a
 * member of the job only if its name carries our job id and the modex has
 * a card under that name; the core then checks the card matches the one
 * the peer claims. Called from the core's handshake threads: only the
 * modex lookup runs there (thread-safe), nothing of ob1 or the proc table. */
size_t mca_btl_ivcom_card_resolve(void *ctx, uint64_t name, uint8_t *buf, size_t len)
{
    opal_process_name_t who;
    uint8_t *data = NULL;
    size_t size = 0;
    int rc;
    (void) ctx;
    who.jobid = (opal_jobid_t) (name >> 32);
    who.vpid = (opal_vpid_t) (name & 0xffffffffu);
    if (who.jobid != OPAL_PROC_MY_NAME.jobid || who.vpid == OPAL_PROC_MY_NAME.vpid) {
        return 0;
    }
    OPAL_MODEX_RECV(rc, &mca_btl_ivcom_component.super.btl_version, &who, (void **) &data, &size);
    if (OPAL_SUCCESS != rc || NULL == data || size > len) {
        free(data);
        return 0;
    }
    memcpy(buf, data, size);
    free(data);
    return size;
}

/* Admits the card of every process of this job (jobs of up to
 * IVCOM_ADMIT_JOB_MAX processes), so that the node knows all its
 * co-resident peers before it offers its first ring: on Xen each offer
 * takes a fair share of the domain's grant pool (gntalloc's page limit),
 * each ring wraps within its share of the ring budget (divided among the
 * co-resident peers), and ob1 adds peers lazily, so add_procs alone would
 * tell only of the peers met so far. Larger jobs count those. Best effort: a process
 * without a card (it runs without ivcom) is skipped. */
#define IVCOM_ADMIT_JOB_MAX 4096
void mca_btl_ivcom_admit_job(ivcom_node *node)
{
    opal_process_name_t who = OPAL_PROC_MY_NAME;
    uint32_t size = 0, *sizep = &size;
    int rc;
    who.vpid = OPAL_VPID_WILDCARD;
    OPAL_MODEX_RECV_VALUE(rc, IVCOM_KEY_JOB_SIZE, &who, &sizep, IVCOM_TYPE_UINT32);
    if (OPAL_SUCCESS != rc || size > IVCOM_ADMIT_JOB_MAX) {
        return;
    }
    for (uint32_t v = 0; v < size; v++) {
        uint8_t *data = NULL;
        size_t len = 0;
        if (v == OPAL_PROC_MY_NAME.vpid) {
            continue;
        }
        who.vpid = v;
        OPAL_MODEX_RECV(rc, &mca_btl_ivcom_component.super.btl_version, &who, (void **) &data,
                        &len);
        if (OPAL_SUCCESS == rc && NULL != data) {
            (void) ivcom_node_admit(node, data, len);
        }
        free(data);
    }
}

/* The card `proc` published: *card is malloc'ed (the caller owns it).
 * Fails when the peer published none (it runs without ivcom). */
int mca_btl_ivcom_card_fetch(opal_proc_t *proc, uint8_t **card, size_t *len)
{
    int rc;
    uint8_t *data = NULL;
    size_t size = 0;
    OPAL_MODEX_RECV(rc, &mca_btl_ivcom_component.super.btl_version, &proc->proc_name,
                    (void **) &data, &size);
    if (OPAL_SUCCESS != rc || NULL == data) {
        return OPAL_ERR_NOT_FOUND;
    }
    *card = data;
    *len = size;
    return OPAL_SUCCESS;
}
