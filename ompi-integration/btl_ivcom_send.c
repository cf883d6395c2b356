/*
 * btl/ivcom: send paths, fastest first:
 *   sendi        header + payload packed straight into a ring record;
 *   alloc/prepare_src
 *                the descriptor's payload *is* ring (or receive queue)
 *                space when the link is a ring or a queue and has no other
 *                reservation outstanding (zero copy: one copy in, one copy
 *                out); otherwise a private buffer, copied into the ring,
 *                queue or socket by send;
 *   send         commits the reservation, or copies the private buffer; if
 *                the ring is full the descriptor waits in the endpoint's
 *                pending list and progress sends it (completion callback).
 * To this process itself (the self endpoint) a message is delivered in
 * place, at once.
 *
 * Order: a message that cannot go now is queued here, behind any other,
 * never handed back to ob1 to retry (sendi answers busy with a descriptor,
 * alloc never fails for want of room, prepare_src declines only further
 * pieces of a message): messages leave in the order ob1 numbered them.
 *
 * Threads: every path holds the endpoint's lock while it touches the link
 * and the endpoint's state, and drops it before anything that may call
 * back into the upper layer (completion callbacks, failure reports,
 * self delivery). A reservation (ep->reserved) belongs to one descriptor
 * until it is sent or freed; meanwhile other sends to the peer queue behind
 * it, so the order of each thread's messages to a peer is kept.
 */
#include "opal_config.h"

#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#include <x86intrin.h>
#endif

#include "opal/datatype/opal_convertor.h"

#include "btl_ivcom.h"
#include "btl_ivcom_frag.h"

#define MODULE (&mca_btl_ivcom_module.super)
#define LOCK(ep) OPAL_THREAD_LOCK(&(ep)->lock)
#define UNLOCK(ep) OPAL_THREAD_UNLOCK(&(ep)->lock)

/* Sends a private frag's message, or what is left of it: one record (or
 * TCP frame) when it fits the pair's records, else a run of records of at
 * most a piece each, resumed from f->sent while the frag waits at the head
 * of the pending list (nothing else goes to the peer before the run ends:
 * every send queues behind a non-empty pending list). */
static int try_send_frag(mca_btl_base_endpoint_t *ep, mca_btl_ivcom_frag_t *f)
{
    size_t len = (size_t) f->segment.seg_len;
    if (OPAL_LIKELY(len <= ep->max_send && 0 == f->sent)) {
        ivcom_iov iov = {.base = f->segment.seg_addr.pval, .len = len};
        return ivcom_link_try_send(ep->link, f->tag, &iov, 1);
    }
    return ivcom_link_try_send_more(ep->link, f->tag, f->segment.seg_addr.pval, len, &f->sent);
}

/* Sends queued frags in order while the ring has room; called with the
 * endpoint's lock held. Sent frags go to `done` (for
 * mca_btl_ivcom_complete once the lock is dropped); a link failure is left
 * in *failed. */
void mca_btl_ivcom_drain_pending(mca_btl_base_endpoint_t *ep, opal_list_t *done, int *failed)
{
    while (!opal_list_is_empty(&ep->pending) && NULL == ep->reserved && !ep->failed) {
        mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) opal_list_get_first(&ep->pending);
        int rc = try_send_frag(ep, f);
        if (0 == rc) {
            return;
        }
        opal_list_remove_first(&ep->pending);
        mca_btl_ivcom_pending_changed(ep);
        if (rc < 0) {
            *failed = rc;
            return;
        }
        opal_list_append(done, &f->base.super.super);
    }
}

/* Reports what a path left: a failure (without the lock). */
static int report(mca_btl_base_endpoint_t *ep, int failed, int rc)
{
    if (OPAL_UNLIKELY(0 != failed)) {
        mca_btl_ivcom_endpoint_failed(ep, failed);
    }
    return rc;
}

/* Counts a send handed back to the upper layer to retry (the stats line's
 * `parked`); any thread. */
static inline void count_parked(mca_btl_base_endpoint_t *ep)
{
    __atomic_fetch_add(&ep->parked, 1, __ATOMIC_RELAXED);
}

/* alloc's work (without counting a failure): a descriptor of `size`
 * bytes, ring space when it can be, else a private buffer; NULL when
 * larger than btl_max_send_size or memory ran out. */
