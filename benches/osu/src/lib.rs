//! Shared parts of the OSU-methodology benchmarks: options, message sizes,
//! warm-up/iteration counts, page-aligned buffers with a check pattern, the
//! timed communication kernels, and OSU's table format (so existing OSU
//! scripts parse the output).
//!
//! Methodology (as published for the OSU micro-benchmarks, reimplemented
//! here): sizes 0 (latency tests) and powers of two up to 4 MiB; messages up
//! to 8 KiB ("small") run more iterations than larger ones; warm-up
//! iterations precede the timed ones; a barrier separates sizes; time is
//! taken with `MPI_Wtime`. Bandwidth tests post a window of non-blocking
//! operations into one receive buffer and close each window with a short
//! acknowledgement.
//!
//! The timed loops call the MPI C API directly (through rsmpi's `ffi`): a
//! window of receives into one buffer aliases that buffer, which safe Rust
//! borrows cannot express, and the loops should cost what OSU's C loops cost.

pub mod report;

use mpi::datatype::traits::*;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::traits::*;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::raw::{c_int, c_void};

/// Messages larger than this use the "large" iteration counts.
pub const LARGE_MESSAGE_SIZE: usize = 8192;
/// Width of a value column in OSU's tables.
pub const FIELD_WIDTH: usize = 20;
/// Largest default message size (4 MiB).
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;
/// Default window of the bandwidth tests.
pub const WINDOW: usize = 64;
/// Tag of the measured messages and of the acknowledgements.
pub const TAG_DATA: c_int = 100;
pub const TAG_ACK: c_int = 101;

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
    /// `-c` was given (data is verified after every size in any case).
    pub check: bool,
    /// `-T`: start MPI with `MPI_THREAD_MULTIPLE` (the cost of the thread
    /// level itself, with one thread communicating).
    pub multiple: bool,
    /// `-t N`: communicating threads per rank (multi-threaded tests only;
    /// more than one implies `-T`; 0 when not given).
    pub threads: usize,
    /// `-F`: fresh data. The sender writes every cache line of a message
    /// just before it sends it, and each message of a window comes from a
    /// buffer of its own, as an application sends what it has just
    /// computed. OSU sends one unchanged buffer again and again, which a
    /// single-copy transport then reads from caches that already hold it.
    /// The time spent writing is taken off the reported figures.
    pub fresh: bool,
}

const USAGE: &str = "options:
  -m [MIN:]MAX   message sizes (default 0 or 1 : 4194304)
  -i ITERS       timed iterations for every size (or SMALL:LARGE: sizes up to / above 8 KiB)
  -x WARMUP      warm-up iterations for every size (or SMALL:LARGE)
  -W WINDOW      window of the bandwidth tests (default 64)
  -c             data check (always done after every size; accepted for OSU compatibility)
  -T             start MPI with MPI_THREAD_MULTIPLE (one thread still communicates)
  -t THREADS     communicating threads per rank (multi-threaded tests; default 4 there)
  -F             fresh data: the sender writes each message's cache lines just before
                 sending it, each message of a window from its own buffer; the writing
                 time is not counted (osu_latency, osu_bw, osu_bibw, osu_mbw_mr; OSU
                 sends one unchanged buffer)
  -h             this help";

impl Opts {
    /// Parses `-m [MIN:]MAX -i ITERS -x WARMUP -W WINDOW -c -T` with the
    /// given smallest size and defaults for (iters small, large) and (skip
    /// small, large), for a benchmark that communicates from one thread.
    pub fn parse(min: usize, iters: (usize, usize), skip: (usize, usize)) -> Opts {
        let mut o = Self::parse_or_exit(min, iters, skip);
        if o.threads > 1 {
            eprintln!("-t: this benchmark communicates from one thread (osu_mt_mr takes -t)");
            std::process::exit(2)
        }
        o.threads = 1;
        o
    }

