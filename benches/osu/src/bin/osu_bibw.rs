//! Bidirectional bandwidth: both ranks post a window of receives (into one
//! buffer) and a window of sends at once and wait for all of them.
use ivcom_osu::*;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(1, (100, 20), (10, 2));
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 2, "osu_bibw");
    let rank = world.rank();
    let peer = 1 - rank;
    let mut net = Net::new(&world).with_fresh(&o);
    let w = o.window;
    let copies = o.send_copies();
    let mut sbuf = Buf::new(o.max * copies);
    let mut rbuf = Buf::new(o.max);
    if rank == 0 {
        header(
            "Bi-Directional Bandwidth Test",
            &["# Size      Bandwidth (MB/s)"],
        );
    }
    for size in o.sizes().into_iter().filter(|&s| s > 0) {
        let (iters, skip) = o.counts(size);
        sbuf.fill_copies(size, copies);
        rbuf.clear(size);
        world.barrier();
        let mut touched = 0.0;
        let t = timed(iters, skip, || {
            if o.fresh {
                touched += sbuf.touch(size, copies);
            }
            net.window(Some(&sbuf), Some(&mut rbuf), size, w, peer)
        });
        let t = t - o.timed_share(touched, iters, skip);
        verify(&world, &rbuf, size, "osu_bibw");
        if rank == 0 {
            row(size, &[(2 * size * w * iters) as f64 / 1e6 / t]);
        }
    }
}
