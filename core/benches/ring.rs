//! Ring benchmarks between two processes on two cores, each beside the
//! machine's own limit measured in the same run:
//!
//! - one-way latency of 8-byte records (ping-pong round trip / 2, polling,
//!   no doorbell sleeps) vs a raw cache-line ping-pong between the same two
//!   processes on the same cores;
//! - streaming throughput of 64 KiB records (producer copies in with
//!   reserve/commit, consumer copies every byte out) vs a single-core memcpy
//!   of 64 KiB chunks;
//! - round trips of a 56 KiB message copied into the ring and out again,
//!   as one record or in 16 KiB records (the receiver copies one out while
//!   the sender copies the next in), vs one copy out of a shared buffer
//!   that is never written (single-copy shared memory in a ping-pong that
//!   sends the same buffer again and again) or that the sender rewrites
//!   before each message.
//!
//! - a receive queue (many producers, one consumer; one producer here)
//!   beside a ring in the same run: 8-byte round trips, and streams of
//!   records of the eager size (8 KiB + 128 B) through a 64 KiB data area
//!   (what a queue per peer domain has on Xen's default grant pool).
//!
//! The parent is pinned to CPU 0, a forked child to CPU 1; the rings live in
//! a shared anonymous mapping (`ring::init` + `Producer`/`Consumer`, as the
//! channel sets them up in a region from the hypervisor backend). A summary
//! line per pair prints the ratio against its baseline. Run with
//! `cargo bench -p ivcom-core` (about a minute).

use criterion::{black_box, Criterion, Throughput};
use ivcom_core::queue;
use ivcom_core::ring::{self, kind, Consumer, Geometry, Producer, Record};
use std::cell::RefCell;
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PARENT_CPU: usize = 0;
const CHILD_CPU: usize = 1;
const CHUNK: usize = 64 << 10;

// ---------------------------------------------------------------------------
// Processes and shared memory

fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// A zeroed shared anonymous mapping, inherited by forked children.
struct Shm {
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    fn new(len: usize) -> Shm {
        // SAFETY: anonymous shared mapping; checked for failure.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Shm { ptr: p.cast(), len }
    }

    /// A word of the mapping (8-aligned offset).
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off & 7 == 0);
        // SAFETY: in bounds and aligned; atomics on shared memory are valid.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A forked child process running `f` pinned to `CHILD_CPU`.
struct Child(libc::pid_t);

impl Child {
    fn spawn(f: impl FnOnce()) -> Child {
        // SAFETY: the bench is single-threaded; the child only runs `f`
        // (atomics on the shared mapping and copies) and then _exits without
        // returning into the harness.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                pin(CHILD_CPU);
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
                // SAFETY: leave the child without running the parent's atexit
                // handlers or destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            pid => Child(pid),
        }
    }

    fn wait(self) {
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(self.0, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed: status {status:#x}"
        );
        std::mem::forget(self);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Only on a panic in the parent: do not leave a spinning child.
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, ptr::null_mut(), 0);
        }
    }
}

/// The next record of `rx`, spinning until one is published.
fn next_record(rx: &mut Consumer) -> Record {
    loop {
        if let Some(r) = rx.peek().unwrap() {
            return r;
        }
        std::hint::spin_loop();
    }
}

/// Ring space for a record of `len` bytes, spinning while the ring is full.
fn reserve_spin(tx: &mut Producer, len: usize) -> *mut u8 {
    loop {
        if let Some(p) = tx.reserve(len).unwrap() {
            return p;
        }
        std::hint::spin_loop();
    }
}

/// Timings of one benchmark for the summary: besides criterion's samples,
/// each sample is cut into short batches of `batch` iterations whose
/// per-iteration times are kept. On a loaded machine (the two cores are
/// shared with other work) a long sample nearly always includes a time slice
/// lost to another process, which says nothing about the ring; a batch that
/// ran without interruption does, so the summary quotes a low percentile of
/// the batches next to the median.
#[derive(Clone)]
struct Samples {
    batch: u64,
    per_iter: Rc<RefCell<Vec<f64>>>,
}