    /// As [`Opts::parse`] for a multi-threaded benchmark: `-t` threads per
    /// rank (default `threads`), always `MPI_THREAD_MULTIPLE`.
    pub fn parse_mt(
        min: usize,
        iters: (usize, usize),
        skip: (usize, usize),
        threads: usize,
    ) -> Opts {
        let mut o = Self::parse_or_exit(min, iters, skip).without_fresh("osu_mt_mr");
        if o.threads == 0 {
            o.threads = threads;
        }
        o.multiple = true;
        o
    }

    /// Exits when `-F` was given to a program that does not take it.
    pub fn without_fresh(self, prog: &str) -> Opts {
        if self.fresh {
            eprintln!("-F: {prog} sends no fresh data (osu_latency, osu_bw, osu_bibw and osu_mbw_mr take it)");
            std::process::exit(2)
        }
        self
    }

    fn parse_or_exit(min: usize, iters: (usize, usize), skip: (usize, usize)) -> Opts {
        Self::parse_from(std::env::args().skip(1), min, iters, skip).unwrap_or_else(|e| {
            if e.is_empty() {
                println!("{USAGE}");
                std::process::exit(0)
            }
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2)
        })
    }

    /// As [`Opts::parse`] from an argument list; `Err("")` means help.
    pub fn parse_from(
        args: impl IntoIterator<Item = String>,
        min: usize,
        iters: (usize, usize),
        skip: (usize, usize),
    ) -> Result<Opts, String> {
        let mut o = Opts {
            min,
            max: MAX_MESSAGE_SIZE,
            iters,
            skip,
            window: WINDOW,
            check: false,
            multiple: false,
            threads: 0,
            fresh: false,
        };
        let mut a = args.into_iter();
        fn num(k: &str, s: Option<&str>) -> Result<usize, String> {
            let s = s.ok_or_else(|| format!("{k} needs a value"))?;
            s.parse().map_err(|_| format!("{k}: not a number: {s:?}"))
        }
        // N (every size) or SMALL:LARGE (sizes up to / above 8 KiB).
        fn pair(k: &str, s: Option<String>) -> Result<(usize, usize), String> {
            let s = s.ok_or_else(|| format!("{k} needs a value"))?;
            match s.split_once(':') {
                Some((a, b)) => Ok((num(k, Some(a))?, num(k, Some(b))?)),
                None => {
                    let n = num(k, Some(&s))?;
                    Ok((n, n))
                }
            }
        }
        while let Some(k) = a.next() {
            match k.as_str() {
                "-m" => {
                    let v = a.next().ok_or("-m needs a value")?;
                    match v.split_once(':') {
                        Some((lo, hi)) => {
                            o.min = num("-m", Some(lo))?;
                            o.max = num("-m", Some(hi))?;
                        }
                        None => o.max = num("-m", Some(&v))?,
                    }
                }
                "-i" => o.iters = pair("-i", a.next())?,
                "-x" => o.skip = pair("-x", a.next())?,
                "-W" => o.window = num("-W", a.next().as_deref())?,
                "-c" => o.check = true,
                "-T" => o.multiple = true,
                "-F" => o.fresh = true,
                "-t" => {
                    o.threads = num("-t", a.next().as_deref())?;
                    if o.threads == 0 {
                        return Err("-t must be at least 1".into());
                    }
                }
                "-h" | "--help" => return Err(String::new()),
                _ => return Err(format!("unknown option {k}")),
            }
        }
        if o.min > o.max {
            return Err(format!("-m: MIN {} > MAX {}", o.min, o.max));
        }
        if o.max > i32::MAX as usize {
            return Err("-m: MAX too large".into());
        }
        if o.iters.0 == 0 || o.iters.1 == 0 || o.window == 0 {
            return Err("-i and -W must be at least 1".into());
        }
        if o.threads > 1 {
            o.multiple = true;
        }
        Ok(o)
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

    /// How many messages of one window need a send buffer of their own:
    /// the window with `-F`, otherwise one buffer serves them all.
    pub fn send_copies(&self) -> usize {
        if self.fresh {
            self.window
        } else {
            1
        }
    }

    /// The part of `touched` (seconds of writing over the warm-up and the
    /// timed iterations) that fell in the timed ones: the writing takes
    /// the same time each iteration, and `timed` does not count the
    /// warm-up.
    pub fn timed_share(&self, touched: f64, iters: usize, skip: usize) -> f64 {
        touched * iters as f64 / (iters + skip) as f64
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

/// Starts MPI: with `MPI_THREAD_MULTIPLE` when the options ask for it
/// (exits if the library cannot provide it), otherwise as `MPI_Init` does.
pub fn init(o: &Opts) -> mpi::environment::Universe {
    if !o.multiple {
        return mpi::initialize().expect("MPI init");
    }
    let (universe, level) =
        mpi::initialize_with_threading(mpi::Threading::Multiple).expect("MPI init");
    if level != mpi::Threading::Multiple {
        eprintln!("this MPI provides {level:?}, not MPI_THREAD_MULTIPLE");
        std::process::exit(2);
    }
    universe
}

/// Prints OSU's header: the title line and the given column line(s).
pub fn header(title: &str, columns: &[&str]) {
    println!("# OSU MPI {title} (ivcom-osu: OSU methodology, Rust/rsmpi)");
    for c in columns {
        println!("{c}");
    }
}

/// Decimals of the values a row prints: OSU's two, or `IVCOM_OSU_DIGITS`
/// (0 to 6). Latencies of a tenth of a microsecond printed with two
/// decimals resolve a ratio to 10 % only (0.10 against 0.11), so
/// `scripts/compare` asks for three.
pub fn digits() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("IVCOM_OSU_DIGITS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&d| d <= 6)
            .unwrap_or(2)
    })
}

