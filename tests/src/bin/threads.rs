//! `ivcom-threads`: an MPI_THREAD_MULTIPLE program that checks every byte
//! it moves. Every rank runs `--threads N` threads (default 4); thread `t`
//! of every rank works on its own duplicate of the world communicator with
//! its own tags, against the same thread of the neighbouring ranks:
//! blocking and non-blocking exchanges around the ring of ranks for every
//! size class (0 bytes to 16 MiB), receives from `MPI_ANY_SOURCE`, and a
//! message of a size the receiver learns with `MPI_Probe`. All threads run
//! at once, so sends, receives and progress of several threads meet in the
//! transport. Rank 0 prints `THREADS PASS ranks=N threads=T checks=C
//! bytes=B` when every check of every thread of every rank passed, and the
//! job aborts otherwise. `--rounds R` repeats the whole exchange.

use mpi::point_to_point as p2p;
use mpi::request::WaitGuard;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

/// Deterministic bytes of message (`src`, `dst`, `thread`, `seq`, `len`).
fn pattern(src: i32, dst: i32, thread: usize, seq: u64, len: usize) -> Vec<u8> {
    let seed = (src as u64) << 48
        ^ (dst as u64) << 32
        ^ (thread as u64) << 24
        ^ seq.rotate_left(17)
        ^ (len as u64) << 4
        | 1;
    ivcom_tests::xorshift_bytes(seed, len)
}

const SIZES: &[usize] = &[0, 1, 7, 64, 4095, 4096, 4097, 65536, 1 << 20, 16 << 20];

/// A communicator handed to one thread. Under MPI_THREAD_MULTIPLE any
/// thread may use any handle; each thread here uses its own.
struct Comm(SimpleCommunicator);
// SAFETY: MPI_THREAD_MULTIPLE was provided (checked in main), so MPI
// handles may be used from any thread; this one is used by one thread.
unsafe impl Send for Comm {}

#[derive(Default)]
struct Tally {
    checks: u64,
    errors: u64,
    bytes: u64,
}

impl Tally {
    fn bytes(&mut self, rank: i32, thread: usize, what: &str, got: &[u8], want: &[u8]) {
        self.checks += 1;
        self.bytes += got.len() as u64;
        if got != want {
            self.errors += 1;
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            eprintln!(
                "rank {rank} thread {thread}: {what}: {} bytes, want {}, first difference at {first:?}",
                got.len(),
                want.len()
            );
        }
    }
    fn eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        rank: i32,
        thread: usize,
        what: &str,
        got: T,
        want: T,
    ) {
        self.checks += 1;
        if got != want {
            self.errors += 1;
            eprintln!("rank {rank} thread {thread}: {what}: got {got:?}, want {want:?}");
        }
    }
}

/// One thread's work on its own communicator.
fn work(comm: &SimpleCommunicator, thread: usize, rounds: u64) -> Tally {
    let rank = comm.rank();
    let n = comm.size();
    let right = (rank + 1) % n;
    let left = (rank + n - 1) % n;
    let mut t = Tally::default();
    // Only thread 0 moves the 16 MiB messages: the rest of the sizes keep
    // every thread busy without holding gigabytes at once.
    let sizes: Vec<usize> = SIZES
        .iter()
        .copied()
        .filter(|&s| thread == 0 || s < 16 << 20)
        .collect();
    let tag = |k: u64| ((thread as u64) * 1000 + k) as i32;
    for round in 0..rounds {
        for (i, &len) in sizes.iter().enumerate() {
            let seq = round * 100 + i as u64;
            // 1. Blocking: send right, receive from the left, with a
            //    specific source and tag.
            let out = pattern(rank, right, thread, seq, len);
            let mut got = vec![0u8; len];
            p2p::send_receive_into_with_tags(
                &out[..],
                &comm.process_at_rank(right),
                tag(1),
                &mut got[..],
                &comm.process_at_rank(left),
                tag(1),
            );
            t.bytes(
                rank,
                thread,
                "sendrecv",
                &got,
                &pattern(left, rank, thread, seq, len),
            );
            // 2. Non-blocking, received from any source.
            let out = pattern(rank, right, thread, seq + 50, len);
            let mut inb = vec![0u8; len];
            let st = mpi::request::scope(|sc| {
                let r =
                    comm.any_process()
                        .immediate_receive_into_with_tag(sc, &mut inb[..], tag(2));
                let s = comm
                    .process_at_rank(right)
                    .immediate_send_with_tag(sc, &out[..], tag(2));
                let st = r.wait();
                s.wait();
                st
            });
            t.eq(rank, thread, "any-source source", st.source_rank(), left);
            t.bytes(
                rank,
                thread,
                "isend/irecv",
                &inb,
                &pattern(left, rank, thread, seq + 50, len),
            );
        }
        // 3. A size the receiver learns by probing (any source).
        let len = 1000 + 37 * thread + round as usize;
        let out = pattern(rank, right, thread, 9000 + round, len);
        mpi::request::scope(|sc| {
            let s = WaitGuard::from(comm.process_at_rank(right).immediate_send_with_tag(
                sc,
                &out[..],
                tag(3),
            ));
            let (msg, st) = comm.any_process().matched_probe_with_tag(tag(3));
            let count = st.count(u8::equivalent_datatype()) as usize;
            t.eq(rank, thread, "probe source", st.source_rank(), left);
            t.eq(rank, thread, "probe count", count, len);
            let mut got = vec![0u8; count];
            msg.matched_receive_into(&mut got[..]);
            t.bytes(
                rank,
                thread,
                "probed",
                &got,
                &pattern(left, rank, thread, 9000 + round, len),
            );
            drop(s);
        });
    }
    t
}

fn main() {
    let arg = |k: &str, d: u64| -> u64 {
        std::env::args()
            .skip_while(|a| a != k)
            .nth(1)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(d)
    };
    let threads = arg("--threads", 4) as usize;
    let rounds = arg("--rounds", 1);
    let (universe, provided) =
        mpi::initialize_with_threading(Threading::Multiple).expect("MPI init");
    let world = universe.world();
    if provided != Threading::Multiple {
        eprintln!("THREADS FAIL: MPI provided {provided:?}, not Multiple");
        world.abort(2);
    }
    let rank = world.rank();
    assert!(world.size() >= 2, "run with 2 or more ranks");
    // One communicator per thread, duplicated in the same order on every
    // rank (collective), before the threads start.
    let comms: Vec<Comm> = (0..threads).map(|_| Comm(world.duplicate())).collect();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                s.spawn(move || {
                    let c = c; // the whole (Send) wrapper moves in
                    work(&c.0, i, rounds)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mine = tallies.iter().fold(Tally::default(), |a, b| Tally {
        checks: a.checks + b.checks,
        errors: a.errors + b.errors,
        bytes: a.bytes + b.bytes,
    });
    let sum = |v: u64| {
        let mut out = 0u64;
        world.all_reduce_into(&v, &mut out, mpi::collective::SystemOperation::sum());
        out
    };
    let (errors, checks, bytes) = (sum(mine.errors), sum(mine.checks), sum(mine.bytes));
    if rank == 0 {
        if errors == 0 {
            println!(
                "THREADS PASS ranks={} threads={threads} checks={checks} bytes={bytes}",
                world.size()
            );
        } else {
            println!("THREADS FAIL errors={errors} checks={checks}");
        }
    }
    if errors != 0 {
        world.abort(3);
    }
}