impl Samples {
    fn new(batch: u64) -> Samples {
        Samples {
            batch,
            per_iter: Rc::default(),
        }
    }

    /// Runs `iters` iterations of `f`, recording batch times; returns the
    /// total time for criterion.
    fn run(&self, iters: u64, mut f: impl FnMut()) -> Duration {
        let start = Instant::now();
        let mut t = start;
        let mut k = 0;
        let mut v = self.per_iter.borrow_mut();
        for _ in 0..iters {
            f();
            k += 1;
            if k == self.batch {
                let now = Instant::now();
                v.push((now - t).as_nanos() as f64 / k as f64);
                t = now;
                k = 0;
            }
        }
        start.elapsed()
    }

    /// The `q` quantile of the per-iteration batch times, in nanoseconds.
    fn quantile_ns(&self, q: f64) -> f64 {
        let mut v = self.per_iter.borrow().clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * q) as usize]
    }
}

// ---------------------------------------------------------------------------
// (a) 8-byte ring ping-pong

fn ring_ping_pong(c: &mut Criterion, out: &Samples) {
    let geo = Geometry::new(64 << 10).unwrap();
    let rb = geo.ring_bytes();
    let shm = Shm::new(2 * rb);
    let (a, b) = (shm.ptr, shm.ptr.wrapping_add(rb));
    // SAFETY: fresh private mapping of two rings, page aligned.
    unsafe {
        ring::init(a, geo, 1);
        ring::init(b, geo, 2);
    }
    let child = Child::spawn(|| {
        // SAFETY: the child is the only consumer of A and producer of B.
        let (mut rx, mut tx) = unsafe {
            (
                Consumer::new(a, geo).unwrap(),
                Producer::new(b, geo).unwrap(),
            )
        };
        loop {
            let rec = next_record(&mut rx);
            // SAFETY: an 8-byte record, valid until release.
            let v = unsafe { ptr::read_unaligned(rec.ptr as *const u64) };
            let k = rec.kind;
            rx.release_flush();
            if k == kind::CTRL {
                break;
            }
            let p = tx.reserve(8).unwrap().expect("one record in flight");
            // SAFETY: 8 reserved bytes.
            unsafe { ptr::write_unaligned(p as *mut u64, v) };
            tx.commit(8, kind::MSG, 0);
        }
    });
    // SAFETY: the parent is the only producer of A and consumer of B.
    let (mut tx, mut rx) = unsafe {
        (
            Producer::new(a, geo).unwrap(),
            Consumer::new(b, geo).unwrap(),
        )
    };
    let mut seq = 0u64;
    let samples = out.clone();
    c.bench_function("ring 8-byte round trip (2 processes)", |bch| {
        bch.iter_custom(|iters| {
            samples.run(iters, || {
                seq += 1;
                let p = tx.reserve(8).unwrap().expect("one record in flight");
                // SAFETY: 8 reserved bytes.
                unsafe { ptr::write_unaligned(p as *mut u64, seq) };
                tx.commit(8, kind::MSG, 0);
                let rec = next_record(&mut rx);
                // SAFETY: an 8-byte record, valid until release.
                let v = unsafe { ptr::read_unaligned(rec.ptr as *const u64) };
                assert_eq!(v, seq);
                rx.release_flush();
            })
        })
    });
    tx.push(kind::CTRL, 0, &[&[0; 8]]).unwrap().unwrap();
    child.wait();
}

// ---------------------------------------------------------------------------
// (b) raw cache-line ping-pong

fn line_ping_pong(c: &mut Criterion, out: &Samples) {
    let shm = Shm::new(4096);
    // Two flags on separate cache lines (128 bytes apart: not even adjacent
    // lines, which some prefetchers fetch in pairs).
    const PING: usize = 0;
    const PONG: usize = 128;
    let child = Child::spawn(|| {
        let (ping, pong) = (shm.word(PING), shm.word(PONG));
        let mut last = 0;
        loop {
            let v = ping.load(Ordering::Acquire);
            if v == last {
                std::hint::spin_loop();
                continue;
            }
            if v == u64::MAX {
                break;
            }
            last = v;
            pong.store(v, Ordering::Release);
        }
    });
    let (ping, pong) = (shm.word(PING), shm.word(PONG));
    let mut seq = 0u64;
    let samples = out.clone();
    c.bench_function("cache-line round trip (2 processes)", |bch| {
        bch.iter_custom(|iters| {
            samples.run(iters, || {
                seq += 1;
                ping.store(seq, Ordering::Release);
                while pong.load(Ordering::Acquire) != seq {
                    std::hint::spin_loop();
                }
            })
        })
    });
    ping.store(u64::MAX, Ordering::Release);
    child.wait();
}

