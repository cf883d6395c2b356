//! `ivcom-integrity`: an MPI program that checks every byte it moves.
//! Run under `mpirun` with any number of ranks (2 or more). Prints
//! `INTEGRITY PASS checks=N` on rank 0 when every rank's checks passed;
//! aborts with a non-zero exit otherwise.
//!
//! `ivcom-integrity --forever` exchanges messages until killed (for the
//! killed-rank test); `--thread-multiple` initializes MPI with
//! MPI_THREAD_MULTIPLE; `--pingpong LEN COUNT` replaces the suite with
//! COUNT round trips of LEN-byte messages between ranks 0 and 1 (a
//! receiver that keeps up: the piece-size test), each message a new
//! pattern checked byte for byte on arrival; `--stream LEN COUNT` replaces
//! it with COUNT messages of LEN bytes from rank 0 to rank 1 in windows of
//! 64, as osu_bw sends them, each checked byte for byte.

use mpi::datatype::PartitionMut;
use mpi::point_to_point as p2p;
use mpi::request::WaitGuard;
use mpi::traits::*;
use mpi::Count;

/// Deterministic bytes of message (`src`, `dst`, `seq`, `len`).
fn pattern(src: i32, dst: i32, seq: u64, len: usize) -> Vec<u8> {
    let seed = (src as u64) << 40 ^ (dst as u64) << 20 ^ seq ^ (len as u64) << 8 | 1;
    ivcom_tests::xorshift_bytes(seed, len)
}

struct Checker {
    rank: i32,
    checks: u64,
    errors: u64,
}

impl Checker {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        self.checks += 1;
        if got != want {
            self.errors += 1;
            if self.errors <= 10 {
                eprintln!("rank {}: {what}: got {got:?}, want {want:?}", self.rank);
            }
        }
    }
    fn bytes(&mut self, what: &str, got: &[u8], want: &[u8]) {
        self.checks += 1;
        if got != want {
            self.errors += 1;
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            eprintln!(
                "rank {}: {what}: {} bytes, want {}, first difference at {first:?}",
                self.rank,
                got.len(),
                want.len()
            );
        }
    }
}

const SIZES: &[usize] = &[
    0,
    1,
    7,
    64,
    4095,
    4096,
    4097,
    65535,
    65536,
    65537,
    1 << 20,
    16 << 20,
];

fn main() {
    // --thread-multiple: ask for MPI_THREAD_MULTIPLE (btl/ivcom must decline
    // it clearly and leave the traffic to the other BTLs).
    let universe = if std::env::args().any(|a| a == "--thread-multiple") {
        mpi::initialize_with_threading(mpi::Threading::Multiple)
            .expect("MPI init")
            .0
    } else {
        mpi::initialize().expect("MPI init")
    };
    let world = universe.world();
    let rank = world.rank();
    let n = world.size();
    assert!(n >= 2, "run with 2 or more ranks");
    let right = (rank + 1) % n;
    let left = (rank + n - 1) % n;
    let mut c = Checker {
        rank,
        checks: 0,
        errors: 0,
    };

    if std::env::args().any(|a| a == "--forever") {
        let mut seq = 0u64;
        loop {
            let out = pattern(rank, right, seq, 65536);
            let mut got = vec![0u8; 65536];
            p2p::send_receive_into(
                &out[..],
                &world.process_at_rank(right),
                &mut got[..],
                &world.process_at_rank(left),
            );
            c.bytes("forever", &got, &pattern(left, rank, seq, 65536));
            if seq == 10 && rank == 0 {
                println!("FOREVER RUNNING");
            }
            seq += 1;
        }
    }

    // --seconds S: run the whole suite again and again for S seconds (all
    // ranks agree when to stop), for tests that act on the job meanwhile.
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|v| v.parse().expect("--seconds N"))
        .unwrap_or(0);
    // --stop-file PATH: with --seconds, stop early once PATH exists (the
    // test that acts on the job says when it is done).
    let stop_file: Option<std::path::PathBuf> = std::env::args()
        .skip_while(|a| a != "--stop-file")
        .nth(1)
        .map(Into::into);
    // --stream LEN COUNT: rank 0 streams COUNT messages of LEN bytes to
    // rank 1 in windows of 64 (osu_bw's pattern), every byte checked.
    if let Some((len, count)) = len_count("--stream") {
        stream(&world, &mut c, len, count);
        report(&world, &c, n);
        return;
    }
    let pingpong = len_count("--pingpong");
    let t0 = std::time::Instant::now();
    let mut rounds = 0u64;
    loop {
        if let Some((len, count)) = pingpong {
            ping_pong(&world, &mut c, len, count);
        } else {
            suite(&world, &mut c);
        }
        rounds += 1;
        let stop = stop_file.as_deref().is_some_and(|f| f.exists());
        let more = (t0.elapsed().as_secs() < seconds && !stop) as i32;
        let mut all = 0i32;
        world.all_reduce_into(&more, &mut all, mpi::collective::SystemOperation::min());
        if all == 0 {
            break;
        }
    }
    if rank == 0 && seconds > 0 {
        println!("INTEGRITY ROUNDS {rounds}");
    }
    report(&world, &c, n);
}

