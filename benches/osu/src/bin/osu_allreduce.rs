//! MPI_Allreduce latency: a sum over all ranks of `size` bytes of 32-bit
//! integers; reports the mean time of one allreduce over all ranks (OSU's
//! collective methodology), and checks every element of the result after
//! every size.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::traits::*;

/// Rank `r`'s element `i`.
fn element(r: i32, i: usize) -> i32 {
    ((i % 1000) as i32 + 1) * (r + 1)
}

fn main() {
    let o = Opts::parse(4, (1_000, 100), (200, 10)).without_fresh("osu_allreduce");
    let universe = init(&o);
    let world = universe.world();
    let rank = world.rank();
    let n = world.size();
    let mut sbuf = vec![0i32; o.max / 4];
    let mut rbuf = vec![0i32; o.max / 4];
    if rank == 0 {
        header("Allreduce Latency Test", &["# Size       Avg Latency(us)"]);
    }
    // sum over r of (r + 1) = n (n + 1) / 2
    let ranks_sum = n * (n + 1) / 2;
    for size in o.sizes().into_iter().filter(|s| *s >= 4) {
        let (iters, skip) = o.counts(size);
        let count = size / 4;
        for (i, x) in sbuf[..count].iter_mut().enumerate() {
            *x = element(rank, i);
        }
        rbuf[..count].fill(0);
        world.barrier();
        let t = timed(iters, skip, || {
            world.all_reduce_into(&sbuf[..count], &mut rbuf[..count], SystemOperation::sum());
        });
        if let Some(i) = (0..count).find(|&i| rbuf[i] != ((i % 1000) as i32 + 1) * ranks_sum) {
            eprintln!(
                "rank {rank}: osu_allreduce: data check FAILED for size {size} at element {i}: got {} want {}",
                rbuf[i],
                ((i % 1000) as i32 + 1) * ranks_sum
            );
            world.abort(4);
        }
        let lat = t * 1e6 / iters as f64;
        if let Some(sum) = reduce_at_root(&world, lat, SystemOperation::sum()) {
            row(size, &[sum / n as f64]);
        }
    }
    report_memory(&world);
}
