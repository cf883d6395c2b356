"""mpi4py over btl/ivcom with mpi4py's default start (MPI_THREAD_MULTIPLE):
4 threads per rank, each on its own duplicate of COMM_WORLD, exchange
messages of several sizes with the same thread of the neighbouring rank at
the same time, blocking and non-blocking; every byte is compared. Prints
"PY THREADS PASS" on rank 0."""
import sys
import threading

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
right, left = (rank + 1) % size, (rank - 1) % size
THREADS = 4
comms = [comm.Dup() for _ in range(THREADS)]
errors = [0] * THREADS


def pattern(src, dst, t, seq, n):
    x = (src * 1000003 + dst * 10007 + t * 101 + seq) & 0xFF
    return bytes((x + 31 * i) & 0xFF for i in range(n))


def work(t):
    c = comms[t]
    for seq, n in enumerate([0, 1, 100, 4096, 70000, 1 << 20]):
        out = pattern(rank, right, t, seq, n)
        buf = bytearray(n)
        c.Sendrecv(out, dest=right, sendtag=t, recvbuf=buf, source=left, recvtag=t)
        if bytes(buf) != pattern(left, rank, t, seq, n):
            errors[t] += 1
        out = pattern(rank, right, t, seq + 50, n)
        buf = bytearray(n)
        rr = c.Irecv(buf, source=MPI.ANY_SOURCE, tag=100 + t)
        sr = c.Isend(out, dest=right, tag=100 + t)
        st = MPI.Status()
        rr.Wait(st)
        sr.Wait()
        if bytes(buf) != pattern(left, rank, t, seq + 50, n) or st.Get_source() != left:
            errors[t] += 1


ts = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
for t in ts:
    t.start()
for t in ts:
    t.join()
total = comm.allreduce(sum(errors))
if rank == 0:
    sys.stdout.write("PY THREADS PASS\n" if total == 0 else "PY THREADS FAIL errors=%d\n" % total)