/// One table row as OSU prints it: size left-aligned in 10 columns, then
/// values right-aligned with [`digits`] decimals.
pub fn format_row(size: usize, values: &[f64]) -> String {
    format_row_with(size, values, digits())
}

/// [`format_row`] with `digits` decimals.
pub fn format_row_with(size: usize, values: &[f64], digits: usize) -> String {
    let mut s = format!("{size:<10}");
    for v in values {
        s.push_str(&format!("{v:>w$.digits$}", w = FIELD_WIDTH));
    }
    s
}

/// Prints a row and flushes (a killed run keeps the rows it finished).
pub fn row(size: usize, values: &[f64]) {
    use std::io::Write;
    println!("{}", format_row(size, values));
    let _ = std::io::stdout().flush();
}

/// Exits unless the job has exactly `n` ranks (or, with `n == 0`, an even
/// number of at least 2).
pub fn require_ranks<C: Communicator>(world: &C, n: i32, prog: &str) {
    let size = world.size();
    let ok = if n == 0 {
        size >= 2 && size % 2 == 0
    } else {
        size == n
    };
    if !ok {
        if world.rank() == 0 {
            if n == 0 {
                eprintln!("{prog} needs an even number of ranks (got {size})");
            } else {
                eprintln!("{prog} needs exactly {n} ranks (got {size})");
            }
        }
        world.abort(2);
    }
}

/// The byte a sender puts at `i` for a message of `size` bytes; never 0
/// (receive buffers are zeroed before each size).
#[inline]
pub fn pattern_byte(size: usize, i: usize) -> u8 {
    ((i.wrapping_mul(131) ^ size.wrapping_mul(7) ^ (i >> 8)) % 255 + 1) as u8
}

