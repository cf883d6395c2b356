//! Ping-pong latency between ranks 0 and 1, reported as half the round trip.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(0, (10_000, 1_000), (1_000, 100));
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 2, "osu_latency");
    let rank = world.rank();
    let peer = 1 - rank;
    let net = Net::new(&world).with_fresh(&o);
    let mut sbuf = Buf::new(o.max);
    let mut rbuf = Buf::new(o.max);
    if rank == 0 {
        header("Latency Test", &["# Size          Latency (us)"]);
    }
    for size in o.sizes() {
        let (iters, skip) = o.counts(size);
        sbuf.fill(size);
        rbuf.clear(size);
        world.barrier();
        let mut touched = 0.0;
        let t = timed(iters, skip, || {
            touched += net.ping_pong(rank == 0, &mut sbuf, &mut rbuf, size, peer);
        });
        // Each side's writing lies on the round trip: both are taken off.
        let both = reduce_at_root(
            &world,
            o.timed_share(touched, iters, skip),
            SystemOperation::sum(),
        );
        verify(&world, &rbuf, size, "osu_latency");
        if rank == 0 {
            let t = t - both.unwrap_or(0.0);
            row(size, &[t * 1e6 / (2.0 * iters as f64)]);
        }
    }
}