static mca_btl_base_descriptor_t *alloc_frag(mca_btl_base_endpoint_t *ep, size_t size,
                                             uint32_t flags)
{
    mca_btl_ivcom_frag_t *f;
    int failed = 0;
    bool ready, placed = false;
    /* ob1 allocates at most btl_eager_limit bytes, the smallest record a
     * ring may shrink to; Open MPI 5's active-message RDMA up to
     * btl_max_send_size. */
    if (size > MODULE->btl_max_send_size) {
        return NULL;
    }
    f = mca_btl_ivcom_frag_get(ep);
    if (NULL == f) {
        return NULL;
    }
    LOCK(ep);
    ready = OPAL_SUCCESS == mca_btl_ivcom_endpoint_ready(ep, &failed);
    /* A message larger than this pair's records (rings shrunk to fit the
     * backend: Open MPI 5's active-message RDMA allocates
     * btl_max_send_size) goes from a private buffer as a run of records
     * (try_send_frag). */
    if (ready && !mca_btl_ivcom_caller_keeps(flags)) {
        placed = mca_btl_ivcom_frag_ring(ep, f, size);
    }
    UNLOCK(ep);
    (void) report(ep, failed, 0);
    if (!placed && !mca_btl_ivcom_frag_heap(f, size)) {
        mca_btl_ivcom_frag_return(f);
        return NULL;
    }
    f->segment.seg_len = size;
    f->base.des_flags = flags;
    return &f->base;
}

mca_btl_base_descriptor_t *mca_btl_ivcom_alloc(struct mca_btl_base_module_t *btl,
                                               struct mca_btl_base_endpoint_t *ep, uint8_t order,
                                               size_t size, uint32_t flags)
{
    mca_btl_base_descriptor_t *d = alloc_frag(ep, size, flags);
    (void) btl;
    (void) order;
    if (OPAL_UNLIKELY(NULL == d && size <= MODULE->btl_max_send_size)) {
        count_parked(ep);
    }
    return d;
}

int mca_btl_ivcom_free(struct mca_btl_base_module_t *btl, mca_btl_base_descriptor_t *des)
{
    mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) des;
    (void) btl;
    if (f->in_ring) {
        mca_btl_base_endpoint_t *ep = f->endpoint;
        LOCK(ep);
        ivcom_link_cancel(ep->link);
        ep->reserved = NULL;
        f->in_ring = false;
        UNLOCK(ep);
    }
    mca_btl_ivcom_frag_return(f);
    return OPAL_SUCCESS;
}

/* A large piece goes out smaller while the receiver keeps up (less than
 * `limit` bytes of what this side sent not yet taken), so that it copies
 * one piece out while this side copies the next in: a message that would
 * go as one piece arrives after about one copy and a piece instead of two
 * copies in a row. A receiver that falls behind (a stream) gets whole
 * pieces, which cost less each. ob1 sends the rest of the message in
 * further pieces. Rings only: on a queue (records of half the queue at
 * most) it was tried and not kept (docs/PERFORMANCE.md, "Queues written
 * in place"). Called with the endpoint's lock held. */
static size_t cut_piece(mca_btl_base_endpoint_t *ep, size_t reserve, size_t max, size_t limit,
                        int *failed)
{
    size_t piece = mca_btl_ivcom_component.piece_size;
    uint64_t backlog;
    int rc;
    if (0 == piece || !ep->ring || NULL == ep->link || ep->failed || reserve + max <= piece
        || reserve >= piece) {
        return max;
    }
    rc = ivcom_link_backlog(ep->link, &backlog);
    if (OPAL_UNLIKELY(rc < 0)) {
        *failed = rc;
        return max;
    }
    return 1 == rc && backlog < limit ? piece - reserve : max;
}

/* Copies around the caches (btl_ivcom_nt_copy).
 *
 * A large piece of a message goes into ring (or queue) lines that the
 * receiver claimed when it released them (ring.rs, Consumer::release):
 * they are modified in the receiver's cache. Where the two CPUs share a
 * cache, a copy through the caches is the fastest there is: the lines
 * move within the shared cache, and the receiver reads them from there.
 * Where they do not (another core complex of an AMD EPYC, another
 * socket), each line crosses between the complexes twice, once to this
 * CPU for its copy and once back for the receiver's, and a stream in
 * both directions shares those crossings. A copy around the caches
 * (non-temporal stores of whole lines) sends each line once, to memory,
 * where the receiver reads it. Between two pinned ranks on an AMD EPYC
 * at 1 MiB, far apart (docs/PERFORMANCE.md, "Copies around the caches"):
 * osu_latency 0.73-0.86x the time in four rounds; osu_bibw 1.35x and
 * osu_bw 1.2x as fast in two, 1.02-1.12x and 0.82-0.89x in the other two
 * (a noisier host). In one core complex about half as fast and 1.7-1.9x
 * the time. So by default (2) each peer's pieces go the way the probes
 * below find its CPU; 1 always around, 0 always through.
 * Pieces of at least IVCOM_NT_MIN bytes of contiguous data, copied into
 * the link's own memory; others are packed as before. */
