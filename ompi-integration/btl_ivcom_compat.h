/*
 * btl/ivcom: what differs between the Open MPI series this component is
 * built for, in one place. The series is the one whose headers the build
 * found (OPAL_MAJOR_VERSION of its opal_config.h):
 *
 *                      Open MPI 4.1 (BTL 3.1.0)       Open MPI 5.0 (BTL 3.3.0)
 *   modex header       opal/mca/pmix/pmix.h           opal/mca/pmix/pmix-internal.h
 *   modex scope        OPAL_PMIX_GLOBAL               PMIX_GLOBAL
 *   job size key       OPAL_PMIX_JOB_SIZE (UINT32)    PMIX_JOB_SIZE (PMIX_UINT32)
 *   mutexes            opal/threads/mutex.h           opal/mca/threads/mutex.h
 *   receive callback   (btl, tag, descriptor, cbdata) (btl, const receive descriptor *)
 *                                                     which also names the endpoint
 *
 * Everything else this component uses (module and component structs,
 * designated initializers, free lists, convertor, show_help) is written the
 * same way for both; the module struct's layout differs (btl_ft_event is
 * gone in 5.0, CUDA fields became accelerator fields) and is taken from the
 * headers of the build.
 */
#ifndef MCA_BTL_IVCOM_COMPAT_H
#define MCA_BTL_IVCOM_COMPAT_H

#include "opal_config.h"

#include "opal/mca/btl/btl.h"

#if OPAL_MAJOR_VERSION >= 5
#    define IVCOM_OMPI5 1
#else
#    define IVCOM_OMPI5 0
#endif

#if OPAL_MAJOR_VERSION < 4 || (OPAL_MAJOR_VERSION == 4 && OPAL_MINOR_VERSION < 1) \
    || OPAL_MAJOR_VERSION > 5
#    error "btl/ivcom builds against Open MPI 4.1 or 5.0 only"
#endif

/* The Open MPI release this build is for ("4.1.4"): the loader and the
 * implementation of one build must agree on it. */
#define IVCOM_STR2(x) #x
#define IVCOM_STR(x) IVCOM_STR2(x)
#define IVCOM_BUILT_FOR \
    IVCOM_STR(OPAL_MAJOR_VERSION) "." IVCOM_STR(OPAL_MINOR_VERSION) "." IVCOM_STR(OPAL_RELEASE_VERSION)

/* Modex: the header that defines OPAL_MODEX_SEND/RECV, and the scope of
 * the locality card (every process of the job may read it). */
#if IVCOM_OMPI5
#    define IVCOM_MODEX_HEADER "opal/mca/pmix/pmix-internal.h"
#    define IVCOM_MODEX_GLOBAL PMIX_GLOBAL
#else
#    define IVCOM_MODEX_HEADER "opal/mca/pmix/pmix.h"
#    define IVCOM_MODEX_GLOBAL OPAL_PMIX_GLOBAL
#endif

/* The number of processes in this job (a job-level PMIx value). */
#if IVCOM_OMPI5
#    define IVCOM_KEY_JOB_SIZE PMIX_JOB_SIZE
#    define IVCOM_TYPE_UINT32 PMIX_UINT32
#else
#    define IVCOM_KEY_JOB_SIZE OPAL_PMIX_JOB_SIZE
#    define IVCOM_TYPE_UINT32 OPAL_UINT32
#endif

/* Mutexes (OPAL_THREAD_LOCK and friends). */
#if IVCOM_OMPI5
#    define IVCOM_MUTEX_HEADER "opal/mca/threads/mutex.h"
#else
#    define IVCOM_MUTEX_HEADER "opal/threads/mutex.h"
#endif

/* Receive: the descriptor handed to the upper layer's callback for one
 * message (one or two segments), and the call itself. */
#if IVCOM_OMPI5
typedef mca_btl_base_receive_descriptor_t ivcom_recv_desc_t;

static inline void ivcom_upcall(mca_btl_base_module_t *btl,
                                const mca_btl_active_message_callback_t *reg,
                                ivcom_recv_desc_t *des, struct mca_btl_base_endpoint_t *ep,
                                mca_btl_base_tag_t tag)
{
    des->endpoint = ep;
    des->tag = tag;
    des->cbdata = reg->cbdata;
    reg->cbfunc(btl, des);
}
#else
typedef mca_btl_base_descriptor_t ivcom_recv_desc_t;

static inline void ivcom_upcall(mca_btl_base_module_t *btl,
                                const mca_btl_active_message_callback_t *reg,
                                ivcom_recv_desc_t *des, struct mca_btl_base_endpoint_t *ep,
                                mca_btl_base_tag_t tag)
{
    (void) ep; /* 4.1's descriptor does not name the sender */
    reg->cbfunc(btl, tag, des, reg->cbdata);
}
#endif

/* Both descriptors name their segments the same way. */
#define IVCOM_RECV_DESC_INIT(seg) {.des_segments = (seg), .des_segment_count = 1}

#endif
