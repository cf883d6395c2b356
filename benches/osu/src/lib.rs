//! Shared parts of the OSU-methodology benchmarks: options, message sizes,
//! warm-up/iteration counts, buffers with a check pattern, and OSU's table
//! format (so existing OSU scripts parse the output).
//!
//! Methodology (as published for the OSU micro-benchmarks): sizes 0 and
//! powers of two up to 4 MiB; messages up to 8 KiB ("small") run more
//! iterations than larger ones; a warm-up precedes every measurement; time
//! is taken with `MPI_Wtime` on rank 0.

pub mod report;

use mpi::traits::*;

/// Messages larger than this use the "large" iteration counts.
pub const LARGE_MESSAGE_SIZE: usize = 8192;
/// Column layout of OSU's tables.
pub const FIELD_WIDTH: usize = 18;

/// Command-line options common to the benchmarks.
#[derive(Debug, Clone)]
pub struct Opts {
    pub min: usize,
    pub max: usize,
    /// Iterations (small, large).
    pub iters: (usize, usize),
    /// Warm-up iterations (small, large).
    pub skip: (usize, usize),
    /// Window of non-blocking operations (bandwidth tests).
    pub window: usize,
    /// Verify received data after each size.
    pub check: bool,
}

impl Opts {
    /// Parses `-m [MIN:]MAX -i ITERS -x WARMUP -W WINDOW -c` with the given
    /// defaults for (iters small, large) and (skip small, large).
    pub fn parse(iters: (usize, usize), skip: (usize, usize)) -> Opts {
        let mut o = Opts {
            min: 0,
            max: 4 << 20,
            iters,
            skip,
            window: 64,
            check: false,
        };
        let mut a = std::env::args().skip(1);
        let bad = |m: &str| -> ! {
            eprintln!("{m}\nusage: [-m [MIN:]MAX] [-i ITERS] [-x WARMUP] [-W WINDOW] [-c]");
            std::process::exit(2)
        };
        let num = |s: Option<String>| -> usize {
            s.and_then(|v| v.parse().ok())
                .unwrap_or_else(|| bad("bad number"))
        };
        while let Some(k) = a.next() {
            match k.as_str() {
                "-m" => {
                    let v = a.next().unwrap_or_else(|| bad("-m needs a value"));
                    match v.split_once(':') {
                        Some((lo, hi)) => {
                            o.min = num(Some(lo.to_string()));
                            o.max = num(Some(hi.to_string()));
                        }
                        None => o.max = num(Some(v)),
                    }
                }
                "-i" => {
                    let n = num(a.next());
                    o.iters = (n, n);
                }
                "-x" => {
                    let n = num(a.next());
                    o.skip = (n, n);
                }
                "-W" => o.window = num(a.next()).max(1),
                "-c" => o.check = true,
                _ => bad(&format!("unknown option {k}")),
            }
        }
        o
    }

    /// Sizes to run: 0 (if in range) and the powers of two in [min, max].
    pub fn sizes(&self) -> Vec<usize> {
        let mut v = Vec::new();
        if self.min == 0 {
            v.push(0);
        }
        let mut s = 1;
        while s <= self.max {
            if s >= self.min {
                v.push(s);
            }
            s *= 2;
        }
        v
    }

    /// (iterations, warm-up) for a message size.
    pub fn counts(&self, size: usize) -> (usize, usize) {
        if size > LARGE_MESSAGE_SIZE {
            (self.iters.1, self.skip.1)
        } else {
            (self.iters.0, self.skip.0)
        }
    }
}

/// Prints OSU's two header lines.
pub fn header(title: &str, columns: &str) {
    println!("# OSU MPI {title} (ivcom reimplementation of the OSU methodology)");
    println!("{columns}");
}

/// One table row: size, then values with two decimals.
pub fn row(size: usize, values: &[f64]) {
    let mut s = format!("{size:<10}");
    for v in values {
        s.push_str(&format!("{v:>w$.2}", w = FIELD_WIDTH));
    }
    println!("{s}");
}

/// The byte a sender puts at `i` for a message of `size` bytes.
#[inline]
pub fn pattern_byte(size: usize, i: usize) -> u8 {
    (i.wrapping_mul(131) ^ size.wrapping_mul(7) ^ (i >> 8)) as u8
}

/// Fills a send buffer with the check pattern.
pub fn fill(buf: &mut [u8], size: usize) {
    for (i, b) in buf[..size].iter_mut().enumerate() {
        *b = pattern_byte(size, i);
    }
}

/// Checks a received buffer; aborts the job on a mismatch.
pub fn verify<C: Communicator>(world: &C, buf: &[u8], size: usize, what: &str) {
    if let Some(i) = (0..size).find(|&i| buf[i] != pattern_byte(size, i)) {
        eprintln!(
            "rank {}: {what}: data check failed at byte {i} of {size}",
            world.rank()
        );
        world.abort(4);
    }
}