/// The two numbers after `flag` on the command line (`FLAG LEN COUNT`),
/// if it is there.
fn len_count(flag: &str) -> Option<(usize, u64)> {
    let v: Vec<u64> = std::env::args()
        .skip_while(|a| a != flag)
        .skip(1)
        .take(2)
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{flag} LEN COUNT")))
        .collect();
    match v[..] {
        [len, count] => Some((len as usize, count)),
        _ => None,
    }
}

/// Sums every rank's checks and errors; rank 0 prints the verdict
/// (`INTEGRITY PASS ranks=N checks=M`); a failed job aborts.
fn report(world: &mpi::topology::SimpleCommunicator, c: &Checker, n: i32) {
    let rank = world.rank();
    world.barrier();

    let mut errors = 0u64;
    world.all_reduce_into(
        &c.errors,
        &mut errors,
        mpi::collective::SystemOperation::sum(),
    );
    let mut checks = 0u64;
    world.all_reduce_into(
        &c.checks,
        &mut checks,
        mpi::collective::SystemOperation::sum(),
    );
    if rank == 0 {
        if errors == 0 {
            println!("INTEGRITY PASS ranks={n} checks={checks}");
        } else {
            println!("INTEGRITY FAIL ranks={n} errors={errors} checks={checks}");
        }
    }
    if errors != 0 {
        world.abort(3);
    }
}

/// `count` messages of `len` bytes from rank 0 to rank 1 in windows of 64
/// non-blocking sends and receives, each window acknowledged (osu_bw's
/// pattern: a sender that outruns its receiver), every byte of every
/// message checked (other ranks wait).
fn stream(world: &mpi::topology::SimpleCommunicator, c: &mut Checker, len: usize, count: u64) {
    const WINDOW: u64 = 64;
    let rank = world.rank();
    if rank > 1 {
        return;
    }
    let peer = world.process_at_rank(1 - rank);
    let mut ack = [0u8; 4];
    let mut seq = 0;
    while seq < count {
        let n = WINDOW.min(count - seq);
        if rank == 0 {
            let msgs: Vec<Vec<u8>> = (seq..seq + n).map(|s| pattern(0, 1, s, len)).collect();
            mpi::request::scope(|scope| {
                let reqs: Vec<_> = msgs
                    .iter()
                    .map(|m| peer.immediate_send(scope, &m[..]))
                    .collect();
                for r in reqs {
                    r.wait();
                }
            });
            peer.receive_into(&mut ack[..]);
        } else {
            let mut bufs = vec![vec![0u8; len]; n as usize];
            mpi::request::scope(|scope| {
                let reqs: Vec<_> = bufs
                    .iter_mut()
                    .map(|b| peer.immediate_receive_into(scope, &mut b[..]))
                    .collect();
                for r in reqs {
                    r.wait();
                }
            });
            for (i, b) in bufs.iter().enumerate() {
                c.bytes("stream", b, &pattern(0, 1, seq + i as u64, len));
            }
            peer.send(&ack[..]);
        }
        seq += n;
    }
}