// ---------------------------------------------------------------------------
// (c) 64 KiB streaming

/// Data area of the streaming ring: eight 64 KiB records in flight, and
/// with the source and destination buffers well inside one core's 1 MiB L2.
const STREAM_RING: usize = 512 << 10;

fn ring_stream(c: &mut Criterion, out: &Samples) {
    let geo = Geometry::with_max_record(STREAM_RING, CHUNK).unwrap();
    let rb = geo.ring_bytes();
    // Page 0: the command word (records to produce, cumulative; MAX = stop).
    let shm = Shm::new(4096 + rb);
    let r = shm.ptr.wrapping_add(4096);
    // SAFETY: fresh private mapping, page aligned.
    unsafe { ring::init(r, geo, 3) };
    let child = Child::spawn(|| {
        let target = shm.word(0);
        // SAFETY: the child is the only producer.
        let mut tx = unsafe { Producer::new(r, geo).unwrap() };
        let src: Vec<u8> = (0..CHUNK).map(|i| (i * 7) as u8).collect();
        let mut made = 0u64;
        loop {
            let t = target.load(Ordering::Acquire);
            if t == u64::MAX {
                break;
            }
            while made < t {
                let p = reserve_spin(&mut tx, CHUNK);
                // SAFETY: CHUNK reserved bytes; src is CHUNK bytes.
                unsafe {
                    ptr::copy_nonoverlapping(src.as_ptr(), p, CHUNK);
                    ptr::write_unaligned(p as *mut u64, made);
                }
                tx.commit(CHUNK, kind::MSG, 0);
                made += 1;
            }
            std::hint::spin_loop();
        }
    });
    // SAFETY: the parent is the only consumer.
    let mut rx = unsafe { Consumer::new(r, geo).unwrap() };
    let target = shm.word(0);
    let mut dst = vec![0u8; CHUNK];
    let mut got = 0u64;
    let samples = out.clone();
    let mut g = c.benchmark_group("64 KiB streaming");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("ring (2 processes)", |bch| {
        bch.iter_custom(|iters| {
            target.store(got + iters, Ordering::Release);
            samples.run(iters, || {
                let rec = next_record(&mut rx);
                assert_eq!(rec.len, CHUNK);
                // SAFETY: rec covers CHUNK bytes until release; dst is CHUNK.
                unsafe { ptr::copy_nonoverlapping(rec.ptr, dst.as_mut_ptr(), CHUNK) };
                rx.release_flush();
                assert_eq!(u64::from_ne_bytes(dst[..8].try_into().unwrap()), got);
                got += 1;
                black_box(&mut dst);
            })
        })
    });
    g.finish();
    target.store(u64::MAX, Ordering::Release);
    child.wait();
}

// ---------------------------------------------------------------------------
// (e) a 56 KiB message in a ping-pong: two copies through the ring, whole or
// in pieces, against one copy of a buffer both cores already hold

/// What follows the first 8 KiB of a 64 KiB MPI message (ob1's rendezvous).
const MSG: usize = 56 << 10;

/// How the message of [`message_round_trip`] travels.
#[derive(Clone, Copy, PartialEq)]
enum Carry {
    /// The child copies it out of a shared buffer the parent never writes
    /// (single-copy shared memory in a ping-pong that sends the same
    /// buffer again and again): one copy, the lines cached in both cores.
    Unchanged,
    /// The same, but the parent writes the whole buffer before each
    /// message (an application that sends what it just computed).
    Rewritten,
    /// The parent copies it into ring A in records of this many bytes, the
    /// child copies every record out: two copies.
    Ring(usize),
}

