//! MPI_Alltoall latency: every rank sends a block of each size to every
//! rank; reports the mean time of one alltoall over all ranks (OSU's
//! collective methodology), and checks every received block, byte by byte,
//! after every size.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

/// The byte rank `src` puts at `i` of its block for rank `dst`; never 0.
fn block_byte(src: i32, dst: i32, size: usize, i: usize) -> u8 {
    ((pattern_byte(size, i) as usize + src as usize * 37 + dst as usize * 11) % 255 + 1) as u8
}

fn main() {
    let o = Opts::parse(1, (1_000, 100), (200, 10)).without_fresh("osu_alltoall");
    let universe = init(&o);
    let world = universe.world();
    let rank = world.rank();
    let n = world.size();
    let blocks = n as usize;
    let mut sbuf = vec![0u8; o.max * blocks];
    let mut rbuf = vec![0u8; o.max * blocks];
    if rank == 0 {
        header(
            "All-to-All Personalized Exchange Latency Test",
            &["# Size       Avg Latency(us)"],
        );
    }
    for size in o.sizes() {
        let (iters, skip) = o.counts(size);
        for dst in 0..n {
            let b = &mut sbuf[dst as usize * size..(dst as usize + 1) * size];
            for (i, x) in b.iter_mut().enumerate() {
                *x = block_byte(rank, dst, size, i);
            }
        }
        rbuf[..size * blocks].fill(0);
        world.barrier();
        let t = timed(iters, skip, || {
            world.all_to_all_into(&sbuf[..size * blocks], &mut rbuf[..size * blocks]);
        });
        for src in 0..n {
            let b = &rbuf[src as usize * size..(src as usize + 1) * size];
            if let Some(i) = (0..size).find(|&i| b[i] != block_byte(src, rank, size, i)) {
                eprintln!(
                    "rank {rank}: osu_alltoall: data check FAILED for size {size}, block from rank {src}, byte {i}"
                );
                world.abort(4);
            }
        }
        let lat = t * 1e6 / iters as f64;
        if let Some(sum) = reduce_at_root(&world, lat, SystemOperation::sum()) {
            row(size, &[sum / n as f64]);
        }
    }
    report_memory(&world);
}
