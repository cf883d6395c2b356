//! `line_probe [CPU_A CPU_B]`: the time one cache line takes to go from
//! one CPU to another and back (default CPUs 0 and 1), as the median of 5
//! batches of 4,000 round trips between two pinned threads. Prints
//! `line_rtt_ns <value>`.
//!
//! Why: a host that gives this machine's 2 virtual CPUs now two threads of
//! one core (a round trip of about 100 ns) and now cores that share no
//! cache (about 400 ns) changes every shared-memory transport's speed
//! with small messages by 2-3x, whole jobs at a time. `scripts/compare`
//! probes before each run and the report compares runs of one placement
//! (docs/PERFORMANCE.md, "Two placements of the host's CPUs").
//!
//! Never waits forever: each round trip gives up after 2 s (the other
//! thread cannot run: exit 1, no figure).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[repr(align(128))]
struct Line(AtomicU64);

const BATCHES: usize = 5;
const ROUNDS: u64 = 4_000;
const GIVE_UP: Duration = Duration::from_secs(2);
/// Written by a side that gives up, so that the other stops waiting.
const STOP: u64 = u64::MAX;

fn pin(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("no CPU {cpu}"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it (cpu checked above); sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "cannot run on CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Spins until `line` holds `want`; false after [`GIVE_UP`].
fn wait_for(line: &Line, want: u64) -> bool {
    let mut spins = 0u32;
    let mut since: Option<Instant> = None;
    loop {
        match line.0.load(Ordering::Acquire) {
            v if v == want => return true,
            STOP => return false,
            _ => {}
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(65_536) {
            let t = *since.get_or_insert_with(Instant::now);
            if t.elapsed() > GIVE_UP {
                return false;
            }
        }
        std::hint::spin_loop();
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| {
            eprintln!("usage: line_probe [CPU_A CPU_B]");
            std::process::exit(2)
        });
    let (a, b) = match args[..] {
        [] => (0, 1),
        [a, b] if a != b => (a, b),
        _ => {
            eprintln!("usage: line_probe [CPU_A CPU_B] (two different CPUs)");
            std::process::exit(2)
        }
    };
    let line = Line(AtomicU64::new(0));
    let total = BATCHES as u64 * ROUNDS;
    let result = std::thread::scope(|s| {
        let echo = s.spawn(|| -> Result<(), String> {
            if let Err(e) = pin(b) {
                line.0.store(STOP, Ordering::Release);
                return Err(e);
            }
            for i in 0..total {
                if !wait_for(&line, 2 * i + 1) {
                    return Err("the other thread stopped".into());
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
            Ok(())
        });
        let run = || -> Result<Vec<f64>, String> {
            pin(a)?;
            let mut per = Vec::with_capacity(BATCHES);
            for k in 0..BATCHES as u64 {
                let t = Instant::now();
                for i in k * ROUNDS..(k + 1) * ROUNDS {
                    line.0.store(2 * i + 1, Ordering::Release);
                    if !wait_for(&line, 2 * i + 2) {
                        return Err(format!("no answer from CPU {b} within {GIVE_UP:?}"));
                    }
                }
                per.push(t.elapsed().as_nanos() as f64 / ROUNDS as f64);
            }
            Ok(per)
        };
        let mine = run();
        if mine.is_err() {
            line.0.store(STOP, Ordering::Release);
        }
        let theirs = echo
            .join()
            .unwrap_or_else(|_| Err("echo thread panicked".into()));
        match (mine, theirs) {
            (Ok(per), Ok(())) => Ok(per),
            (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        }
    });
    match result {
        Ok(mut per) => {
            per.sort_by(f64::total_cmp);
            println!("line_rtt_ns {:.1}", per[per.len() / 2]);
        }
        Err(e) => {
            eprintln!("line_probe: {e}");
            std::process::exit(1)
        }
    }
}
