//! Latency of several pairs at once: rank i of the first half ping-pongs
//! with rank i + n/2; reports the mean half round trip over all ranks.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(0, (10_000, 1_000), (1_000, 100)).without_fresh("osu_multi_lat");
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 0, "osu_multi_lat");
    let rank = world.rank();
    let n = world.size();
    let pairs = n / 2;
    let first = rank < pairs;
    let peer = if first { rank + pairs } else { rank - pairs };
    let net = Net::new(&world);
    let mut sbuf = Buf::new(o.max);
    let mut rbuf = Buf::new(o.max);
    if rank == 0 {
        header("Multi Latency Test", &["# Size          Latency (us)"]);
    }
    for size in o.sizes() {
        let (iters, skip) = o.counts(size);
        sbuf.fill(size);
        rbuf.clear(size);
        world.barrier();
        let t = timed(iters, skip, || {
            net.ping_pong(first, &mut sbuf, &mut rbuf, size, peer);
        });
        let lat = t * 1e6 / (2.0 * iters as f64);
        verify(&world, &rbuf, size, "osu_multi_lat");
        if let Some(sum) = reduce_at_root(&world, lat, SystemOperation::sum()) {
            row(size, &[sum / n as f64]);
        }
    }
}