/// A zeroed, page-aligned buffer (as OSU aligns its buffers).
pub struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    const ALIGN: usize = 4096;

    pub fn new(len: usize) -> Buf {
        let layout = Layout::from_size_align(len.max(1), Self::ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Buf { ptr, len }
    }

    /// Fills the first `size` bytes with the check pattern.
    pub fn fill(&mut self, size: usize) {
        for (i, b) in self[..size].iter_mut().enumerate() {
            *b = pattern_byte(size, i);
        }
    }

    /// Fills `copies` consecutive messages of `size` bytes with the check
    /// pattern (the send buffers of a window with `-F`).
    pub fn fill_copies(&mut self, size: usize, copies: usize) {
        for k in 0..copies {
            for (i, b) in self[k * size..(k + 1) * size].iter_mut().enumerate() {
                *b = pattern_byte(size, i);
            }
        }
    }

    /// Writes one byte of every cache line of `copies` consecutive messages
    /// of `size` bytes (the byte the pattern already holds, so the data
    /// check still holds): the lines are then modified in this core's
    /// cache, as after an application computed them, and a transport must
    /// move them from here. Returns the seconds it took, which the timed
    /// loops take off their time: they report what the transport took.
    pub fn touch(&mut self, size: usize, copies: usize) -> f64 {
        assert!(size * copies <= self.len);
        let t0 = std::time::Instant::now();
        for k in 0..copies {
            for i in (0..size).step_by(64) {
                // SAFETY: in bounds (asserted above); a volatile write, so
                // the compiler keeps the store of a value already there.
                unsafe {
                    self.ptr
                        .add(k * size + i)
                        .write_volatile(pattern_byte(size, i))
                };
            }
        }
        t0.elapsed().as_secs_f64()
    }

    /// Zeroes the first `size` bytes.
    pub fn clear(&mut self, size: usize) {
        self[..size].fill(0);
    }

    /// Index of the first byte of `[..size]` that differs from the pattern.
    pub fn mismatch(&self, size: usize) -> Option<usize> {
        (0..size).find(|&i| self[i] != pattern_byte(size, i))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), Self::ALIGN).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Checks the first `size` bytes of a received buffer; aborts the job on a
/// mismatch.
pub fn verify<C: Communicator>(world: &C, buf: &Buf, size: usize, what: &str) {
    if let Some(i) = buf.mismatch(size) {
        eprintln!(
            "rank {}: {what}: data check FAILED for size {size} at byte {i}: got {} want {}",
            world.rank(),
            buf[i],
            pattern_byte(size, i)
        );
        world.abort(4);
    }
}

fn check_rc(rc: c_int, what: &str) {
    // MPI_ERRORS_ARE_FATAL is the default: a failure normally never returns.
    if rc != 0 {
        eprintln!("{what} failed: MPI error {rc}");
        std::process::exit(3);
    }
}

/// Runs `body` `skip` times as warm-up, then `iters` times timed; returns
/// the seconds (`MPI_Wtime`) the timed iterations took.
pub fn timed(iters: usize, skip: usize, body: impl FnMut()) -> f64 {
    let (t0, t1) = timed_span(iters, skip, || {}, body);
    t1 - t0
}

/// [`timed`], calling `ready` between the warm-up and the start of the
/// clock (e.g. to wait for other threads' warm-ups); returns the
/// `MPI_Wtime` at the start and at the end of the timed iterations.
pub fn timed_span(
    iters: usize,
    skip: usize,
    ready: impl FnOnce(),
    mut body: impl FnMut(),
) -> (f64, f64) {
    for _ in 0..skip {
        body();
    }
    ready();
    let t0 = mpi::time();
    for _ in 0..iters {
        body();
    }
    (t0, mpi::time())
}

/// The point-to-point operations of the timed loops on one communicator.
pub struct Net {
    comm: ffi::MPI_Comm,
    byte: ffi::MPI_Datatype,
    reqs: Vec<ffi::MPI_Request>,
    ack: [u8; 4],
    /// `-F`: message k of a window is sent from `k * size` of the buffer.
    fresh: bool,
}

impl Net {
    pub fn new<C: AsRaw<Raw = ffi::MPI_Comm>>(comm: &C) -> Net {
        Self::from_raw(comm.as_raw())
    }

