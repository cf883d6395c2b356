//! Bidirectional bandwidth: both ranks send and receive a window at once.
use ivcom_osu::*;
use mpi::traits::*;

fn main() {
    let o = Opts::parse((100, 20), (10, 2));
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    if world.size() != 2 {
        if world.rank() == 0 {
            eprintln!("osu_bibw needs exactly 2 ranks");
        }
        world.abort(2);
    }
    let rank = world.rank();
    let peer = world.process_at_rank(1 - rank);
    let w = o.window;
    let mut sbuf = vec![0u8; o.max.max(1)];
    let mut rbufs: Vec<Vec<u8>> = (0..w).map(|_| vec![0u8; o.max.max(1)]).collect();
    if rank == 0 {
        header(
            "Bi-Directional Bandwidth Test",
            "# Size      Bandwidth (MB/s)",
        );
    }
    for size in o.sizes().into_iter().filter(|&s| s > 0) {
        let (iters, skip) = o.counts(size);
        fill(&mut sbuf, size);
        world.barrier();
        let mut t0 = 0.0;
        for i in 0..iters + skip {
            if i == skip {
                t0 = mpi::time();
            }
            mpi::request::multiple_scope(2 * w, |scope, coll| {
                for b in rbufs.iter_mut() {
                    coll.add(peer.immediate_receive_into(scope, &mut b[..size]));
                }
                for _ in 0..w {
                    coll.add(peer.immediate_send(scope, &sbuf[..size]));
                }
                let mut st = Vec::new();
                coll.wait_all(&mut st);
            });
        }
        let t = mpi::time() - t0;
        if o.check {
            for b in &rbufs {
                verify(&world, b, size, "bibw");
            }
        }
        if rank == 0 {
            row(size, &[(2 * size * w * iters) as f64 / t / 1e6]);
        }
    }
}