/// Round trips of `MSG` bytes carried as `how`; the child answers with 8
/// bytes on ring B once it has the whole message.
fn message_round_trip(c: &mut Criterion, how: Carry, name: &str, out: &Samples) {
    let geo = Geometry::with_max_record(256 << 10, CHUNK).unwrap();
    let rb = geo.ring_bytes();
    let shm = Shm::new(2 * rb + MSG);
    let (a, b) = (shm.ptr, shm.ptr.wrapping_add(rb));
    let shared = shm.ptr.wrapping_add(2 * rb);
    // SAFETY: fresh mapping of two rings and the shared buffer, page aligned.
    unsafe {
        ring::init(a, geo, 4);
        ring::init(b, geo, 5);
        ptr::write_bytes(shared, 7, MSG);
    }
    let child = Child::spawn(|| {
        // SAFETY: the child is the only consumer of A and producer of B.
        let (mut rx, mut tx) = unsafe {
            (
                Consumer::new(a, geo).unwrap(),
                Producer::new(b, geo).unwrap(),
            )
        };
        let mut dst = vec![0u8; MSG];
        let mut have = 0;
        loop {
            let rec = next_record(&mut rx);
            if rec.kind == kind::CTRL {
                break;
            }
            if let Carry::Unchanged | Carry::Rewritten = how {
                // SAFETY: the shared buffer holds MSG bytes; dst is MSG.
                unsafe { ptr::copy_nonoverlapping(shared, dst.as_mut_ptr(), MSG) };
                have = MSG;
            } else {
                assert!(have + rec.len <= MSG);
                // SAFETY: rec covers rec.len bytes until release; dst has room.
                unsafe { ptr::copy_nonoverlapping(rec.ptr, dst.as_mut_ptr().add(have), rec.len) };
                have += rec.len;
            }
            rx.release_flush();
            if have == MSG {
                have = 0;
                black_box(&mut dst);
                let p = tx.reserve(8).unwrap().expect("one answer in flight");
                // SAFETY: 8 reserved bytes; the message's first word.
                unsafe { ptr::copy_nonoverlapping(dst.as_ptr(), p, 8) };
                tx.commit(8, kind::MSG, 0);
            }
        }
    });
    // SAFETY: the parent is the only producer of A and consumer of B.
    let (mut tx, mut rx) = unsafe {
        (
            Producer::new(a, geo).unwrap(),
            Consumer::new(b, geo).unwrap(),
        )
    };
    let mut src = vec![7u8; MSG];
    let mut seq = 0u64;
    let samples = out.clone();
    let mut g = c.benchmark_group("56 KiB message round trip");
    g.bench_function(name, |bch| {
        bch.iter_custom(|iters| {
            samples.run(iters, || {
                seq += 1;
                src[..8].copy_from_slice(&seq.to_ne_bytes());
                if let Carry::Ring(piece) = how {
                    for chunk in src.chunks(piece) {
                        let p = reserve_spin(&mut tx, chunk.len());
                        // SAFETY: chunk.len() reserved bytes.
                        unsafe { ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len()) };
                        tx.commit(chunk.len(), kind::MSG, 0);
                    }
                } else {
                    if how == Carry::Rewritten {
                        // SAFETY: the shared buffer holds MSG bytes, which
                        // the child reads only between a message and its
                        // answer.
                        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), shared, MSG) };
                    }
                    tx.push(kind::MSG, 0, &[&[0; 8]]).unwrap().unwrap();
                }
                let rec = next_record(&mut rx);
                // SAFETY: an 8-byte record, valid until release.
                let v = unsafe { ptr::read_unaligned(rec.ptr as *const u64) };
                if how != Carry::Unchanged {
                    assert_eq!(v, seq);
                }
                rx.release_flush();
            })
        })
    });
    g.finish();
    tx.push(kind::CTRL, 0, &[&[0; 8]]).unwrap().unwrap();
    child.wait();
}

// ---------------------------------------------------------------------------
// (d) single-core memcpy of 64 KiB chunks