    /// On a raw communicator handle (one thread's own communicator).
    pub fn from_raw(comm: ffi::MPI_Comm) -> Net {
        Net {
            comm,
            byte: u8::equivalent_datatype().as_raw(),
            reqs: Vec::new(),
            ack: [0; 4],
            fresh: false,
        }
    }

    /// With `-F`, message k of a window goes from `k * size` of the send
    /// buffer (which holds a window of messages: [`Opts::send_copies`]).
    pub fn with_fresh(mut self, o: &Opts) -> Net {
        self.fresh = o.fresh;
        self
    }

    /// Blocking send of `buf[..size]`.
    pub fn send(&self, buf: &Buf, size: usize, peer: i32, tag: c_int) {
        assert!(size <= buf.len);
        // SAFETY: the buffer holds `size` bytes and outlives the call.
        unsafe { self.send_raw(buf.ptr, size, peer, tag) }
    }

    /// Blocking receive into `buf[..size]`.
    pub fn recv(&self, buf: &mut Buf, size: usize, peer: i32, tag: c_int) {
        assert!(size <= buf.len);
        // SAFETY: the buffer holds `size` writable bytes and outlives the call.
        unsafe { self.recv_raw(buf.ptr, size, peer, tag) }
    }

    /// # Safety
    /// `ptr` must be valid for reads of `size` bytes during the call.
    unsafe fn send_raw(&self, ptr: *const u8, size: usize, peer: i32, tag: c_int) {
        // SAFETY: the caller's contract.
        let rc = unsafe {
            ffi::MPI_Send(
                ptr as *const c_void,
                size as c_int,
                self.byte,
                peer,
                tag,
                self.comm,
            )
        };
        check_rc(rc, "MPI_Send");
    }

    /// # Safety
    /// `ptr` must be valid for writes of `size` bytes during the call.
    unsafe fn recv_raw(&self, ptr: *mut u8, size: usize, peer: i32, tag: c_int) {
        // SAFETY: the caller's contract.
        let rc = unsafe {
            ffi::MPI_Recv(
                ptr as *mut c_void,
                size as c_int,
                self.byte,
                peer,
                tag,
                self.comm,
                ffi::RSMPI_STATUS_IGNORE,
            )
        };
        check_rc(rc, "MPI_Recv");
    }

    /// Starts `n` non-blocking operations with `start` (which fills in the
    /// request) and keeps their requests for the next wait.
    fn post(
        &mut self,
        n: usize,
        what: &str,
        mut start: impl FnMut(*mut ffi::MPI_Request) -> c_int,
    ) {
        for _ in 0..n {
            let mut req = std::mem::MaybeUninit::uninit();
            check_rc(start(req.as_mut_ptr()), what);
            // SAFETY: initialised by the successful call above.
            self.reqs.push(unsafe { req.assume_init() });
        }
    }

    /// One ping-pong of `size` bytes with `peer`: the `first` side sends
    /// first, the other answers (with `-F`, each writes its message's cache
    /// lines just before it sends). Returns the seconds spent writing them.
    #[inline]
    pub fn ping_pong(
        &self,
        first: bool,
        sbuf: &mut Buf,
        rbuf: &mut Buf,
        size: usize,
        peer: i32,
    ) -> f64 {
        if !first {
            self.recv(rbuf, size, peer, 1);
        }
        let touched = if self.fresh { sbuf.touch(size, 1) } else { 0.0 };
        self.send(sbuf, size, peer, 1);
        if first {
            self.recv(rbuf, size, peer, 1);
        }
        touched
    }

