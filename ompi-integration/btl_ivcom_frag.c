/*
 * btl/ivcom: send descriptors (the class and the private buffer; the
 * inline helpers are in btl_ivcom_frag.h).
 */
#include "opal_config.h"

#include <stdlib.h>

#include "btl_ivcom_frag.h"

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

bool mca_btl_ivcom_frag_heap(mca_btl_ivcom_frag_t *f, size_t size)
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