#define IVCOM_NT_MIN 4096

#if defined(__x86_64__)
/* Copies n bytes to dst with non-temporal stores of whole 64-byte lines
 * (the ends that do not fill a line with plain stores), then fences them:
 * the record's header, published after this, is ordered after the data. */
static void copy_around_caches(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t head = (64 - ((uintptr_t) dst & 63)) & 63;
    if (head > n) {
        head = n;
    }
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; n >= 64; n -= 64, dst += 64, src += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *) src);
        __m128i b = _mm_loadu_si128((const __m128i *) (src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *) (src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *) (src + 48));
        _mm_stream_si128((__m128i *) dst, a);
        _mm_stream_si128((__m128i *) (dst + 16), b);
        _mm_stream_si128((__m128i *) (dst + 32), c);
        _mm_stream_si128((__m128i *) (dst + 48), d);
    }
    memcpy(dst, src, n);
    _mm_sfence();
}

/* Where the peer's CPU is (btl_ivcom_nt_copy 2).
 *
 * The lines a large piece goes into were claimed by the receiver when it
 * released them: they are modified in its CPU's cache (or in the shared
 * cache of its core complex, which took them from it). So the time this
 * CPU takes to read one of them says how far that cache is. Measured
 * here (AMD EPYC, TSC at 2.59 GHz, a read from this CPU's own first-level
 * cache 20 ns with the timing around it): 5-55 ns more within one core
 * complex, 80-180 ns more from another. Before copying one large piece in
 * IVCOM_NT_EVERY, the sender reads the last whole line of its
 * destination (reads of the first line came out near in most far runs:
 * the hardware's prefetcher, running on from the piece before, had most
 * likely fetched it already) and times the read with the TSC. A window
 * of IVCOM_NT_WINDOW such probes decides by majority: where most read at
 * least btl_ivcom_nt_far_ns more than a first-level hit, the next pieces
 * go around the caches, else through them, until the next window. A
 * majority, not the fastest probe: 1-3 % of the reads of far runs still
 * come out near, and one in a window would decide. Probes slower than 2
 * us (a page fault on a ring's first lap, an interrupt, a preemption)
 * count for nothing; so do those before the TSC is calibrated against
 * the monotonic clock, 1 ms after the component opened. The probe
 * measures the placement, not the copy, so either kind of copy leaves
 * it the same thing to read: the two earlier rules, which timed the
 * copies themselves, could not tell a copy around the caches near (its
 * cost left to the receiver) from one far. Where the TSC is trapped (some
 * hypervisors' guests) every probe takes microseconds and counts for
 * nothing: the pieces go through the caches, as with 0. */
#define IVCOM_NT_WINDOW 8
#define IVCOM_NT_EVERY 8
#define IVCOM_NT_NOISE_NS 2000.0

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

void mca_btl_ivcom_nt_open(void)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    c->nt_far_ticks = 0;
    c->nt_noise_ticks = 0;
    c->nt_base_ticks = 0;
    c->nt_ns0 = now_ns();
    c->nt_tsc0 = __rdtsc();
}

/* Times one read of the line at `line` (TSC ticks). */
static inline uint32_t probe_line(const uint8_t *line)
{
    unsigned aux;
    uint64_t t0, t1;
    _mm_lfence();
    t0 = __rdtsc();
    _mm_lfence();
    (void) *(const volatile uint64_t *) line;
    t1 = __rdtscp(&aux);
    _mm_lfence();
    return t1 - t0 > UINT32_MAX ? UINT32_MAX : (uint32_t) (t1 - t0);
}

/* The far threshold in TSC ticks, calibrated once 1 ms has passed since
 * the component opened (and with it the noise bound); 0 until then (the
 * pieces then go through the caches). */
