//! Unidirectional bandwidth: rank 0 posts a window of non-blocking sends,
//! rank 1 the matching receives (into one buffer); a 4-byte
//! acknowledgement closes each window.
use ivcom_osu::*;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(1, (100, 20), (10, 2));
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 2, "osu_bw");
    let rank = world.rank();
    let peer = 1 - rank;
    let mut net = Net::new(&world).with_fresh(&o);
    let w = o.window;
    let copies = o.send_copies();
    let mut sbuf = Buf::new(o.max * copies);
    let mut rbuf = Buf::new(o.max);
    if rank == 0 {
        header("Bandwidth Test", &["# Size      Bandwidth (MB/s)"]);
    }
    for size in o.sizes().into_iter().filter(|&s| s > 0) {
        let (iters, skip) = o.counts(size);
        sbuf.fill_copies(size, copies);
        rbuf.clear(size);
        world.barrier();
        let mut touched = 0.0;
        let t = timed(iters, skip, || {
            if o.fresh && rank == 0 {
                touched += sbuf.touch(size, copies);
            }
            net.bw_window(rank == 0, &sbuf, &mut rbuf, size, w, peer)
        });
        let t = t - o.timed_share(touched, iters, skip);
        if rank == 1 {
            verify(&world, &rbuf, size, "osu_bw");
        }
        if rank == 0 {
            row(size, &[(size * w * iters) as f64 / 1e6 / t]);
        }
    }
}
