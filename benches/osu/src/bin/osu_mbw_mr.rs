//! Multiple bandwidth / message rate: rank i (first half) streams windows to
//! rank i + n/2 (second half), all pairs at once. Reports the aggregate.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

fn main() {
    let o = Opts::parse((100, 20), (10, 2));
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    let n = world.size();
    if n < 2 || n % 2 != 0 {
        if world.rank() == 0 {
            eprintln!("osu_mbw_mr needs an even number of ranks");
        }
        world.abort(2);
    }
    let rank = world.rank();
    let pairs = n / 2;
    let sender = rank < pairs;
    let peer = world.process_at_rank(if sender { rank + pairs } else { rank - pairs });
    let w = o.window;
    let mut sbuf = vec![0u8; o.max.max(1)];
    let mut rbufs: Vec<Vec<u8>> = (0..w).map(|_| vec![0u8; o.max.max(1)]).collect();
    if rank == 0 {
        header(
            "Multiple Bandwidth / Message Rate Test",
            "# [ pairs: N ] [ window size: W ]",
        );
        println!("# [ pairs: {pairs} ] [ window size: {w} ]");
        println!("# Size                  MB/s        Messages/s");
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
            if sender {
                mpi::request::multiple_scope(w, |scope, coll| {
                    for _ in 0..w {
                        coll.add(peer.immediate_send(scope, &sbuf[..size]));
                    }
                    let mut st = Vec::new();
                    coll.wait_all(&mut st);
                });
                let mut ack = [0u8; 4];
                peer.receive_into(&mut ack[..]);
            } else {
                mpi::request::multiple_scope(w, |scope, coll| {
                    for b in rbufs.iter_mut() {
                        coll.add(peer.immediate_receive_into(scope, &mut b[..size]));
                    }
                    let mut st = Vec::new();
                    coll.wait_all(&mut st);
                });
                peer.send(&[0u8; 4][..]);
            }
        }
        let t = mpi::time() - t0;
        if o.check && !sender {
            for b in &rbufs {
                verify(&world, b, size, "mbw_mr");
            }
        }
        let mine = if sender {
            (size * w * iters) as f64 / t / 1e6
        } else {
            0.0
        };
        let mut total = 0.0f64;
        if rank == 0 {
            world
                .process_at_rank(0)
                .reduce_into_root(&mine, &mut total, SystemOperation::sum());
            row(size, &[total, total * 1e6 / size as f64]);
        } else {
            world
                .process_at_rank(0)
                .reduce_into(&mine, SystemOperation::sum());
        }
    }
}