/// `count` round trips of `len` bytes between ranks 0 and 1, every byte
/// of every message checked (other ranks wait).
fn ping_pong(world: &mpi::topology::SimpleCommunicator, c: &mut Checker, len: usize, count: u64) {
    let rank = world.rank();
    if rank > 1 {
        return;
    }
    let peer = world.process_at_rank(1 - rank);
    let mut got = vec![0u8; len];
    for seq in 0..count {
        if rank == 0 {
            peer.send(&pattern(0, 1, seq, len)[..]);
            peer.receive_into(&mut got[..]);
            c.bytes("pingpong reply", &got, &pattern(1, 0, seq, len));
        } else {
            peer.receive_into(&mut got[..]);
            c.bytes("pingpong message", &got, &pattern(0, 1, seq, len));
            peer.send(&pattern(1, 0, seq, len)[..]);
        }
    }
}

/// One round of every check: point-to-point of every size, tags and
/// wildcards, probe, non-blocking, sendrecv, collectives.
fn suite(world: &mpi::topology::SimpleCommunicator, c: &mut Checker) {
    let rank = world.rank();
    let n = world.size();
    let right = (rank + 1) % n;
    let left = (rank + n - 1) % n;
    // 1. Point-to-point, every size, around the ring of ranks (blocking;
    //    even ranks send first to avoid relying on buffering).
    for (i, &len) in SIZES.iter().enumerate() {
        let out = pattern(rank, right, i as u64, len);
        let mut buf = vec![0u8; len];
        if rank % 2 == 0 {
            world
                .process_at_rank(right)
                .send_with_tag(&out[..], i as i32);
            world
                .process_at_rank(left)
                .receive_into_with_tag(&mut buf[..], i as i32);
        } else {
            world
                .process_at_rank(left)
                .receive_into_with_tag(&mut buf[..], i as i32);
            world
                .process_at_rank(right)
                .send_with_tag(&out[..], i as i32);
        }
        c.bytes(
            &format!("p2p size {len}"),
            &buf,
            &pattern(left, rank, i as u64, len),
        );
    }

    // 2. Tags, MPI_ANY_SOURCE and MPI_ANY_TAG. (a) Every other rank sends
    //    tags 1..=3 to rank 0, which takes them by tag from any source; (b)
    //    rank 1 sends tags 10, 20, 30 and then 77; rank 0 takes them by tag
    //    in reverse order, then the last one with MPI_ANY_TAG; (c) after a
    //    barrier, one message per rank, taken with both wildcards.
    world.barrier();
    if rank == 0 {
        let mut seen = vec![0u32; n as usize];
        for tag in 1..=3 {
            for _ in 1..n {
                let (msg, st) = world.any_process().receive_vec_with_tag::<u8>(tag);
                let src = st.source_rank();
                c.eq("any-source tag", st.tag(), tag);
                c.bytes(
                    "any-source payload",
                    &msg,
                    &pattern(src, 0, 100 + tag as u64, 1000 + tag as usize),
                );
                seen[src as usize] += 1;
            }
        }
        for (r, &k) in seen.iter().enumerate().skip(1) {
            c.eq(&format!("messages from rank {r}"), k, 3);
        }
        for tag in [30, 20, 10] {
            let (msg, st) = world.process_at_rank(1).receive_vec_with_tag::<u8>(tag);
            c.eq("tagged receive tag", st.tag(), tag);
            c.bytes(
                "tagged payload",
                &msg,
                &pattern(1, 0, 200 + tag as u64, 3000 + tag as usize),
            );
        }
        let (msg, st) = world.process_at_rank(1).receive_vec::<u8>();
        c.eq("any-tag tag", st.tag(), 77);
        c.bytes("any-tag payload", &msg, &pattern(1, 0, 77, 77));
    } else {
        for tag in 1..=3 {
            let m = pattern(rank, 0, 100 + tag as u64, 1000 + tag as usize);
            world.process_at_rank(0).send_with_tag(&m[..], tag);
        }
        if rank == 1 {
            for tag in [10, 20, 30] {
                let m = pattern(1, 0, 200 + tag as u64, 3000 + tag as usize);
                world.process_at_rank(0).send_with_tag(&m[..], tag);
            }
            world
                .process_at_rank(0)
                .send_with_tag(&pattern(1, 0, 77, 77)[..], 77);
        }
    }
    world.barrier();
    if rank == 0 {
        let mut seen = vec![false; n as usize];
        for _ in 1..n {
            let (msg, st) = world.any_process().receive_vec::<u8>();
            let src = st.source_rank();
            c.eq("wildcard tag", st.tag(), 500 + src);
            c.bytes(
                "wildcard payload",
                &msg,
                &pattern(src, 0, 500, 4096 + src as usize),
            );
            c.eq("wildcard duplicate", seen[src as usize], false);
            seen[src as usize] = true;
        }
    } else {
        world
            .process_at_rank(0)
            .send_with_tag(&pattern(rank, 0, 500, 4096 + rank as usize)[..], 500 + rank);
    }

    // 3. MPI_Probe: size unknown to the receiver.
    world.barrier();
    {
        let len = 5000 + 1000 * rank as usize;
        let out = pattern(rank, right, 300, len);
        let sreq_done = {
            mpi::request::scope(|scope| {
                let _g = WaitGuard::from(world.process_at_rank(right).immediate_send_with_tag(
                    scope,
                    &out[..],
                    300,
                ));
                let (msg, st) = world.any_process().matched_probe_with_tag(300);
                let count = st.count(u8::equivalent_datatype()) as usize;
                let expect = 5000 + 1000 * left as usize;
                c.eq("probe source", st.source_rank(), left);
                c.eq("probe count", count, expect);
                let mut got = vec![0u8; count];
                msg.matched_receive_into(&mut got[..]);
                c.bytes("probed payload", &got, &pattern(left, rank, 300, expect));
            });
            true
        };
        c.eq("probe exchange done", sreq_done, true);
    }

    // 4. Non-blocking: 128 outstanding Isend and Irecv to/from each
    //    neighbour, then waitall.
    world.barrier();
    {
        const K: usize = 128;
        let outs: Vec<Vec<u8>> = (0..K)
            .map(|i| pattern(rank, right, 1000 + i as u64, 100 + 97 * i))
            .collect();
        let mut ins: Vec<Vec<u8>> = (0..K).map(|i| vec![0u8; 100 + 97 * i]).collect();
        mpi::request::multiple_scope(2 * K, |scope, coll| {
            for (i, b) in ins.iter_mut().enumerate() {
                coll.add(world.process_at_rank(left).immediate_receive_into_with_tag(
                    scope,
                    &mut b[..],
                    i as i32,
                ));
            }
            for (i, o) in outs.iter().enumerate() {
                coll.add(world.process_at_rank(right).immediate_send_with_tag(
                    scope,
                    &o[..],
                    i as i32,
                ));
            }
            let mut statuses = Vec::new();
            coll.wait_all(&mut statuses);
        });
        for (i, b) in ins.iter().enumerate() {
            c.bytes(
                &format!("isend/irecv {i}"),
                b,
                &pattern(left, rank, 1000 + i as u64, 100 + 97 * i),
            );
        }
    }

    // 5. MPI_Sendrecv around the ring, large.
    {
        let out = pattern(rank, right, 400, 3 << 20);
        let mut inb = vec![0u8; 3 << 20];
        p2p::send_receive_into(
            &out[..],
            &world.process_at_rank(right),
            &mut inb[..],
            &world.process_at_rank(left),
        );
        c.bytes("sendrecv", &inb, &pattern(left, rank, 400, 3 << 20));
    }

    // 6. Collectives against computed values.
    world.barrier();
    for root in 0..n {
        let mut v: Vec<u64> = if rank == root {
            (0..100_000u64).map(|i| i * 3 + root as u64).collect()
        } else {
            vec![0; 100_000]
        };
        world.process_at_rank(root).broadcast_into(&mut v[..]);
        c.eq(
            &format!("bcast from {root}"),
            v.iter()
                .enumerate()
                .all(|(i, &x)| x == i as u64 * 3 + root as u64),
            true,
        );
    }
    {
        let mine: Vec<i64> = (0..1000).map(|i| i * (rank as i64 + 1)).collect();
        let tri = (n as i64) * (n as i64 + 1) / 2;
        let want: Vec<i64> = (0..1000).map(|i| i * tri).collect();
        let mut all = vec![0i64; 1000];
        world.all_reduce_into(
            &mine[..],
            &mut all[..],
            mpi::collective::SystemOperation::sum(),
        );
        c.eq("allreduce sum", &all, &want);
        if rank == 0 {
            let mut red = vec![0i64; 1000];
            world.process_at_rank(0).reduce_into_root(
                &mine[..],
                &mut red[..],
                mpi::collective::SystemOperation::sum(),
            );
            c.eq("reduce sum", &red, &want);
        } else {
            world
                .process_at_rank(0)
                .reduce_into(&mine[..], mpi::collective::SystemOperation::sum());
        }
        let mut mx = 0i32;
        world.all_reduce_into(&rank, &mut mx, mpi::collective::SystemOperation::max());
        c.eq("allreduce max", mx, n - 1);
    }
    {
        // alltoall: element j of rank r's buffer goes to rank j.
        let per = 1000usize;
        let send: Vec<u32> = (0..n as usize * per)
            .map(|k| (rank as u32) << 24 | k as u32)
            .collect();
        let mut recv = vec![0u32; n as usize * per];
        world.all_to_all_into(&send[..], &mut recv[..]);
        let want: Vec<u32> = (0..n as usize)
            .flat_map(|src| {
                (0..per).map(move |i| (src as u32) << 24 | (rank as usize * per + i) as u32)
            })
            .collect();
        c.eq("alltoall", recv == want, true);
    }
    {
        let mine = pattern(rank, -1, 500, 10_000);
        let mut all = vec![0u8; 10_000 * n as usize];
        world.all_gather_into(&mine[..], &mut all[..]);
        for r in 0..n {
            let a = r as usize * 10_000;
            c.bytes(
                &format!("allgather part {r}"),
                &all[a..a + 10_000],
                &pattern(r, -1, 500, 10_000),
            );
        }
        // allgatherv with uneven parts.
        let counts: Vec<Count> = (0..n).map(|r| 100 + r * 50).collect();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &x| {
                let d = *acc;
                *acc += x;
                Some(d)
            })
            .collect();
        let total: Count = counts.iter().sum();
        let mine = pattern(rank, -2, 501, counts[rank as usize] as usize);
        let mut buf = vec![0u8; total as usize];
        {
            let mut part = PartitionMut::new(&mut buf[..], counts.clone(), &displs[..]);
            world.all_gather_varcount_into(&mine[..], &mut part);
        }
        for r in 0..n {
            let a = displs[r as usize] as usize;
            let l = counts[r as usize] as usize;
            c.bytes(
                &format!("allgatherv part {r}"),
                &buf[a..a + l],
                &pattern(r, -2, 501, l),
            );
        }
    }
}
