//! Multi-threaded bandwidth / message rate (osu_mbw_mr with threads instead
//! of rank pairs): ranks 0 and 1 each run `-t` threads (default 4) under
//! `MPI_THREAD_MULTIPLE`; thread k of rank 0 streams windows to thread k of
//! rank 1 on its own communicator, all threads at once. Reports the
//! aggregate bandwidth and message rate: the bytes and messages all of rank
//! 0's threads moved, over the time from the start of their timed loops
//! (together, after every thread's warm-up) to the end of the last one.
//! (Dividing by the mean of the threads' own times instead counts time
//! twice over when the threads take turns, as they do with more threads
//! than cores: a run where each thread ran alone for a quarter of the time
//! read four times its real rate.) Every thread checks the data it
//! received.
use ivcom_osu::*;
use mpi::collective::SystemOperation;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// A communicator handle handed to one thread. MPI_THREAD_MULTIPLE allows
/// calls on it from any thread; each handle is used by one thread at a time.
#[derive(Clone, Copy)]
struct Comm(ffi::MPI_Comm);
// SAFETY: MPI_THREAD_MULTIPLE was provided (checked by `init`), and the
// communicator outlives the threads (they are scoped).
unsafe impl Send for Comm {}

fn main() {
    let o = Opts::parse_mt(1, (100, 20), (10, 2), 4);
    let universe = init(&o);
    let world = universe.world();
    require_ranks(&world, 2, "osu_mt_mr");
    let rank = world.rank();
    let sender = rank == 0;
    let peer = 1 - rank;
    let (w, nt) = (o.window, o.threads);
    // One communicator per thread: no thread can match another's messages.
    let comms: Vec<SimpleCommunicator> = (0..nt).map(|_| world.duplicate()).collect();
    if rank == 0 {
        header(
            "Multi-threaded Bandwidth / Message Rate Test",
            &[
                &format!("# [ threads per rank: {nt} ] [ window size: {w} ]"),
                "# Size                  MB/s        Messages/s",
            ],
        );
    }
    for size in o.sizes().into_iter().filter(|&s| s > 0) {
        let (iters, skip) = o.counts(size);
        world.barrier();
        // Every thread of this rank ends its warm-up before any starts the
        // clock: the timed loops run side by side.
        let warm = std::sync::Barrier::new(nt);
        let spans: Vec<(f64, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    let comm = Comm(c.as_raw());
                    let warm = &warm;
                    s.spawn(move || {
                        let comm = comm;
                        let mut net = Net::from_raw(comm.0);
                        let mut sbuf = Buf::new(size);
                        let mut rbuf = Buf::new(size);
                        sbuf.fill(size);
                        let span = timed_span(
                            iters,
                            skip,
                            || {
                                warm.wait();
                            },
                            || net.bw_window(sender, &sbuf, &mut rbuf, size, w, peer),
                        );
                        if !sender {
                            if let Some(i) = rbuf.mismatch(size) {
                                eprintln!(
                                    "osu_mt_mr: data check FAILED for size {size} at byte {i}"
                                );
                                std::process::exit(4);
                            }
                        }
                        span
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        // Rank 0's span: first start to last end (MPI_Wtime is one clock
        // for the whole process).
        let t = if sender {
            let start = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
            let end = spans.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
            end - start
        } else {
            0.0
        };
        if let Some(span) = reduce_at_root(&world, t, SystemOperation::sum()) {
            let bw = (nt * size * w * iters) as f64 / 1e6 / span;
            row(size, &[bw, bw * 1e6 / size as f64]);
        }
    }
}