static uint64_t far_ticks(void)
{
    mca_btl_ivcom_component_t *c = &mca_btl_ivcom_component;
    uint64_t t = __atomic_load_n(&c->nt_far_ticks, __ATOMIC_ACQUIRE);
    uint64_t ns, tsc;
    double per_ns;
    if (OPAL_LIKELY(0 != t)) {
        return t;
    }
    ns = now_ns();
    tsc = __rdtsc();
    if (ns - c->nt_ns0 < 1000000ull || tsc <= c->nt_tsc0) {
        return 0;
    }
    per_ns = (double) (tsc - c->nt_tsc0) / (double) (ns - c->nt_ns0);
    t = (uint64_t) ((double) c->nt_far_ns * per_ns);
    __atomic_store_n(&c->nt_noise_ticks, (uint64_t) (IVCOM_NT_NOISE_NS * per_ns),
                     __ATOMIC_RELAXED);
    {
        /* The probe's own cost: the fastest of 16 reads of a line in this
         * CPU's first-level cache. */
        uint64_t here = 0;
        uint32_t base = UINT32_MAX;
        for (int i = 0; i < 16; i++) {
            uint32_t b = probe_line((const uint8_t *) &here);
            if (b < base) {
                base = b;
            }
        }
        __atomic_store_n(&c->nt_base_ticks, base, __ATOMIC_RELAXED);
    }
    if (0 == t) {
        t = 1;
    }
    __atomic_store_n(&c->nt_far_ticks, t, __ATOMIC_RELEASE);
    return t;
}

/* Probes the destination of one piece in IVCOM_NT_EVERY (at dst, n bytes,
 * at least IVCOM_NT_MIN) and returns whether the peer's CPU reads far. */
static bool peer_far(mca_btl_base_endpoint_t *ep, const uint8_t *dst, size_t n)
{
    const uint8_t *line;
    uint32_t t, probes, slow;
    uint64_t far;
    if (0 != (__atomic_add_fetch(&ep->nt_pieces, 1, __ATOMIC_RELAXED) & (IVCOM_NT_EVERY - 1))) {
        return 0 != __atomic_load_n(&ep->nt_far, __ATOMIC_RELAXED);
    }
    far = far_ticks();
    if (0 == far) {
        /* not calibrated yet: no probe can be read */
        return 0 != __atomic_load_n(&ep->nt_far, __ATOMIC_RELAXED);
    }
    line = (const uint8_t *) ((((uintptr_t) dst + n) & ~(uintptr_t) 63) - 64);
    t = probe_line(line);
    if (t >= __atomic_load_n(&mca_btl_ivcom_component.nt_noise_ticks, __ATOMIC_RELAXED)) {
        /* a page fault, an interrupt, a preemption: no CPU is that far */
        return 0 != __atomic_load_n(&ep->nt_far, __ATOMIC_RELAXED);
    }
    probes = __atomic_load_n(&ep->nt_probes, __ATOMIC_RELAXED) + 1;
    slow = __atomic_load_n(&ep->nt_slow, __ATOMIC_RELAXED);
    if (t >= far + __atomic_load_n(&mca_btl_ivcom_component.nt_base_ticks, __ATOMIC_RELAXED)) {
        slow++;
    }
    if (probes < IVCOM_NT_WINDOW) {
        __atomic_store_n(&ep->nt_slow, slow, __ATOMIC_RELAXED);
        __atomic_store_n(&ep->nt_probes, probes, __ATOMIC_RELAXED);
    } else {
        int32_t verdict = 2 * slow > probes;
        __atomic_store_n(&ep->nt_far, verdict, __ATOMIC_RELAXED);
        __atomic_add_fetch(verdict ? &ep->nt_windows_far : &ep->nt_windows_near, 1,
                           __ATOMIC_RELAXED);
        __atomic_store_n(&ep->nt_slow, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ep->nt_probes, 0, __ATOMIC_RELAXED);
    }
    return 0 != __atomic_load_n(&ep->nt_far, __ATOMIC_RELAXED);
}

/* Packs up to `len` bytes of contiguous data (no more than the convertor
 * has left, as opal_convertor_pack would) into the link's memory at dst,
 * around the caches; returns how many. */
static size_t copy_piece_around(mca_btl_base_endpoint_t *ep, struct opal_convertor_t *conv,
                                uint8_t *dst, size_t len)
{
    void *src = NULL;
    size_t pos;
    if (len > conv->local_size - conv->bConverted) {
        len = conv->local_size - conv->bConverted;
    }
    if (0 == len) {
        return 0;
    }
    pos = conv->bConverted + len;
    opal_convertor_get_current_pointer(conv, &src);
    copy_around_caches(dst, (const uint8_t *) src, len);
    opal_convertor_set_position(conv, &pos);
    __atomic_add_fetch(&ep->pieces_nt, 1, __ATOMIC_RELAXED);
    return len;
}
#else
void mca_btl_ivcom_nt_open(void)
{
    /* pieces always go through the caches: nothing to calibrate */
}
#endif

