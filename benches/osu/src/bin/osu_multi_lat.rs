//! Latency of several pairs at once: rank i (first half) ping-pongs with
//! rank i + n/2; reports the average half round trip over the pairs.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

fn main() {
    let o = Opts::parse((10_000, 1_000), (1_000, 100));
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    let n = world.size();
    if n < 2 || n % 2 != 0 {
        if world.rank() == 0 {
            eprintln!("osu_multi_lat needs an even number of ranks");
        }
        world.abort(2);
    }
    let rank = world.rank();
    let pairs = n / 2;
    let first = rank < pairs;
    let peer = world.process_at_rank(if first { rank + pairs } else { rank - pairs });
    let mut sbuf = vec![0u8; o.max.max(1)];
    let mut rbuf = vec![0u8; o.max.max(1)];
    if rank == 0 {
        header("Multi Latency Test", "# Size          Latency (us)");
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
            if first {
                peer.send(&sbuf[..size]);
                peer.receive_into(&mut rbuf[..size]);
            } else {
                peer.receive_into(&mut rbuf[..size]);
                peer.send(&sbuf[..size]);
            }
        }
        let lat = (mpi::time() - t0) * 1e6 / (2.0 * iters as f64);
        if o.check {
            verify(&world, &rbuf, size, "multi_lat");
        }
        let mut sum = 0.0f64;
        if rank == 0 {
            world
                .process_at_rank(0)
                .reduce_into_root(&lat, &mut sum, SystemOperation::sum());
            row(size, &[sum / n as f64]);
        } else {
            world
                .process_at_rank(0)
                .reduce_into(&lat, SystemOperation::sum());
        }
    }
}
