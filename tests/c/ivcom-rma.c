/*
 * MPI one-sided communication (RMA) check, run by tests/tests/rma.rs over
 * --mca btl ivcom,self: Put, Get, Accumulate and Fetch_and_op, each with
 * active target (fence) and passive target (lock/unlock, lock_all/flush)
 * synchronization. Every value that arrives is checked exactly; windows are
 * MPI_Win_create'd on ordinary memory, so no shared-memory window can
 * carry the traffic instead of the BTL.
 *
 * Prints "RMA PASS ranks=N checks=K" on rank 0 and exits 0, or prints the
 * first mismatch and aborts.
 *
 *   ivcom-rma [--large BYTES]   size of the large Put/Get block (default
 *                               300001: several BTL fragments, odd length)
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;
static long checks;
static size_t large = 300001;

#define ACC_N 1000 /* int64 counters per rank for Accumulate */
#define FOP_N 200  /* Fetch_and_op calls per rank */

static void fail(const char *what, long where, long long got, long long want)
{
    fprintf(stderr, "RMA FAIL rank=%d %s at %ld: got %lld, want %lld\n", rank, what, where, got,
            want);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static void check(const char *what, long where, long long got, long long want)
{
    if (got != want) {
        fail(what, where, got, want);
    }
    checks++;
}

/* Byte i of the block `origin` sends to `target` in phase `phase`. */
static unsigned char pattern(int origin, int target, size_t i, int phase)
{
    return (unsigned char) (origin * 131 + target * 31 + i * 7 + phase * 53 + (i >> 9));
}

static int right(void) { return (rank + 1) % nranks; }
static int left(void) { return (rank + nranks - 1) % nranks; }

/* Sizes of the Put/Get blocks: a small and a large one (ob1's eager and
 * fragmented paths, osc's single and split operations). */
static size_t block_size(int k) { return k == 0 ? 8 : large; }

/* Put: every rank writes a block of each size into its right neighbour's
 * window; the neighbour checks every byte. */
static void test_put(int passive)
{
    int phase = passive ? 2 : 1;
    size_t total = block_size(0) + block_size(1);
    unsigned char *win_mem = calloc(total, 1), *src = malloc(total);
    MPI_Win win;
    size_t off = 0;
    for (int k = 0; k < 2; k++) {
        for (size_t i = 0; i < block_size(k); i++) {
            src[off + i] = pattern(rank, right(), off + i, phase);
        }
        off += block_size(k);
    }
    MPI_Win_create(win_mem, total, 1, MPI_INFO_NULL, MPI_COMM_WORLD, &win);
    if (passive) {
        MPI_Win_lock(MPI_LOCK_EXCLUSIVE, right(), 0, win);
        MPI_Put(src, (int) block_size(0), MPI_BYTE, right(), 0, (int) block_size(0), MPI_BYTE, win);
        MPI_Put(src + block_size(0), (int) block_size(1), MPI_BYTE, right(), block_size(0),
                (int) block_size(1), MPI_BYTE, win);
        MPI_Win_unlock(right(), win);
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Win_lock(MPI_LOCK_SHARED, rank, 0, win);
    } else {
        MPI_Win_fence(0, win);
        MPI_Put(src, (int) block_size(0), MPI_BYTE, right(), 0, (int) block_size(0), MPI_BYTE, win);
        MPI_Put(src + block_size(0), (int) block_size(1), MPI_BYTE, right(), block_size(0),
                (int) block_size(1), MPI_BYTE, win);
        MPI_Win_fence(0, win);
    }
    for (size_t i = 0; i < total; i++) {
        check(passive ? "put (lock)" : "put (fence)", (long) i, win_mem[i],
              pattern(left(), rank, i, phase));
    }
    if (passive) {
        MPI_Win_unlock(rank, win);
    }
    MPI_Win_free(&win);
    free(win_mem);
    free(src);
}

/* Get: every rank exposes a block of each size and reads its left
 * neighbour's. */
static void test_get(int passive)
{
    int phase = passive ? 4 : 3;
    size_t total = block_size(0) + block_size(1);
    unsigned char *win_mem = malloc(total), *dst = calloc(total, 1);
    MPI_Win win;
    for (size_t i = 0; i < total; i++) {
        win_mem[i] = pattern(rank, -1, i, phase);
    }
    MPI_Win_create(win_mem, total, 1, MPI_INFO_NULL, MPI_COMM_WORLD, &win);
    if (passive) {
        MPI_Win_lock(MPI_LOCK_SHARED, left(), 0, win);
    } else {
        MPI_Win_fence(0, win);
    }
    MPI_Get(dst, (int) block_size(0), MPI_BYTE, left(), 0, (int) block_size(0), MPI_BYTE, win);
    MPI_Get(dst + block_size(0), (int) block_size(1), MPI_BYTE, left(), block_size(0),
            (int) block_size(1), MPI_BYTE, win);
    if (passive) {
        MPI_Win_unlock(left(), win);
    } else {
        MPI_Win_fence(0, win);
    }
    for (size_t i = 0; i < total; i++) {
        check(passive ? "get (lock)" : "get (fence)", (long) i, dst[i],
              pattern(left(), -1, i, phase));
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Win_free(&win);
    free(win_mem);
    free(dst);
}

/* Accumulate (MPI_SUM on int64): every rank adds (origin+1)*(i+1) to
 * counter i of every other rank, twice; each counter starts at 1000*me. */
static void test_accumulate(int passive)
{
    int64_t *win_mem = malloc(ACC_N * sizeof(int64_t)), *src = malloc(ACC_N * sizeof(int64_t));
    MPI_Win win;
    for (int i = 0; i < ACC_N; i++) {
        win_mem[i] = 1000 * (int64_t) rank;
        src[i] = (int64_t) (rank + 1) * (i + 1);
    }
    MPI_Win_create(win_mem, ACC_N * sizeof(int64_t), sizeof(int64_t), MPI_INFO_NULL,
                   MPI_COMM_WORLD, &win);
    if (!passive) {
        MPI_Win_fence(0, win);
    }
    for (int t = 0; t < nranks; t++) {
        if (t == rank) {
            continue;
        }
        if (passive) {
            MPI_Win_lock(MPI_LOCK_SHARED, t, 0, win);
        }
        for (int rep = 0; rep < 2; rep++) {
            MPI_Accumulate(src, ACC_N, MPI_INT64_T, t, 0, ACC_N, MPI_INT64_T, MPI_SUM, win);
        }
        if (passive) {
            MPI_Win_unlock(t, win);
        }
    }
    if (passive) {
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Win_lock(MPI_LOCK_SHARED, rank, 0, win);
    } else {
        MPI_Win_fence(0, win);
    }
    int64_t others = 0; /* sum of (r+1) over the other ranks */
    for (int r = 0; r < nranks; r++) {
        others += r == rank ? 0 : r + 1;
    }
    for (int i = 0; i < ACC_N; i++) {
        check(passive ? "accumulate (lock)" : "accumulate (fence)", i, win_mem[i],
              1000 * (int64_t) rank + 2 * others * (i + 1));
    }
    if (passive) {
        MPI_Win_unlock(rank, win);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Win_free(&win);
    free(win_mem);
    free(src);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
    return x < y ? -1 : x > y;
}

/* Fetch_and_op (MPI_SUM of 1 on one int64 at rank 0, starting at 7): the
 * values every rank fetched, together, must be exactly 7 .. 7+n*FOP_N-1,
 * each once, and the counter must end at 7+n*FOP_N. */
static void test_fetch_and_op(int passive)
{
    int64_t counter = rank == 0 ? 7 : 0, one = 1, *got = malloc(FOP_N * sizeof(int64_t));
    int64_t *all = rank == 0 ? malloc((size_t) nranks * FOP_N * sizeof(int64_t)) : NULL;
    MPI_Win win;
    MPI_Win_create(&counter, sizeof(counter), sizeof(counter), MPI_INFO_NULL, MPI_COMM_WORLD, &win);
    if (passive) {
        MPI_Win_lock_all(0, win);
        for (int k = 0; k < FOP_N; k++) {
            MPI_Fetch_and_op(&one, &got[k], MPI_INT64_T, 0, 0, MPI_SUM, win);
            MPI_Win_flush(0, win);
        }
        MPI_Win_unlock_all(win);
        MPI_Barrier(MPI_COMM_WORLD);
    } else {
        MPI_Win_fence(0, win);
        for (int k = 0; k < FOP_N; k++) {
            MPI_Fetch_and_op(&one, &got[k], MPI_INT64_T, 0, 0, MPI_SUM, win);
        }
        MPI_Win_fence(0, win);
    }
    MPI_Gather(got, FOP_N, MPI_INT64_T, all, FOP_N, MPI_INT64_T, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        if (passive) {
            MPI_Win_lock(MPI_LOCK_SHARED, 0, 0, win);
        }
        check(passive ? "fetch_and_op final (lock)" : "fetch_and_op final (fence)", 0, counter,
              7 + (int64_t) nranks * FOP_N);
        if (passive) {
            MPI_Win_unlock(0, win);
        }
        qsort(all, (size_t) nranks * FOP_N, sizeof(int64_t), cmp_i64);
        for (long k = 0; k < (long) nranks * FOP_N; k++) {
            check(passive ? "fetch_and_op values (lock)" : "fetch_and_op values (fence)", k,
                  all[k], 7 + k);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Win_free(&win);
    free(got);
    free(all);
}

int main(int argc, char **argv)
{
    long total;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    for (int i = 1; i < argc; i++) {
        if (0 == strcmp(argv[i], "--large") && i + 1 < argc) {
            large = strtoul(argv[++i], NULL, 10);
        }
    }
    if (nranks < 2) {
        if (rank == 0) {
            fprintf(stderr, "ivcom-rma needs at least 2 ranks\n");
        }
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    for (int passive = 0; passive < 2; passive++) {
        test_put(passive);
        test_get(passive);
        test_accumulate(passive);
        test_fetch_and_op(passive);
        if (rank == 0) {
            printf("RMA %s: put get accumulate fetch_and_op ok\n",
                   passive ? "passive target (lock/unlock, lock_all/flush)" : "active target (fence)");
            fflush(stdout);
        }
    }
    MPI_Reduce(&checks, &total, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("RMA PASS ranks=%d checks=%ld\n", nranks, total);
    }
    MPI_Finalize();
    return 0;
}