mca_btl_base_descriptor_t *mca_btl_ivcom_prepare_src(struct mca_btl_base_module_t *btl,
                                                     struct mca_btl_base_endpoint_t *ep,
                                                     struct opal_convertor_t *conv, uint8_t order,
                                                     size_t reserve, size_t *size, uint32_t flags)
{
    mca_btl_ivcom_frag_t *f;
    struct iovec iov;
    uint32_t iov_count = 1;
    size_t max = *size;
    size_t limit = MODULE->btl_max_send_size;
    bool keep, ready, placed = false, in_place = false, too_big = false;
    int failed = 0;
    (void) btl;
    (void) order;
    f = mca_btl_ivcom_frag_get(ep);
    if (NULL == f) {
        count_parked(ep);
        return NULL;
    }
    keep = mca_btl_ivcom_caller_keeps(flags);
    LOCK(ep);
    /* A ring with shrunk records takes smaller pieces: ob1 sends the rest
     * in further fragments. */
    ready = OPAL_SUCCESS == mca_btl_ivcom_endpoint_ready(ep, &failed);
    if (ready) {
        limit = ep->max_send;
        /* So does a ring that wraps within a small share of the ring
         * budget (a process with many peers): two pieces fit in it, and
         * the ring's pages stay within the share (btl_ivcom_ring_budget). */
        if (ep->ring && NULL != ep->link) {
            size_t piece = ivcom_link_piece(ep->link);
            if (piece < limit) {
                limit = piece;
            }
        }
        /* Never below the eager limit: ob1 sends an eager message whole
         * (its match header and all of its data in one descriptor). On
         * rings shrunk below it (a crowded grant pool) such a descriptor
         * is a private buffer that goes as a run of records. */
        if (limit < MODULE->btl_eager_limit) {
            limit = MODULE->btl_eager_limit;
        }
    }
    if (reserve < limit) {
        if (reserve + max > limit) {
            max = limit - reserve;
        }
        if (ready) {
            max = cut_piece(ep, reserve, max, limit, &failed);
            too_big = reserve + max > ep->max_send;
        }
        if (!keep) {
            placed = mca_btl_ivcom_frag_ring(ep, f, reserve + max);
        }
    }
    in_place = mca_btl_ivcom_in_place(ep);
    UNLOCK(ep);
    (void) report(ep, failed, 0);
    if (reserve >= limit) {
        mca_btl_ivcom_frag_return(f);
        return NULL;
    }
    if (!placed) {
        /* On a ring or queue link with no room now, decline a further
         * piece of a message: ob1 keeps the request pending and retries
         * from its progress, instead of this BTL packing into a private
         * buffer that waits in a queue (an extra copy and unbounded memory
         * while a fast sender outruns the receiver). The first piece of a
         * message (ob1 flags it MCA_BTL_DES_FLAGS_PRIORITY: its rendezvous
         * header carries the message's sequence number) is never declined:
         * ob1 would start it after messages that came after it
         * (busy_with_descriptor says why that is avoided). TCP links, the
         * self endpoint, descriptors the caller keeps and descriptors
         * larger than the pair's records (bounded by ob1's pipeline depth)
         * always pack into a private buffer. */
        if (in_place && !keep && !too_big && !(flags & MCA_BTL_DES_FLAGS_PRIORITY)) {
            mca_btl_ivcom_frag_return(f);
            return NULL;
        }
        if (!mca_btl_ivcom_frag_heap(f, reserve + max)) {
            mca_btl_ivcom_frag_return(f);
            count_parked(ep);
            return NULL;
        }
    }
    /* Into the reservation this descriptor holds (or its own buffer): no
     * other thread touches either, so this runs without the lock. */
    iov.iov_base = (uint8_t *) f->segment.seg_addr.pval + reserve;
    iov.iov_len = max;
#if defined(__x86_64__)
    if (placed && max >= IVCOM_NT_MIN && 0 != mca_btl_ivcom_component.nt_copy
        && !opal_convertor_need_buffers(conv)
        && (1 == mca_btl_ivcom_component.nt_copy || peer_far(ep, (uint8_t *) iov.iov_base, max))) {
        max = copy_piece_around(ep, conv, (uint8_t *) iov.iov_base, max);
    } else
#endif
        if (opal_convertor_pack(conv, &iov, &iov_count, &max) < 0) {
        mca_btl_ivcom_free(btl, &f->base);
        return NULL;
    }
    *size = max;
    f->segment.seg_len = reserve + max;
    f->base.des_flags = flags;
    return &f->base;
}

