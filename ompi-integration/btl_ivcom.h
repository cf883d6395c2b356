/*
 * btl/ivcom: the Open MPI 4.1 BTL component of ivcom.
 *
 * A thin layer: it translates Open MPI's BTL calls into the ivcom C ABI
 * (btl-ivcom/include/ivcom.h). Every peer is reachable: on a shared ring
 * when co-resident (chosen by the core's probe), over TCP otherwise. Links
 * are opened lazily, on the first message to a peer.
 */
#ifndef MCA_BTL_IVCOM_H
#define MCA_BTL_IVCOM_H

#include "opal_config.h"

#include "opal/class/opal_free_list.h"
#include "opal/class/opal_list.h"
#include "opal/mca/btl/btl.h"
#include "opal/mca/btl/base/base.h"
#include "opal/util/proc.h"

#include "ivcom.h"

BEGIN_C_DECLS

/* A send descriptor. Its payload is either ring space reserved in place
 * (zero copy) or a private buffer copied into the ring or socket at send. */
typedef struct mca_btl_ivcom_frag_t {
    mca_btl_base_descriptor_t base;
    mca_btl_base_segment_t segment;
    struct mca_btl_base_endpoint_t *endpoint;
    uint8_t *heap;          /* private buffer (kept across reuse) */
    size_t heap_size;
    bool in_ring;           /* segment points at the link's reservation */
    mca_btl_base_tag_t tag;
} mca_btl_ivcom_frag_t;
OBJ_CLASS_DECLARATION(mca_btl_ivcom_frag_t);

/* One peer. */
struct mca_btl_base_endpoint_t {
    opal_list_item_t super;
    opal_proc_t *proc;
    uint8_t *card;          /* the peer's locality card (from the modex) */
    size_t card_len;
    ivcom_link *link;       /* NULL until first use */
    bool ring;              /* link is on the shared ring (fixed once attached) */
    size_t max_send;        /* largest descriptor this link takes in one piece:
                             * btl_max_send_size, or less on a ring whose
                             * records were shrunk to fit the backend */
    bool failed;            /* link broken or could not be opened */
    bool closed;            /* peer closed cleanly (finalize) */
    mca_btl_ivcom_frag_t *reserved; /* frag holding the ring reservation */
    opal_list_t pending;    /* frags waiting for ring space, in order */
};
typedef struct mca_btl_base_endpoint_t mca_btl_base_endpoint_t;
OBJ_CLASS_DECLARATION(mca_btl_base_endpoint_t);

typedef struct mca_btl_ivcom_component_t {
    mca_btl_base_component_3_0_0_t super;

    /* MCA parameters */
    char *backend;
    char *host_dir;
    unsigned long ring_size;
    unsigned long max_record;
    char *if_include;
    char *if_exclude;
    int verbose;
    int connect_timeout;

    /* state */
    ivcom_node *node;
    opal_free_list_t frags;
    mca_btl_base_endpoint_t **eps;   /* endpoints of this process */
    int neps, cap_eps;
    ivcom_link **orphans;            /* links from peers not added yet */
    int norphans, cap_orphans;
    bool in_progress;
    unsigned progress_calls;
    int neps_linked;                 /* endpoints with a link */
    bool warned_degraded;
    mca_btl_base_module_error_cb_fn_t error_cb;
} mca_btl_ivcom_component_t;

typedef struct mca_btl_ivcom_module_t {
    mca_btl_base_module_t super;
} mca_btl_ivcom_module_t;

OPAL_MODULE_DECLSPEC extern mca_btl_ivcom_component_t mca_btl_ivcom_component;
extern mca_btl_ivcom_module_t mca_btl_ivcom_module;

/* btl_ivcom_module.c */
int mca_btl_ivcom_progress(void);
void mca_btl_ivcom_close_all(void);
void mca_btl_ivcom_help(const char *topic, const char *fallback, ...);

#define IVCOM_VERBOSE(level, ...)                                   \
    do {                                                            \
        if (mca_btl_ivcom_component.verbose >= (level)) {           \
            opal_output(0, __VA_ARGS__);                            \
        }                                                           \
    } while (0)

END_C_DECLS

#endif