fn memcpy_baseline(c: &mut Criterion, out: &Samples) {
    // The source rotates through a buffer as large as the streaming ring's
    // data area, as the consumer's copies do.
    let src: Vec<u8> = (0..STREAM_RING).map(|i| i as u8).collect();
    let mut dst = vec![0u8; CHUNK];
    let mut off = 0;
    let samples = out.clone();
    let mut g = c.benchmark_group("64 KiB streaming");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("memcpy (1 core)", |bch| {
        bch.iter_custom(|iters| {
            samples.run(iters, || {
                dst.copy_from_slice(&src[off..off + CHUNK]);
                off = (off + CHUNK) % STREAM_RING;
                black_box(&mut dst);
            })
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// (f) a receive queue beside a ring: 8-byte round trips, eager-size streams,
// in alternating rounds (the host moves the two virtual CPUs between near
// and far placements from one moment to the next: one round of each,
// side by side, is the comparison)

/// The eager message of the Open MPI component: 8 KiB and ob1's header.
const EAGER: usize = (8 << 10) + 128;
/// The data area of both in the eager-size streams: what a queue per peer
/// domain has on Xen's default grant pool.
const SMALL_AREA: usize = 64 << 10;

/// One end of a ring or of a queue, sending or receiving.
enum Tx {
    Ring(Box<Producer>),
    Queue(queue::Producer),
}

enum Rx {
    Ring(Consumer),
    Queue(queue::Consumer),
}

impl Tx {
    /// # Safety
    /// `base` is a region that `init` set up for `through_queue`'s kind.
    unsafe fn new(base: *mut u8, through_queue: bool, max: usize) -> Tx {
        // SAFETY: forwarded.
        unsafe {
            if through_queue {
                let mut q = queue::Producer::attach(base, qgeo(max), SLOT).unwrap();
                q.learn_peer();
                Tx::Queue(q)
            } else {
                let mut r = Box::new(Producer::new(base, rgeo(max)).unwrap());
                r.learn_peer();
                Tx::Ring(r)
            }
        }
    }

    /// Sends `len` bytes: `fill` writes them, spinning while full.
    fn send(&mut self, len: usize, k: u8, fill: impl FnOnce(*mut u8)) {
        match self {
            Tx::Ring(tx) => {
                fill(reserve_spin(tx, len));
                tx.commit(len, k, 0);
            }
            Tx::Queue(q) => loop {
                if let Some(r) = q.reserve(len).unwrap() {
                    fill(r.payload());
                    q.commit(r, k, 0);
                    break;
                }
                std::hint::spin_loop();
            },
        }
    }
}

impl Rx {
    /// # Safety
    /// As for [`Tx::new`].
    unsafe fn new(base: *mut u8, through_queue: bool, max: usize) -> Rx {
        // SAFETY: forwarded.
        unsafe {
            if through_queue {
                let mut q = queue::Consumer::new(base, qgeo(max)).unwrap();
                q.learn_peers([SLOT]);
                Rx::Queue(q)
            } else {
                let mut r = Consumer::new(base, rgeo(max)).unwrap();
                r.learn_peer();
                Rx::Ring(r)
            }
        }
    }

    /// Takes the next record (spinning): `take` sees its kind and bytes.
    fn recv<T>(&mut self, take: impl FnOnce(u8, *const u8, usize) -> T) -> T {
        match self {
            Rx::Ring(rx) => {
                let r = next_record(rx);
                let t = take(r.kind, r.ptr, r.len);
                rx.release_flush();
                t
            }
            Rx::Queue(q) => loop {
                if let Some(r) = q.peek().unwrap() {
                    let t = take(r.kind, r.ptr, r.len);
                    q.release(&r);
                    break t;
                }
                std::hint::spin_loop();
            },
        }
    }

    /// Takes the next record (spinning) and releases it without handing
    /// the space back; the space goes back at [`Rx::flush`], when the ring
    /// or queue has nothing more to take, or (a queue) after
    /// [`queue::BATCH_BYTES`].
    fn recv_batched<T>(&mut self, take: impl FnOnce(u8, *const u8) -> T) -> T {
        match self {
            Rx::Ring(rx) => loop {
                if let Some(r) = rx.peek().unwrap() {
                    let t = take(r.kind, r.ptr);
                    rx.release();
                    break t;
                }
                rx.flush();
                std::hint::spin_loop();
            },
            Rx::Queue(q) => loop {
                if let Some(r) = q.peek().unwrap() {
                    let t = take(r.kind, r.ptr);
                    q.release_quiet(&r);
                    if q.unpublished() >= queue::BATCH_BYTES {
                        q.flush();
                    }
                    break t;
                }
                q.flush();
                std::hint::spin_loop();
            },
        }
    }

    /// Hands back what [`Rx::recv_batched`] released.
    fn flush(&mut self) {
        match self {
            Rx::Ring(rx) => {
                rx.flush();
            }
            Rx::Queue(q) => {
                q.flush();
            }
        }
    }
}

fn rgeo(max: usize) -> Geometry {
    Geometry::with_max_record(SMALL_AREA, max).unwrap()
}

/// The producer slot of the queue's one producer.
const SLOT: usize = 3;

fn qgeo(max: usize) -> queue::Geometry {
    queue::Geometry::new(SMALL_AREA, max, 8).unwrap()
}

/// A mapping of two regions of either kind, initialised; both ends of
/// both declare that they poll (never sleep on a doorbell), as the Open
/// MPI component's do, so that a commit and a release are release stores
/// without a fence. [`Tx::new`] and [`Rx::new`] learn it.
fn two_regions(through_queue: bool, max: usize) -> (Shm, *mut u8, *mut u8) {
    let n = rgeo(max).ring_bytes().max(qgeo(max).region_bytes());
    let shm = Shm::new(4096 + 2 * n);
    let (a, b) = (shm.ptr.wrapping_add(4096), shm.ptr.wrapping_add(4096 + n));
    // SAFETY: fresh mapping, page aligned, two regions of `n` bytes.
    unsafe {
        for (base, nonce) in [(a, 1), (b, 2)] {
            if through_queue {
                queue::init(base, qgeo(max), nonce);
                queue::Consumer::new(base, qgeo(max))
                    .unwrap()
                    .declare_polling();
                queue::Producer::attach(base, qgeo(max), SLOT)
                    .unwrap()
                    .declare_polling();
            } else {
                ring::init(base, rgeo(max), nonce);
                Consumer::new(base, rgeo(max)).unwrap().declare_polling();
                Producer::new(base, rgeo(max)).unwrap().declare_polling();
            }
        }
    }
    (shm, a, b)
}

/// One round of 8-byte round trips: the 10th percentile of 64-trip
/// batches, as a half round trip in ns.
fn round_trips(through_queue: bool, iters: u64) -> f64 {
    let (_shm, a, b) = two_regions(through_queue, EAGER);
    let child = Child::spawn(|| {
        // SAFETY: the child consumes A and produces into B.
        let (mut rx, mut tx) = unsafe {
            (
                Rx::new(a, through_queue, EAGER),
                Tx::new(b, through_queue, EAGER),
            )
        };
        loop {
            // SAFETY: an 8-byte record.
            let (k, v) =
                rx.recv_batched(|k, p| (k, unsafe { ptr::read_unaligned(p as *const u64) }));
            if k == kind::CTRL {
                break;
            }
            // SAFETY: 8 reserved bytes.
            tx.send(8, kind::MSG, |p| unsafe {
                ptr::write_unaligned(p as *mut u64, v)
            });
        }
    });
    // SAFETY: the parent produces into A and consumes B.
    let (mut tx, mut rx) = unsafe {
        (
            Tx::new(a, through_queue, EAGER),
            Rx::new(b, through_queue, EAGER),
        )
    };
    let samples = Samples::new(64);
    let mut seq = 0u64;
    samples.run(iters, || {
        seq += 1;
        // SAFETY: 8 reserved bytes.
        tx.send(8, kind::MSG, |p| unsafe {
            ptr::write_unaligned(p as *mut u64, seq)
        });
        // SAFETY: an 8-byte record.
        let v = rx.recv_batched(|_, p| unsafe { ptr::read_unaligned(p as *const u64) });
        assert_eq!(v, seq);
    });
    tx.send(8, kind::CTRL, |_| {});
    child.wait();
    samples.quantile_ns(0.1) / 2.0
}

/// One round of a stream of `EAGER`-byte records through a 64 KiB data
/// area; the consumer copies every record out and checks its sequence
/// number. GB/s, median of 8-record batches.
fn eager_stream(through_queue: bool, iters: u64) -> f64 {
    let (_shm, a, _) = two_regions(through_queue, EAGER);
    let child = Child::spawn(|| {
        let src: Vec<u8> = (0..EAGER).map(|i| (i * 7) as u8).collect();
        // SAFETY: the child is the only producer of A.
        let mut tx = unsafe { Tx::new(a, through_queue, EAGER) };
        for made in 0..iters {
            // SAFETY: EAGER reserved bytes; src is EAGER bytes.
            tx.send(EAGER, kind::MSG, |p| unsafe {
                ptr::copy_nonoverlapping(src.as_ptr(), p, EAGER);
                ptr::write_unaligned(p as *mut u64, made);
            });
        }
    });
    // SAFETY: the parent is the only consumer of A.
    let mut rx = unsafe { Rx::new(a, through_queue, EAGER) };
    let mut dst = vec![0u8; EAGER];
    let mut got = 0u64;
    let samples = Samples::new(8);
    samples.run(iters, || {
        rx.recv(|_, p, len| {
            assert_eq!(len, EAGER);
            // SAFETY: the record covers EAGER bytes until release.
            unsafe { ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), EAGER) };
        });
        assert_eq!(u64::from_ne_bytes(dst[..8].try_into().unwrap()), got);
        got += 1;
        black_box(&mut dst);
    });
    child.wait();
    EAGER as f64 / samples.quantile_ns(0.5)
}

/// One round of a stream of 8-byte records (a sequence number each); the
/// consumer checks every number and hands space back every 16 records
/// (as the component's receive path does in batches). Million records a
/// second, median of 256-record batches.
fn small_stream(through_queue: bool, iters: u64) -> f64 {
    let (_shm, a, _) = two_regions(through_queue, EAGER);
    let child = Child::spawn(|| {
        // SAFETY: the child is the only producer of A.
        let mut tx = unsafe { Tx::new(a, through_queue, EAGER) };
        for made in 0..iters {
            // SAFETY: 8 reserved bytes.
            tx.send(8, kind::MSG, |p| unsafe {
                ptr::write_unaligned(p as *mut u64, made)
            });
        }
    });
    // SAFETY: the parent is the only consumer of A.
    let mut rx = unsafe { Rx::new(a, through_queue, EAGER) };
    let mut got = 0u64;
    let samples = Samples::new(256);
    samples.run(iters, || {
        // SAFETY: an 8-byte record.
        let v = rx.recv_batched(|_, p| unsafe { ptr::read_unaligned(p as *const u64) });
        assert_eq!(v, got);
        got += 1;
        if got.is_multiple_of(16) {
            rx.flush();
        }
    });
    rx.flush();
    child.wait();
    1000.0 / samples.quantile_ns(0.5)
}

/// The receive queue beside a ring, in alternating rounds of each.
fn queue_rounds() {
    println!("receive queue beside a ring, alternating rounds:");
    let (mut rt, mut st, mut sm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..6 {
        let (r, q) = (round_trips(false, 200_000), round_trips(true, 200_000));
        let (rs, qs) = (eager_stream(false, 200_000), eager_stream(true, 200_000));
        let (rm, qm) = (
            small_stream(false, 2_000_000),
            small_stream(true, 2_000_000),
        );
        println!(
            "  round {round}: 8-byte half round trip queue {q:.0} ns, ring {r:.0} ns ({:.2}); 8 KiB + 128 B stream through 64 KiB queue {qs:.2} GB/s, ring {rs:.2} GB/s ({:.2}); 8-byte stream queue {qm:.1} M/s, ring {rm:.1} M/s ({:.2})",
            q / r,
            qs / rs,
            qm / rm
        );
        rt.push(q / r);
        st.push(qs / rs);
        sm.push(qm / rm);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[2] + v[3]) / 2.0
    };
    println!(
        "  median ratio, queue to ring: round trip {:.2}, stream {:.2}, 8-byte stream {:.2}",
        med(&mut rt),
        med(&mut st),
        med(&mut sm)
    );
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    if !pin(PARENT_CPU) {
        eprintln!("note: could not pin to CPU {PARENT_CPU}; numbers are less stable");
    }
    let load_before = load();
    if bench && std::env::var("IVCOM_BENCH_ONLY").as_deref() == Ok("queue") {
        queue_rounds();
        println!("load average before {load_before}, after {}", load());
        return;
    }
    let ring_rt = Samples::new(64);
    let line_rt = Samples::new(64);
    let stream = Samples::new(8);
    let copy = Samples::new(8);
    ring_ping_pong(&mut c, &ring_rt);
    line_ping_pong(&mut c, &line_rt);
    ring_stream(&mut c, &stream);
    memcpy_baseline(&mut c, &copy);
    let one = Samples::new(8);
    let fresh = Samples::new(8);
    let whole = Samples::new(8);
    let cut = Samples::new(8);
    message_round_trip(&mut c, Carry::Unchanged, "one copy, unchanged buffer", &one);
    message_round_trip(
        &mut c,
        Carry::Rewritten,
        "one copy, rewritten buffer",
        &fresh,
    );
    message_round_trip(&mut c, Carry::Ring(MSG), "ring, one record", &whole);
    message_round_trip(&mut c, Carry::Ring(16 << 10), "ring, 16 KiB records", &cut);
    c.final_summary();
    let load_after = load();
    if !bench {
        // `cargo test --benches`: each routine ran once; no numbers.
        for through_queue in [false, true] {
            round_trips(through_queue, 1000);
            eager_stream(through_queue, 1000);
            small_stream(through_queue, 1000);
        }
        return;
    }
    println!();
    println!("Summary (per-iteration times of uninterrupted batches: 10th percentile, median in brackets)");
    let half = |s: &Samples, q| s.quantile_ns(q) / 2.0;
    let (x, y) = (half(&ring_rt, 0.1), half(&line_rt, 0.1));
    let (xm, ym) = (half(&ring_rt, 0.5), half(&line_rt, 0.5));
    println!(
        "8-byte half round trip: ring {x:.0} ns, cache-line ping-pong {y:.0} ns, ratio {:.2} (target <= 2.0) [median: {xm:.0} ns, {ym:.0} ns, ratio {:.2}]",
        x / y,
        xm / ym
    );
    let gbs = |s: &Samples, q| CHUNK as f64 / s.quantile_ns(q);
    let (a, b) = (gbs(&stream, 0.1), gbs(&copy, 0.1));
    let (am, bm) = (gbs(&stream, 0.5), gbs(&copy, 0.5));
    println!(
        "64 KiB streaming: ring {a:.2} GB/s, memcpy {b:.2} GB/s, ratio {:.2} (target >= 0.5) [median: {am:.2} GB/s, {bm:.2} GB/s, ratio {:.2}]",
        a / b,
        am / bm
    );
    let us = |s: &Samples, q| s.quantile_ns(q) / 1000.0;
    for (q, what) in [(0.1, "10th percentile"), (0.5, "median")] {
        let (o, f) = (us(&one, q), us(&fresh, q));
        let (w, p) = (us(&whole, q), us(&cut, q));
        println!(
            "56 KiB message round trip ({what}): one copy of an unchanged buffer {o:.2} us, of a rewritten one {f:.2} us; ring, one record {w:.2} us ({:.2}x unchanged, {:.2}x rewritten); ring, 16 KiB records {p:.2} us ({:.2}x, {:.2}x)",
            w / o,
            w / f,
            p / o,
            p / f
        );
    }
    queue_rounds();
    println!(
        "load average before {load_before}, after {load_after} (2 CPUs; parent on CPU {PARENT_CPU}, child on CPU {CHILD_CPU})"
    );
}