int mca_btl_ivcom_send(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                       struct mca_btl_base_descriptor_t *des, mca_btl_base_tag_t tag)
{
    mca_btl_ivcom_frag_t *f = (mca_btl_ivcom_frag_t *) des;
    opal_list_t done;
    int rc, failed = 0, out;
    (void) btl;
    f->tag = tag;
    f->endpoint = ep;
    /* Every send starts at the message's beginning (a descriptor the
     * caller keeps comes back here to be sent again); only the pending
     * list resumes a run. */
    f->sent = 0;
    if (OPAL_UNLIKELY(ep->failed)) {
        return OPAL_ERR_UNREACH;
    }
    if (ep->self) {
        mca_btl_ivcom_deliver_private(ep, tag, f->segment.seg_addr.pval,
                                      (size_t) f->segment.seg_len);
        mca_btl_ivcom_frag_done(f, false);
        return 1;
    }
    OBJ_CONSTRUCT(&done, opal_list_t);
    LOCK(ep);
    if (f->in_ring) {
        rc = ivcom_link_commit(ep->link, (size_t) f->segment.seg_len, tag);
        f->in_ring = false;
        ep->reserved = NULL;
        if (IVCOM_OK != rc) {
            failed = rc;
            out = OPAL_ERROR;
        } else {
            mca_btl_ivcom_drain_pending(ep, &done, &failed);
            out = 1;
        }
    } else if (OPAL_SUCCESS != mca_btl_ivcom_endpoint_ready(ep, &failed)) {
        out = OPAL_ERR_UNREACH;
    } else {
        rc = 0;
        if (opal_list_is_empty(&ep->pending) && NULL == ep->reserved) {
            rc = try_send_frag(ep, f);
        }
        if (1 == rc) {
            out = 1;
        } else if (rc < 0) {
            failed = rc;
            out = OPAL_ERROR;
        } else {
            /* Ring full (or ordered behind others): progress sends it. */
            f->base.des_flags |= MCA_BTL_DES_SEND_ALWAYS_CALLBACK;
            ep->queued++;
            opal_list_append(&ep->pending, &f->base.super.super);
            mca_btl_ivcom_pending_changed(ep);
            out = OPAL_SUCCESS;
        }
    }
    UNLOCK(ep);
    mca_btl_ivcom_complete(&done);
    OBJ_DESTRUCT(&done);
    if (1 == out) {
        mca_btl_ivcom_frag_done(f, false);
    }
    return report(ep, failed, out);
}

/* Where the next `payload_size` bytes of `conv` lie when they lie in one
 * piece of the caller's memory (a contiguous datatype, same architecture),
 * else NULL: they must be packed. */
static inline const void *contiguous_payload(struct opal_convertor_t *conv, size_t payload_size)
{
    void *src = NULL;
    if (0 == payload_size || opal_convertor_need_buffers(conv)) {
        return NULL;
    }
    opal_convertor_get_current_pointer(conv, &src);
    return src;
}

/* What sendi sends, into dst (room for header_size + payload_size): ob1's
 * header, then the payload from conv (copied straight from the caller's
 * memory when it is contiguous, else packed). Sets *total to the bytes
 * written; false when packing failed. A sendi that succeeds leaves the
 * convertor wherever this left it (past a packed payload, at a contiguous
 * one): ob1 completes the request then and never reads the convertor's
 * position again, and Open MPI's own shared-memory BTL leaves it unmoved
 * on its fast path too. */
static bool sendi_pack(uint8_t *dst, const void *header, size_t header_size,
                       struct opal_convertor_t *conv, size_t payload_size, size_t *total)
{
    const void *src = contiguous_payload(conv, payload_size);
    memcpy(dst, header, header_size);
    *total = header_size;
    if (NULL != src) {
        memcpy(dst + header_size, src, payload_size);
        *total += payload_size;
    } else if (payload_size) {
        struct iovec iov = {.iov_base = dst + header_size, .iov_len = payload_size};
        uint32_t n = 1;
        size_t max = payload_size;
        if (opal_convertor_pack(conv, &iov, &n, &max) < 0) {
            return false;
        }
        *total += max;
    }
    return true;
}

/* sendi to this process: header and payload gathered into a private
 * buffer and delivered at once. */
static int sendi_self(mca_btl_base_endpoint_t *ep, struct opal_convertor_t *conv, void *header,
                      size_t header_size, size_t payload_size, mca_btl_base_tag_t tag)
{
    size_t total = header_size + payload_size;
    mca_btl_ivcom_frag_t *f = mca_btl_ivcom_frag_get(ep);
    if (NULL == f || !mca_btl_ivcom_frag_heap(f, total)) {
        if (f) mca_btl_ivcom_frag_return(f);
        return OPAL_ERR_RESOURCE_BUSY;
    }
    if (!sendi_pack(f->heap, header, header_size, conv, payload_size, &total)) {
        mca_btl_ivcom_frag_return(f);
        return OPAL_ERROR;
    }
    mca_btl_ivcom_deliver_private(ep, tag, f->heap, total);
    mca_btl_ivcom_frag_return(f);
    return OPAL_SUCCESS;
}