    /// Posts `n` receives of `size` bytes into the same buffer and/or `n`
    /// sends of `buf[..size]` (with `-F`, send k of `buf[k * size..]`;
    /// receives first, as a window), then waits for all of them.
    pub fn window(
        &mut self,
        send: Option<&Buf>,
        recv: Option<&mut Buf>,
        size: usize,
        n: usize,
        peer: i32,
    ) {
        self.reqs.clear();
        self.reqs.reserve(2 * n);
        let (byte, comm) = (self.byte, self.comm);
        if let Some(r) = recv {
            assert!(size <= r.len);
            // SAFETY: `r` holds `size` bytes and stays borrowed until the wait
            // below completes every request. All receives of a window land in
            // the same buffer, as in OSU.
            self.post(n, "MPI_Irecv", |req| unsafe {
                ffi::MPI_Irecv(
                    r.ptr as *mut c_void,
                    size as c_int,
                    byte,
                    peer,
                    TAG_DATA,
                    comm,
                    req,
                )
            });
        }
        if let Some(s) = send {
            let stride = if self.fresh { size } else { 0 };
            assert!(size + (n - 1) * stride <= s.len);
            let mut k = 0;
            // SAFETY: `s` holds the `n` messages (asserted) and stays
            // borrowed until the wait below completes every request.
            self.post(n, "MPI_Isend", |req| unsafe {
                k += 1;
                ffi::MPI_Isend(
                    s.ptr.add((k - 1) * stride) as *const c_void,
                    size as c_int,
                    byte,
                    peer,
                    TAG_DATA,
                    comm,
                    req,
                )
            });
        }
        // SAFETY: every request in `reqs` is live; statuses are ignored.
        let rc = unsafe {
            ffi::MPI_Waitall(
                self.reqs.len() as c_int,
                self.reqs.as_mut_ptr(),
                ffi::RSMPI_STATUSES_IGNORE,
            )
        };
        check_rc(rc, "MPI_Waitall");
    }

    /// One window of a unidirectional bandwidth test: the sender streams
    /// `w` messages and waits for the receiver's 4-byte acknowledgement.
    pub fn bw_window(
        &mut self,
        sender: bool,
        sbuf: &Buf,
        rbuf: &mut Buf,
        size: usize,
        w: usize,
        peer: i32,
    ) {
        let ack = self.ack.as_mut_ptr();
        if sender {
            self.window(Some(sbuf), None, size, w, peer);
            // SAFETY: `ack` points to 4 bytes of self, alive during the call.
            unsafe { self.recv_raw(ack, 4, peer, TAG_ACK) };
        } else {
            self.window(None, Some(rbuf), size, w, peer);
            // SAFETY: as above.
            unsafe { self.send_raw(ack, 4, peer, TAG_ACK) };
        }
    }
}

/// A `kB` field of a `/proc` status-style file (0 when absent).
fn proc_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `value` of every rank combined with `op` at rank 0: `Some(result)` there,
/// `None` on the other ranks.
pub fn reduce_at_root<C, T>(world: &C, value: T, op: mpi::collective::SystemOperation) -> Option<T>
where
    C: Communicator,
    T: Equivalence + Default,
{
    let root = world.process_at_rank(0);
    if world.rank() == 0 {
        let mut out = T::default();
        root.reduce_into_root(&value, &mut out, op);
        Some(out)
    } else {
        root.reduce_into(&value, op);
        None
    }
}

