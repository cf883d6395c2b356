//! Ping-pong latency between ranks 0 and 1, reported as half the round trip.
use ivcom_osu::*;
use mpi::traits::*;

fn main() {
    let o = Opts::parse((10_000, 1_000), (1_000, 100));
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    if world.size() != 2 {
        if world.rank() == 0 {
            eprintln!("osu_latency needs exactly 2 ranks");
        }
        world.abort(2);
    }
    let rank = world.rank();
    let peer = world.process_at_rank(1 - rank);
    let mut sbuf = vec![0u8; o.max.max(1)];
    let mut rbuf = vec![0u8; o.max.max(1)];
    if rank == 0 {
        header("Latency Test", "# Size          Latency (us)");
    }
    for size in o.sizes() {
        let (iters, skip) = o.counts(size);
        fill(&mut sbuf, size);
        world.barrier();
        let mut t0 = 0.0;
        for i in 0..iters + skip {
            if i == skip {
                t0 = mpi::time();
            }
            if rank == 0 {
                peer.send(&sbuf[..size]);
                peer.receive_into(&mut rbuf[..size]);
            } else {
                peer.receive_into(&mut rbuf[..size]);
                peer.send(&sbuf[..size]);
            }
        }
        let t = mpi::time() - t0;
        if o.check {
            verify(&world, &rbuf, size, "latency");
        }
        if rank == 0 {
            row(size, &[t * 1e6 / (2.0 * iters as f64)]);
        }
    }
}
