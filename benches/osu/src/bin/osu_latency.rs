//! Ping-pong latency between ranks 0 and 1, reported as half the round trip.
use ivcom_osu::*;
use mpi::traits::*;

fn main() {
    let o = Opts::parse(0, (10_000, 1_000), (1_000, 100));
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 2, "osu_latency");
    let rank = world.rank();
    let peer = 1 - rank;
    let net = Net::new(&world);
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
        let t = timed(iters, skip, || {
            net.ping_pong(rank == 0, &sbuf, &mut rbuf, size, peer)
        });
        verify(&world, &rbuf, size, "osu_latency");
        if rank == 0 {
            row(size, &[t * 1e6 / (2.0 * iters as f64)]);
        }
    }
}