/* A sendi that cannot send now hands ob1 a descriptor to send instead (a
 * private buffer, sent as a run of records when larger than them, queued
 * on the pending list while there is no room), whenever ob1 asks for one.
 * Refused without one, ob1 would park the request and retry it later,
 * after requests that started after it: their messages would reach the
 * peer out of their sequence, and the peer's ob1 would have to hold them
 * back. Open MPI 4.1's ob1 was seen to lose track of such held-back
 * messages where the 16-bit sequence numbers wrap around (osu_bw over a
 * 64 KiB queue hung in about one run in 20 to 120: every message had
 * arrived, the receiver waited for one it held; docs/design.md, "Sends
 * keep their order"). Queued here, every message starts in the order ob1
 * numbered it. Called without the endpoint's lock. */
static __attribute__((noinline)) int busy_with_descriptor(struct mca_btl_base_module_t *btl,
                                struct mca_btl_base_endpoint_t *ep, uint8_t order, size_t total,
                                uint32_t flags, mca_btl_base_descriptor_t **descriptor)
{
    (void) btl;
    (void) order;
    if (NULL != descriptor) {
        *descriptor = alloc_frag(ep, total, flags);
    }
    return OPAL_ERR_RESOURCE_BUSY;
}

/* What sendi returns for a link's answer `rc` to a message of `total`
 * bytes (ivcom_link_try_send2, ivcom_link_reserve, ivcom_link_can_send):
 * 1, sent (or room for it); negative, the link failed (reported); 0, no
 * room: busy, with a descriptor for ob1 (busy_with_descriptor). Called
 * without the lock; the convertor stays where it is, as sendi_pack says. */
static inline int sendi_sent(struct mca_btl_base_module_t *btl, mca_btl_base_endpoint_t *ep,
                             int rc, uint8_t order, size_t total, uint32_t flags,
                             mca_btl_base_descriptor_t **descriptor)
{
    if (OPAL_LIKELY(1 == rc)) {
        return OPAL_SUCCESS;
    }
    return rc < 0 ? report(ep, rc, OPAL_ERROR)
                  : busy_with_descriptor(btl, ep, order, total, flags, descriptor);
}

/* What sendi returns, `rc`, counted when it hands the send back to ob1 to
 * retry later: busy, though ob1 asked for a descriptor, and none given
 * (memory ran out). */
static inline int sendi_counted(mca_btl_base_endpoint_t *ep, int rc,
                                mca_btl_base_descriptor_t **descriptor)
{
    if (OPAL_UNLIKELY(OPAL_ERR_RESOURCE_BUSY == rc && NULL != descriptor && NULL == *descriptor)) {
        count_parked(ep);
    }
    return rc;
}

/* sendi in general: any endpoint, link and payload, with or without
 * threads (mca_btl_ivcom_sendi takes the commonest case first). */