/// Prints, from rank 0 after a barrier (every rank still holds all its
/// memory), a comment line with the host's shared memory (`Shmem` of
/// `/proc/meminfo`: shared-memory segments and rings of every process) and
/// the largest peak resident set of any rank (`VmHWM`, shared pages it
/// touched included): `# memory shmem_kib=N max_rank_hwm_kib=M`.
pub fn report_memory<C: Communicator>(world: &C) {
    use mpi::collective::SystemOperation;
    let hwm = proc_kib("/proc/self/status", "VmHWM:");
    world.barrier();
    if let Some(max) = reduce_at_root(world, hwm, SystemOperation::max()) {
        let shmem = proc_kib("/proc/meminfo", "Shmem:");
        println!("# memory shmem_kib={shmem} max_rank_hwm_kib={max}");
    }
    world.barrier();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_and_sizes() {
        let o = Opts::parse_from(args(""), 0, (10_000, 1_000), (1_000, 100)).unwrap();
        let s = o.sizes();
        assert_eq!(s.first(), Some(&0));
        assert_eq!(s.last(), Some(&(4 << 20)));
        assert_eq!(s.len(), 24);
        assert_eq!(o.counts(8192), (10_000, 1_000));
        assert_eq!(o.counts(16384), (1_000, 100));
        let o =
            Opts::parse_from(args("-m 1024:65536 -i 7 -x 2 -W 8 -c"), 1, (1, 1), (1, 1)).unwrap();
        assert_eq!(o.sizes(), vec![1024, 2048, 4096, 8192, 16384, 32768, 65536]);
        assert_eq!(
            (o.counts(1), o.counts(1 << 20), o.window),
            ((7, 2), (7, 2), 8)
        );
        let o = Opts::parse_from(args("-m 16"), 1, (1, 1), (1, 1)).unwrap();
        assert_eq!(o.sizes(), vec![1, 2, 4, 8, 16]);
        let o = Opts::parse_from(args("-i 500:20 -x 50:2"), 0, (1, 1), (1, 1)).unwrap();
        assert_eq!((o.counts(8192), o.counts(16384)), ((500, 50), (20, 2)));
        assert!(Opts::parse_from(args("-m 9:3"), 0, (1, 1), (1, 1)).is_err());
        assert!(Opts::parse_from(args("-q"), 0, (1, 1), (1, 1)).is_err());
        assert!(Opts::parse_from(args("-i x"), 0, (1, 1), (1, 1)).is_err());
        let o = Opts::parse_from(args("-T"), 0, (1, 1), (1, 1)).unwrap();
        assert!(o.multiple && o.threads == 0);
        let o = Opts::parse_from(args("-t 4"), 0, (1, 1), (1, 1)).unwrap();
        assert!(o.multiple && o.threads == 4);
        assert!(Opts::parse_from(args("-t 0"), 0, (1, 1), (1, 1)).is_err());
    }

    #[test]
    fn rows_look_like_osu() {
        assert_eq!(
            format_row_with(8, &[0.25], 2),
            "8                         0.25"
        );
        assert_eq!(
            format_row_with(8, &[0.1049], 3),
            "8                        0.105"
        );
        assert_eq!(format_row(4194304, &[1.0, 2.5]).len(), 50);
    }

    #[test]
    fn pattern_is_never_zero_and_buffers_check() {
        assert!((0..70_000).all(|i| pattern_byte(4096, i) != 0));
        let mut b = Buf::new(1 << 16);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        b.fill(1000);
        assert_eq!(b.mismatch(1000), None);
        b[999] ^= 1;
        assert_eq!(b.mismatch(1000), Some(999));
        b.clear(1000);
        assert_eq!(b.mismatch(1000), Some(0));
        assert_eq!(b.mismatch(0), None);
    }

    #[test]
    fn fresh_data_keeps_the_pattern_in_every_copy() {
        let o = Opts::parse_from(args("-W 8 -F"), 1, (1, 1), (1, 1)).unwrap();
        assert!(o.fresh);
        assert_eq!(o.send_copies(), 8);
        let plain = Opts::parse_from(args("-W 8"), 1, (1, 1), (1, 1)).unwrap();
        assert_eq!(plain.send_copies(), 1);
        assert_eq!(o.timed_share(3.0, 20, 10), 2.0);
        let size = 1000;
        let mut b = Buf::new(size * 8);
        b.fill_copies(size, 8);
        assert!(b.touch(size, 8) >= 0.0);
        for k in 0..8 {
            let copy = &b[k * size..(k + 1) * size];
            assert!(
                copy.iter()
                    .enumerate()
                    .all(|(i, &v)| v == pattern_byte(size, i)),
                "copy {k}"
            );
        }
    }
}
