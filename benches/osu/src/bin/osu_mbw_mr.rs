//! Multiple bandwidth / message rate: rank i of the first half streams
//! windows to rank i + n/2 of the second half, all pairs at once. Reports
//! the aggregate bandwidth (pairs x bytes moved per pair / mean sender time)
//! and the aggregate message rate.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(1, (100, 20), (10, 2));
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 0, "osu_mbw_mr");
    let rank = world.rank();
    let pairs = world.size() / 2;
    let sender = rank < pairs;
    let peer = if sender { rank + pairs } else { rank - pairs };
    let mut net = Net::new(&world).with_fresh(&o);
    let w = o.window;
    let copies = o.send_copies();
    let mut sbuf = Buf::new(o.max * copies);
    let mut rbuf = Buf::new(o.max);
    if rank == 0 {
        header(
            "Multiple Bandwidth / Message Rate Test",
            &[
                &format!("# [ pairs: {pairs} ] [ window size: {w} ]"),
                "# Size                  MB/s        Messages/s",
            ],
        );
    }
    for size in o.sizes().into_iter().filter(|&s| s > 0) {
        let (iters, skip) = o.counts(size);
        sbuf.fill_copies(size, copies);
        rbuf.clear(size);
        world.barrier();
        let mut touched = 0.0;
        let t = timed(iters, skip, || {
            if o.fresh && sender {
                touched += sbuf.touch(size, copies);
            }
            net.bw_window(sender, &sbuf, &mut rbuf, size, w, peer)
        });
        let t = if sender {
            t - o.timed_share(touched, iters, skip)
        } else {
            0.0
        };
        if !sender {
            verify(&world, &rbuf, size, "osu_mbw_mr");
        }
        if let Some(sum) = reduce_at_root(&world, t, SystemOperation::sum()) {
            let mean = sum / pairs as f64;
            let bw = (pairs as usize * size * w * iters) as f64 / 1e6 / mean;
            row(size, &[bw, bw * 1e6 / size as f64]);
        }
    }
}