static __attribute__((noinline)) int
sendi_general(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
              struct opal_convertor_t *conv, void *header, size_t header_size,
              size_t payload_size, uint8_t order, uint32_t flags, mca_btl_base_tag_t tag,
              mca_btl_base_descriptor_t **descriptor)
{
    size_t total = header_size + payload_size;
    uint8_t *dst = NULL;
    const void *src;
    int rc, failed = 0, out = OPAL_SUCCESS;
    if (NULL != descriptor) {
        *descriptor = NULL;
    }
    if (OPAL_UNLIKELY(ep->self)) {
        return sendi_self(ep, conv, header, header_size, payload_size, tag);
    }
    LOCK(ep);
    if (OPAL_UNLIKELY(OPAL_SUCCESS != mca_btl_ivcom_endpoint_ready(ep, &failed))) {
        UNLOCK(ep);
        return report(ep, failed, OPAL_ERR_UNREACH);
    }
    if (OPAL_UNLIKELY(total > ep->max_send)) {
        /* Larger than this pair's records (a ring shrunk below the eager
         * limit, a queue's records). */
        UNLOCK(ep);
        return busy_with_descriptor(btl, ep, order, total, flags, descriptor);
    }
    if (NULL != ep->reserved || !opal_list_is_empty(&ep->pending)) {
        /* Behind them, in order. */
        UNLOCK(ep);
        return busy_with_descriptor(btl, ep, order, total, flags, descriptor);
    }
    /* A contiguous payload, or none (ob1's small messages): header and
     * payload copied straight from the caller into the ring record (on TCP,
     * into the link's send queue) in one call. */
    src = contiguous_payload(conv, payload_size);
    if (NULL != src || 0 == payload_size) {
        rc = ivcom_link_try_send2(ep->link, tag, header, header_size, src, payload_size);
        UNLOCK(ep);
        return sendi_sent(btl, ep, rc, order, total, flags, descriptor);
    }
    if (mca_btl_ivcom_in_place(ep)) {
        rc = ivcom_link_reserve(ep->link, total, &dst);
        if (1 != rc) {
            UNLOCK(ep);
            return sendi_sent(btl, ep, rc, order, total, flags, descriptor);
        }
        if (!sendi_pack(dst, header, header_size, conv, payload_size, &total)) {
            ivcom_link_cancel(ep->link);
            UNLOCK(ep);
            return OPAL_ERROR;
        }
        rc = ivcom_link_commit(ep->link, total, tag);
        if (IVCOM_OK != rc) {
            failed = rc;
            out = OPAL_ERROR;
        }
        UNLOCK(ep);
        return report(ep, failed, out);
    }
    /* TCP, a payload to pack: gather into a scratch frag; the link takes
     * it if it has room now: asked first, so that data is packed only when
     * it will be sent. Without room, a descriptor for ob1. */
    rc = ivcom_link_can_send(ep->link, total);
    if (1 != rc) {
        UNLOCK(ep);
        return sendi_sent(btl, ep, rc, order, total, flags, descriptor);
    }
    mca_btl_ivcom_frag_t *f = mca_btl_ivcom_frag_get(ep);
    if (NULL == f || !mca_btl_ivcom_frag_heap(f, total)) {
        UNLOCK(ep);
        if (f) mca_btl_ivcom_frag_return(f);
        return OPAL_ERR_RESOURCE_BUSY;
    }
    if (!sendi_pack(f->heap, header, header_size, conv, payload_size, &total)) {
        UNLOCK(ep);
        mca_btl_ivcom_frag_return(f);
        return OPAL_ERROR;
    }
    ivcom_iov v = {.base = f->heap, .len = total};
    rc = ivcom_link_try_send(ep->link, tag, &v, 1);
    if (0 == rc) {
        /* Room was checked above, under the same lock; should the link
         * refuse all the same, the frag waits at the end of the pending
         * list, this BTL's to send and free (no callback: the send is
         * complete for ob1). */
        f->tag = tag;
        f->sent = 0;
        f->segment.seg_len = total;
        f->base.des_flags = MCA_BTL_DES_FLAGS_BTL_OWNERSHIP;
        ep->queued++;
        opal_list_append(&ep->pending, &f->base.super.super);
        mca_btl_ivcom_pending_changed(ep);
        UNLOCK(ep);
        return OPAL_SUCCESS;
    }
    UNLOCK(ep);
    mca_btl_ivcom_frag_return(f);
    return rc < 0 ? report(ep, rc, OPAL_ERROR) : OPAL_SUCCESS;
}

int mca_btl_ivcom_sendi(struct mca_btl_base_module_t *btl, struct mca_btl_base_endpoint_t *ep,
                        struct opal_convertor_t *conv, void *header, size_t header_size,
                        size_t payload_size, uint8_t order, uint32_t flags,
                        mca_btl_base_tag_t tag, mca_btl_base_descriptor_t **descriptor)
{
    /* The commonest case in the fewest steps: no threads (so no lock), a
     * working link with nothing queued or reserved, a message that fits
     * its records, a contiguous payload or none (ob1's small messages).
     * What sendi_general would do for it, without its frame. */
    if (OPAL_LIKELY(!opal_using_threads() && mca_btl_ivcom_link_open(ep)
                    && NULL == ep->reserved && 0 == ep->npending
                    && header_size + payload_size <= ep->max_send)) {
        const void *src = contiguous_payload(conv, payload_size);
        if (NULL != src || 0 == payload_size) {
            int rc = ivcom_link_try_send2(ep->link, tag, header, header_size, src, payload_size);
            if (NULL != descriptor) {
                *descriptor = NULL;
            }
            if (OPAL_LIKELY(1 == rc)) {
                return OPAL_SUCCESS;
            }
            rc = sendi_sent(btl, ep, rc, order, header_size + payload_size, flags, descriptor);
            return sendi_counted(ep, rc, descriptor);
        }
    }
    return sendi_counted(ep,
                         sendi_general(btl, ep, conv, header, header_size, payload_size, order,
                                       flags, tag, descriptor),
                         descriptor);
}
