/*
 * A pair whose ring grew with a stream gives the pages back once it
 * exchanges only small messages: run by tests/tests/mpi.rs over
 * --mca btl ivcom,self on the host backend, two ranks.
 *
 * Rank 0 streams 64 messages of 4 MiB to rank 1 (every byte checked), then
 * the two exchange 5,000 ping-pongs of 8 bytes (every value checked),
 * pausing 50 ms every 100, about 2.5 s in all (the ring gives its pages
 * back at its first early wrap below 64 KiB a second or more after the
 * stream last ran out of room, and its long laps end a second after that
 * run-out too: about 1.3 s into the ping-pongs, which 1.5 s did not
 * always cover on a loaded machine). Then rank 0 streams 16
 * messages of 4 MiB again, and the pair falls silent for 3 s: rank 1 polls
 * (MPI_Iprobe) without a message on the pair, rank 0 waits in MPI_Recv for
 * the one that ends the silence. Rank 0 reads the resident size of its
 * mappings of ivcom's rings (the memfds named "ivcom-ring" in
 * /proc/self/smaps) before the first stream, after it, after the
 * ping-pongs, after the second stream and after the silence, and prints
 *   "GIVEBACK PASS ring_kib before=A after_stream=B after_pingpong=C
 *    after_stream2=D after_silence=E"
 * (one line) and exits 0, or prints the first mismatch and aborts.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BIG (4u << 20)
#define STREAM 64
#define STREAM2 16
#define PINGS 5000
#define SILENCE 3.0

static int rank;

static void fail(const char *what, long where, long got, long want)
{
    fprintf(stderr, "GIVEBACK FAIL rank=%d %s at %ld: got %ld, want %ld\n", rank, what, where,
            got, want);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* Resident KiB of this process's mappings of ivcom's ring memfds. */
static long ring_kib(void)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    long kib = 0;
    int ring = 0;
    if (NULL == f) {
        fail("open /proc/self/smaps", 0, 0, 0);
    }
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        long v;
        if (2 == sscanf(line, "%lx-%lx ", &lo, &hi)) {
            ring = NULL != strstr(line, "memfd:ivcom-ring");
        } else if (ring && 1 == sscanf(line, "Rss: %ld kB", &v)) {
            kib += v;
        }
    }
    fclose(f);
    return kib;
}

static unsigned char byte_of(long msg, size_t i)
{
    return (unsigned char) (msg * 131 + i * 7 + (i >> 12));
}

/* Rank 0 sends messages first..first+count-1 of BIG bytes to rank 1, which
 * checks every byte. */
static void stream(unsigned char *big, long first, long count)
{
    for (long m = first; m < first + count; m++) {
        if (0 == rank) {
            for (size_t i = 0; i < BIG; i++) {
                big[i] = byte_of(m, i);
            }
            MPI_Send(big, BIG, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
        } else {
            MPI_Recv(big, BIG, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            for (size_t i = 0; i < BIG; i++) {
                if (big[i] != byte_of(m, i)) {
                    fail("stream byte", (long) i, big[i], byte_of(m, i));
                }
            }
        }
    }
}

int main(int argc, char **argv)
{
    int n;
    long before, after_stream, after_pingpong, after_stream2, after_silence;
    unsigned char *big;
    uint64_t v = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (2 != n) {
        fail("ranks", 0, n, 2);
    }
    big = malloc(BIG);
    if (NULL == big) {
        fail("malloc", 0, 0, BIG);
    }
    /* a first exchange sets the pair up */
    MPI_Sendrecv_replace(&v, 1, MPI_UINT64_T, 1 - rank, 3, 1 - rank, 3, MPI_COMM_WORLD,
                         MPI_STATUS_IGNORE);
    before = ring_kib();
    stream(big, 0, STREAM);
    MPI_Barrier(MPI_COMM_WORLD);
    after_stream = ring_kib();
    for (long i = 0; i < PINGS; i++) {
        uint64_t want = (uint64_t) i * 2654435761u;
        if (0 == rank) {
            v = want;
            MPI_Send(&v, 1, MPI_UINT64_T, 1, 2, MPI_COMM_WORLD);
            MPI_Recv(&v, 1, MPI_UINT64_T, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (v != want + 1) {
                fail("pong", i, (long) v, (long) (want + 1));
            }
        } else {
            MPI_Recv(&v, 1, MPI_UINT64_T, 0, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (v != want) {
                fail("ping", i, (long) v, (long) want);
            }
            v++;
            MPI_Send(&v, 1, MPI_UINT64_T, 0, 2, MPI_COMM_WORLD);
        }
        if (99 == i % 100) {
            usleep(50000);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    after_pingpong = ring_kib();
    /* The second stream ends with the receiver's check, then silence: no
     * message on the pair until rank 1 ends it, both ranks in MPI. */
    stream(big, STREAM, STREAM2);
    if (0 == rank) {
        after_stream2 = ring_kib();
        MPI_Recv(&v, 1, MPI_UINT64_T, 1, 4, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (v != 0x5117E9CEu) {
            fail("end of silence", 0, (long) v, 0x5117E9CEL);
        }
        after_silence = ring_kib();
        printf("GIVEBACK PASS ring_kib before=%ld after_stream=%ld after_pingpong=%ld "
               "after_stream2=%ld after_silence=%ld\n",
               before, after_stream, after_pingpong, after_stream2, after_silence);
    } else {
        double end = MPI_Wtime() + SILENCE;
        int flag;
        while (MPI_Wtime() < end) {
            MPI_Iprobe(0, 5, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
            if (flag) {
                fail("a message during the silence", 0, 1, 0);
            }
        }
        v = 0x5117E9CEu;
        MPI_Send(&v, 1, MPI_UINT64_T, 0, 4, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    free(big);
    MPI_Finalize();
    return 0;
}
