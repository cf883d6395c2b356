//! Receive queues (`ivcom_core::queue`) between real processes: producers
//! in forked children that map the region at their own addresses, the
//! consumer in the test process, real futex doorbells both ways; and the
//! consumer and producers against forged words.
//!
//! Every byte a producer writes is a function of (slot, sequence number,
//! offset), and the consumer checks every byte it takes, each slot's
//! sequence, and a running checksum per slot against the one the producer
//! left in the shared page when it finished.

use ivcom_core::queue::{
    self, Consumer, Geometry, Producer, Wake, BATCH_BYTES, CELL, CTRL_BYTES, OFF_CONS, OFF_RESERVE,
};
use ivcom_core::queue_path::{QueueRx, QueueTx};
use ivcom_core::record::{self, kind};
use ivcom_core::{Error, Violation};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A shared mapping of a memfd: the region plus one page of the test's own
/// (futex words a producer sleeps on, checksums the producers leave).
struct Shm {
    fd: i32,
    len: usize,
    base: *mut u8,
}

const SIDE: usize = 4096;

impl Shm {
    fn new(geo: Geometry) -> Shm {
        let len = geo.region_bytes() + SIDE;
        // SAFETY: plain syscalls, results checked.
        unsafe {
            let fd = libc::memfd_create(c"ivcom-queue-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            let s = Shm {
                fd,
                len,
                base: map(fd, len),
            };
            queue::init(s.base, geo, 1);
            s
        }
    }

    /// The test's own page after the region: word `i`.
    fn side(&self, geo: Geometry, i: usize) -> &AtomicU64 {
        // SAFETY: inside the mapping, 8-aligned.
        unsafe { &*(self.base.add(geo.region_bytes() + 8 * i) as *const AtomicU64) }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: inside the control page, 8-aligned.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn cell(&self, off: usize) -> &AtomicU64 {
        // SAFETY: inside the data area, 8-aligned.
        unsafe { &*(self.base.add(CTRL_BYTES + off) as *const AtomicU64) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: our mapping and descriptor.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

/// # Safety
/// `fd` is a memfd of at least `len` bytes.
unsafe fn map(fd: i32, len: usize) -> *mut u8 {
    // SAFETY: forwarded.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn futex_wait(w: *const AtomicU32, val: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    // SAFETY: a futex word in shared memory (no FUTEX_PRIVATE_FLAG).
    unsafe {
        libc::syscall(libc::SYS_futex, w, libc::FUTEX_WAIT, val, &ts as *const _);
    }
}

fn futex_wake(w: *const AtomicU32) {
    // SAFETY: as above.
    unsafe {
        (*w).fetch_add(1, Ordering::Release);
        libc::syscall(libc::SYS_futex, w, libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Byte `i` of message `seq` of `slot`.
fn byte(slot: usize, seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u8 ^ (i as u8).wrapping_mul(31) ^ slot as u8
}

/// Length of message `seq` of `slot`: mostly small, some up to the largest
/// record, so that records of every cell count and padding occur.
fn length(slot: usize, seq: u64, max: usize) -> usize {
    let x = (seq ^ (slot as u64) << 20).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 33;
    match x % 8 {
        0..=4 => (x >> 3) as usize % 64,
        5 | 6 => (x >> 3) as usize % 1024,
        _ => (x >> 3) as usize % (max + 1),
    }
}

fn fnv(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
}

const SLOTS: usize = 4;
const PER_SLOT: u64 = 25_000;

/// A producer child: maps the memfd again (its own address), sends its
/// messages, sleeping on its futex word while the queue is full, and
/// leaves its checksum in the test's page. Allocates nothing (it is a
/// fork of a threaded process). Exit code: 0, or where it failed.
/// What a forked producer does besides sending its records.
#[derive(Clone, Copy, PartialEq)]
enum Producing {
    /// Reserves, fills and commits each record.
    Plainly,
    /// Dies after reserving record `n`, never publishing it.
    DiesAt(u64),
    /// Gives space back as a sender writing in place does: before every
    /// third record it reserves a record and cancels it, and every third
    /// record it reserves larger than it turns out (`commit_len`), so the
    /// queue carries skipped space between records of every slot.
    GivesBack,
}

fn producer_child(fd: i32, len: usize, geo: Geometry, slot: usize, how: Producing) -> ! {
    // SAFETY: the memfd is `len` bytes; the child never unmaps it.
    let base = unsafe { map(fd, len) };
    // SAFETY: the region is mapped for the child's lifetime.
    let Ok(mut p) = (unsafe { Producer::attach(base, geo, slot) }) else {
        unsafe { libc::_exit(10) }
    };
    // SAFETY: the test's page after the region.
    let side = |i: usize| unsafe { &*(base.add(geo.region_bytes() + 8 * i) as *const AtomicU64) };
    let my_bell = side(8 + slot) as *const AtomicU64 as *const AtomicU32;
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    for seq in 0..PER_SLOT {
        let n = length(slot, seq, geo.max_record).max(8);
        let giving = how == Producing::GivesBack;
        // The length reserved: more than the record now and then.
        let cap = if giving && seq % 3 == 2 {
            (n + 40 * (1 + seq as usize % 7)).min(geo.max_record)
        } else {
            n
        };
        let mut cancel = giving && seq % 3 == 1;
        let res = loop {
            match p.reserve(cap) {
                Ok(Some(r)) if cancel => {
                    // Garbage where the record would have been: the
                    // consumer must pass it unread.
                    // SAFETY: the reservation holds `cap` bytes.
                    unsafe { std::ptr::write_bytes(r.payload(), 0xa5, cap) };
                    if p.cancel(r) {
                        futex_wake(p.bell());
                    }
                    cancel = false;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {
                    // SAFETY: a futex word of the test's page.
                    let seen = unsafe { (*my_bell).load(Ordering::Acquire) };
                    if p.prepare_sleep() {
                        let t = Instant::now();
                        futex_wait(my_bell, seen, Duration::from_secs(2));
                        p.finish_sleep();
                        if t.elapsed() >= Duration::from_secs(2) {
                            // Slept out the time-out: nobody rang.
                            side(16 + slot).fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => unsafe { libc::_exit(11) },
            }
        };
        if how == Producing::DiesAt(seq) {
            // Reserved, never published: the rank dies in between.
            unsafe { libc::_exit(0) }
        }
        let at = res.payload();
        // SAFETY: the reservation holds `n` bytes.
        unsafe {
            at.cast::<u64>().write_unaligned(seq);
            for i in 8..n {
                let b = byte(slot, seq, i);
                at.add(i).write(b);
                sum = fnv(sum, b);
            }
        }
        if cap > n {
            // SAFETY: the reservation holds `cap` bytes.
            unsafe { std::ptr::write_bytes(at.add(n), 0x5a, cap - n) };
        }
        if p.commit_len(res, n, kind::MSG, slot as u8) {
            futex_wake(p.bell());
        }
    }
    side(slot).store(sum, Ordering::Release);
    unsafe { libc::_exit(0) }
}

fn fork_producer(s: &Shm, geo: Geometry, slot: usize, how: Producing) -> i32 {
    // SAFETY: the child runs only `producer_child`, which allocates nothing
    // and ends in `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // A child outlives no failed test: it dies with the thread that
        // forked it.
        // SAFETY: plain syscall.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        producer_child(s.fd, s.len, geo, slot, how);
    }
    pid
}

/// Rings the producers whose waiting bits a publication collected (each
/// sleeps on its futex word of the test's page).
fn ring_woken(s: &Shm, geo: Geometry, wake: Wake) {
    for slot in 0..SLOTS {
        if wake[slot / 64] >> (slot % 64) & 1 != 0 {
            futex_wake(s.side(geo, 8 + slot) as *const AtomicU64 as *const AtomicU32);
        }
    }
}

fn reap(pid: i32) -> i32 {
    let mut st = 0;
    // SAFETY: our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    assert!(libc::WIFEXITED(st), "producer {pid} killed: {st:#x}");
    libc::WEXITSTATUS(st)
}

#[test]
fn four_producer_processes_move_100k_messages_every_byte_checked_in_order_per_slot() {
    move_100k(Producing::Plainly);
}

#[test]
fn producers_that_cancel_and_shorten_reservations_lose_nothing_and_the_consumer_passes_the_rest() {
    // A third of the records follow a cancelled reservation (its space
    // filled with 0xa5, published as skipped space), a third leave the
    // tail of a larger reservation (filled with 0x5a) skipped: every
    // record must arrive whole, in order, nothing of the skipped space
    // surfacing, and a consumer asleep at a reservation that is cancelled
    // must be rung.
    move_100k(Producing::GivesBack);
}

/// Four producer processes send 25,000 records each through a 16 KiB
/// queue (1,000+ laps, producers that run out of room and sleep, a
/// consumer that sleeps when empty), behaving as `how` says; the
/// consumer checks every byte, each slot's order and checksum.
fn move_100k(how: Producing) {
    let geo = Geometry::new(16 << 10, 2000, SLOTS).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives the consumer.
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let pids: Vec<i32> = (0..SLOTS).map(|k| fork_producer(&s, geo, k, how)).collect();
    let mut next = [0u64; SLOTS];
    let mut sums = [0xcbf2_9ce4_8422_2325u64; SLOTS];
    let (mut taken, mut bytes, mut sleeps, mut late) = (0u64, 0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    let ring = |wake: Wake| ring_woken(&s, geo, wake);
    while taken < SLOTS as u64 * PER_SLOT {
        assert!(Instant::now() < deadline, "stuck after {taken} records");
        let Some(r) = c.peek().unwrap() else {
            // Nothing to take: hand back what was released (in batches
            // below) before looking at sleep.
            ring(c.flush());
            let bell = c.bell();
            // SAFETY: the queue's doorbell word.
            let seen = unsafe { (*bell).load(Ordering::Acquire) };
            if c.prepare_sleep() {
                sleeps += 1;
                let t = Instant::now();
                futex_wait(bell, seen, Duration::from_secs(2));
                c.finish_sleep();
                if t.elapsed() >= Duration::from_secs(2) && c.peek().unwrap().is_some() {
                    late += 1;
                }
            }
            continue;
        };
        assert_eq!((r.kind, r.tag as usize), (kind::MSG, r.slot));
        // SAFETY: the record lies in the region; copied before checking.
        let body = unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec();
        let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
        assert_eq!(seq, next[r.slot], "slot {} out of order", r.slot);
        assert_eq!(body.len(), length(r.slot, seq, geo.max_record).max(8));
        for (i, &b) in body.iter().enumerate().skip(8) {
            assert_eq!(
                b,
                byte(r.slot, seq, i),
                "slot {} seq {seq} byte {i}",
                r.slot
            );
            sums[r.slot] = fnv(sums[r.slot], b);
        }
        next[r.slot] += 1;
        taken += 1;
        bytes += r.len as u64;
        c.release_quiet(&r);
        if c.unpublished() >= BATCH_BYTES {
            ring(c.flush());
        }
    }
    for pid in pids {
        assert_eq!(reap(pid), 0);
    }
    for slot in 0..SLOTS {
        assert_eq!(next[slot], PER_SLOT);
        assert_eq!(
            s.side(geo, slot).load(Ordering::Acquire),
            sums[slot],
            "slot {slot} checksum"
        );
    }
    assert!(c.peek().unwrap().is_none());
    assert_eq!(late, 0, "a consumer that slept was not rung");
    for slot in 0..SLOTS {
        let n = s.side(geo, 16 + slot).load(Ordering::Relaxed);
        assert_eq!(n, 0, "producer {slot} slept out its time-out {n} times");
    }
    assert!(
        c.index() > 100 * geo.data_size as u64,
        "laps: {}",
        c.index()
    );
    eprintln!("{taken} records, {bytes} bytes, consumer slept {sleeps} times");
}

#[test]
fn a_producer_that_dies_holding_a_reservation_blocks_the_queue_and_nothing_passes_it() {
    let geo = Geometry::new(16 << 10, 2000, 2).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives the consumer.
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let dead = fork_producer(&s, geo, 0, Producing::DiesAt(3));
    assert_eq!(reap(dead), 0);
    // A live producer of the same domain writes behind the dead one's hole.
    // SAFETY: as above.
    let mut p = unsafe { Producer::attach(s.base, geo, 1) }.unwrap();
    assert!(p
        .push(kind::MSG, 1, &[b"behind the hole"])
        .unwrap()
        .is_some());
    for seq in 0..3u64 {
        let r = c.peek().unwrap().unwrap();
        assert_eq!(r.slot, 0);
        // SAFETY: in the region.
        let got = unsafe { r.ptr.cast::<u64>().read_unaligned() };
        assert_eq!(got, seq);
        c.release(&r);
    }
    assert!(
        c.peek().unwrap().is_none(),
        "the record behind the hole is not handed up"
    );
    assert!(
        c.blocked(),
        "the consumer knows a reservation is outstanding"
    );
    // The layer above breaks the queue once it learns the producer died.
    c.poison(Violation::BadIndex);
    assert!(matches!(c.peek(), Err(Error::Broken(Violation::BadIndex))));
}

#[test]
fn a_consumer_asleep_at_a_reservation_that_is_cancelled_is_rung_and_passes_it() {
    let geo = Geometry::new(4096, 1000, 2).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives both.
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let mut p = unsafe { Producer::attach(s.base, geo, 1) }.unwrap();
    p.learn_peer();
    let res = p.reserve(600).unwrap().unwrap();
    // SAFETY: the reservation holds 600 bytes.
    unsafe { std::ptr::write_bytes(res.payload(), 0xff, 600) };
    assert!(c.peek().unwrap().is_none(), "nothing published yet");
    assert!(c.blocked());
    assert!(c.prepare_sleep(), "the consumer sleeps at the reservation");
    assert!(p.cancel(res), "the producer that cancels must ring");
    c.finish_sleep();
    assert!(!c.blocked());
    // Nothing surfaces; the skipped space is passed and handed back.
    assert!(c.peek().unwrap().is_none());
    assert_eq!(c.index(), Geometry::record_bytes(600) as u64);
    c.flush();
    // A record after it, and one committed shorter than reserved with one
    // after that: both arrive whole.
    assert!(p
        .push(kind::MSG, 7, &[b"after the skip"])
        .unwrap()
        .is_some());
    let res = p.reserve(900).unwrap().unwrap();
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(b"short".as_ptr(), res.payload(), 5) };
    p.commit_len(res, 5, kind::MSG, 8);
    assert!(p.push(kind::MSG, 9, &[b"last"]).unwrap().is_some());
    for (tag, want) in [(7u8, &b"after the skip"[..]), (8, b"short"), (9, b"last")] {
        let r = c.peek().unwrap().unwrap();
        // SAFETY: in the region.
        let got = unsafe { std::slice::from_raw_parts(r.ptr, r.len) };
        assert_eq!((r.slot, r.tag, got), (1, tag, want));
        c.release(&r);
    }
    assert!(c.peek().unwrap().is_none());
}

fn forged(geo: Geometry, at: usize, word: u64) -> Error {
    let s = Shm::new(geo);
    // SAFETY: `s` outlives the consumer.
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let mut p = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
    // Honest records of one cell each bring the consumer to `at`.
    for _ in 0..at / CELL {
        p.push(kind::MSG, 0, &[&[1u8; 8]]).unwrap().unwrap();
        let r = c.peek().unwrap().unwrap();
        c.release(&r);
    }
    assert_eq!(c.index(), at as u64);
    s.cell(at).store(word, Ordering::Release);
    let e = c.peek().unwrap_err();
    // Broken for good.
    assert!(c.peek().is_err());
    e
}

#[test]
fn a_consumer_breaks_on_forged_records_with_a_named_violation() {
    let geo = Geometry::new(4096, 1000, 2).unwrap();
    let slot = |s: u64| s << 48;
    let cases: [(usize, u64, Violation); 9] = [
        (
            64,
            record::encode(8, kind::MSG, 0) | slot(2),
            Violation::BadSender,
        ),
        (
            64,
            record::encode(8, kind::MSG, 0) | slot(0xffff),
            Violation::BadSender,
        ),
        (64, record::encode(8, 9, 0), Violation::BadType),
        (64, record::encode(1001, kind::MSG, 0), Violation::BadLength),
        // A record of allowed length that would run past the end.
        (
            4096 - 128,
            record::encode(1000, kind::MSG, 0),
            Violation::BadLength,
        ),
        (64, record::encode(100, kind::PAD, 0), Violation::BadPadding),
        // Skipped space of more cells than the largest record's, or past
        // the end of the data area.
        (
            64,
            record::encode(1016, kind::SKIP, 0),
            Violation::BadLength,
        ),
        (
            4096 - 128,
            record::encode(200, kind::SKIP, 0),
            Violation::BadLength,
        ),
        (
            0,
            record::encode(4096 - 8, kind::PAD, 0),
            Violation::BadPadding,
        ),
    ];
    for (at, w, want) in cases {
        match forged(geo, at, w) {
            Error::Broken(v) => assert_eq!(v, want, "word {w:#x} at {at}"),
            e => panic!("word {w:#x} at {at}: {e}"),
        }
    }
}

#[test]
fn a_producer_breaks_on_a_consumer_index_it_cannot_have() {
    let geo = Geometry::new(4096, 1000, 1).unwrap();
    let fill = |p: &mut Producer| while p.push(kind::MSG, 0, &[&[0u8; 500]]).unwrap().is_some() {};
    // Ahead of every reservation, behind by more than the data area,
    // misaligned, and backwards after a first read.
    for bad in [1u64 << 40, 64 + 3] {
        let s = Shm::new(geo);
        // SAFETY: `s` outlives the producer.
        let mut p = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
        fill(&mut p);
        s.word(OFF_CONS).store(bad, Ordering::Release);
        let e = p.push(kind::MSG, 0, &[&[0u8; 500]]).unwrap_err();
        assert!(
            matches!(e, Error::Broken(Violation::BadIndex)),
            "{bad:#x}: {e}"
        );
    }
    let s = Shm::new(geo);
    // SAFETY: as above.
    let mut p = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
    s.word(OFF_RESERVE).store(1 << 40, Ordering::Release);
    let e = p.push(kind::MSG, 0, &[&[0u8; 500]]).unwrap_err();
    assert!(matches!(e, Error::Broken(Violation::BadIndex)), "{e}");
    // Backwards: the consumer took 8 records, then says it took fewer.
    let s = Shm::new(geo);
    // SAFETY: as above.
    let mut p = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    fill(&mut p);
    let mut took = 0;
    while let Some(r) = c.peek().unwrap() {
        c.release(&r);
        took += 1;
        assert!(took <= 8, "more records than were sent");
    }
    fill(&mut p);
    s.word(OFF_CONS).store(512, Ordering::Release);
    let e = p.push(kind::MSG, 0, &[&[0u8; 500]]).unwrap_err();
    assert!(matches!(e, Error::Broken(Violation::BadIndex)), "{e}");
}

#[test]
fn producers_learn_that_the_consumer_closed_the_queue() {
    let geo = Geometry::new(4096, 1000, 1).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives both.
    let mut p = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    while p.push(kind::MSG, 0, &[&[0u8; 900]]).unwrap().is_some() {}
    assert!(p.prepare_sleep());
    let wake = c.close();
    assert_eq!(wake[0], 1, "the sleeping producer is rung at the close");
    p.finish_sleep();
    assert!(matches!(
        p.push(kind::MSG, 0, &[&[0u8; 900]]),
        Err(Error::Closed)
    ));
    assert!(!p.prepare_sleep(), "a closed queue is not slept on");
}

#[test]
fn a_region_of_another_shape_or_version_is_refused() {
    let geo = Geometry::new(4096, 1000, 2).unwrap();
    let s = Shm::new(geo);
    for other in [
        Geometry::new(8192, 1000, 2).unwrap(),
        Geometry::new(4096, 900, 2).unwrap(),
        Geometry::new(4096, 1000, 3).unwrap(),
    ] {
        // SAFETY: the mapping is large enough for the smaller shapes; the
        // larger one is refused before any data is touched.
        let e = unsafe { Producer::attach(s.base, other, 0) }.err().unwrap();
        assert!(
            matches!(
                e,
                Error::Broken(Violation::BadGeometry | Violation::BadVersion)
            ),
            "{e}"
        );
    }
    s.word(0).store(0x1234, Ordering::Relaxed);
    // SAFETY: as above.
    let e = unsafe { Consumer::new(s.base, geo) }.err().unwrap();
    assert!(matches!(e, Error::Broken(Violation::BadMagic)), "{e}");
    // SAFETY: as above.
    assert!(
        unsafe { Producer::attach(s.base, geo, 2) }.is_err(),
        "slot out of range"
    );
}

// ---------------------------------------------------------------------------
// Messages over a queue (`ivcom_core::queue_path`): fragments of several
// slots interleaved, reassembled per slot.

/// Messages each producer of the message test sends.
const MESSAGES: u64 = 400;

/// Length of message `seq` of `slot`: from 0 to three records and a bit,
/// most of them fragmented.
fn message_len(slot: usize, seq: u64, max_record: usize) -> usize {
    let x = (seq ^ (slot as u64) << 20).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    match x % 4 {
        0 => (x >> 4) as usize % 64,
        1 => (x >> 4) as usize % max_record,
        _ => (x >> 4) as usize % (3 * max_record + 100),
    }
}

fn message_child(fd: i32, len: usize, geo: Geometry, slot: usize) -> ! {
    // SAFETY: the memfd is `len` bytes; the child never unmaps it.
    let base = unsafe { map(fd, len) };
    // SAFETY: the region is mapped for the child's lifetime.
    let Ok(p) = (unsafe { Producer::attach(base, geo, slot) }) else {
        unsafe { libc::_exit(10) }
    };
    let Ok(mut tx) = QueueTx::new(p, geo.max_record) else {
        unsafe { libc::_exit(12) }
    };
    // SAFETY: the test's page after the region.
    let side = |i: usize| unsafe { &*(base.add(geo.region_bytes() + 8 * i) as *const AtomicU64) };
    let my_bell = side(8 + slot) as *const AtomicU64 as *const AtomicU32;
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    for seq in 0..MESSAGES {
        let n = message_len(slot, seq, geo.max_record);
        let msg: Vec<u8> = (0..n).map(|i| byte(slot, seq, i)).collect();
        for &b in &msg {
            sum = fnv(sum, b);
        }
        let mut sent = 0;
        loop {
            let mut ring = false;
            let done = match tx.try_send(slot as u8, &msg, &mut sent, &mut ring) {
                Ok(d) => d,
                Err(_) => unsafe { libc::_exit(11) },
            };
            if ring {
                futex_wake(tx.producer().bell());
            }
            if done {
                break;
            }
            // SAFETY: a futex word of the test's page.
            let seen = unsafe { (*my_bell).load(Ordering::Acquire) };
            if tx.producer().prepare_sleep() {
                let t = Instant::now();
                futex_wait(my_bell, seen, Duration::from_secs(2));
                tx.producer().finish_sleep();
                if t.elapsed() >= Duration::from_secs(2) {
                    side(16 + slot).fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    side(slot).store(sum, Ordering::Release);
    unsafe { libc::_exit(0) }
}

#[test]
fn four_producer_processes_send_fragmented_messages_reassembled_per_slot_every_byte_checked() {
    // Records of at most 1,000 bytes in 8 KiB: messages of up to 3,100
    // bytes travel in up to four records, the four slots' interleaved.
    let geo = Geometry::new(8 << 10, 1000, SLOTS).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives the consumer.
    let c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let mut rx = QueueRx::new(c, SLOTS, 256);
    for slot in 0..SLOTS {
        rx.admit(slot, 1 << 20).unwrap();
    }
    let pids: Vec<i32> = (0..SLOTS)
        .map(|slot| {
            // SAFETY: the child runs only `message_child`, which ends in
            // `_exit`.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                message_child(s.fd, s.len, geo, slot);
            }
            pid
        })
        .collect();
    let mut next = [0u64; SLOTS];
    let mut sums = [0xcbf2_9ce4_8422_2325u64; SLOTS];
    let (mut taken, mut fragmented, mut late) = (0u64, 0u64, 0u64);
    let mut bad: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while taken < SLOTS as u64 * MESSAGES {
        assert!(Instant::now() < deadline, "stuck after {taken} messages");
        let (n, wake) = rx
            .poll(16, &mut |slot, tag, m| {
                let body = m.to_vec();
                let seq = next[slot];
                if tag as usize != slot || body.len() != message_len(slot, seq, geo.max_record) {
                    bad.get_or_insert(format!(
                        "slot {slot} message {seq}: tag {tag}, {} bytes",
                        body.len()
                    ));
                }
                for (i, &b) in body.iter().enumerate() {
                    if b != byte(slot, seq, i) {
                        bad.get_or_insert(format!("slot {slot} message {seq} byte {i}"));
                    }
                    sums[slot] = fnv(sums[slot], b);
                }
                fragmented += (body.len() > geo.max_record) as u64;
                next[slot] += 1;
            })
            .unwrap();
        assert!(bad.is_none(), "{}", bad.take().unwrap());
        for slot in 0..SLOTS {
            assert!(
                !rx.slot_broken(slot),
                "slot {slot}: {:?}",
                rx.take_slot_error(slot)
            );
        }
        taken += n as u64;
        ring_woken(&s, geo, wake);
        if n == 0 {
            // What was taken goes back before the consumer sleeps (a poll
            // that finds nothing may leave it for the next one).
            let c = rx.consumer();
            ring_woken(&s, geo, c.flush());
            let bell = c.bell();
            // SAFETY: the queue's doorbell word.
            let seen = unsafe { (*bell).load(Ordering::Acquire) };
            if c.prepare_sleep() {
                let t = Instant::now();
                futex_wait(bell, seen, Duration::from_secs(2));
                c.finish_sleep();
                if t.elapsed() >= Duration::from_secs(2) && c.peek().unwrap().is_some() {
                    late += 1;
                }
            }
        }
    }
    for pid in pids {
        assert_eq!(reap(pid), 0);
    }
    for slot in 0..SLOTS {
        assert_eq!(next[slot], MESSAGES);
        assert!(!rx.slot_broken(slot));
        assert_eq!(
            s.side(geo, slot).load(Ordering::Acquire),
            sums[slot],
            "slot {slot} checksum"
        );
        assert_eq!(
            s.side(geo, 16 + slot).load(Ordering::Relaxed),
            0,
            "producer {slot} slept out its time-out"
        );
    }
    assert_eq!(late, 0, "a consumer that slept was not rung");
    assert!(
        fragmented > SLOTS as u64 * MESSAGES / 4,
        "fragmented: {fragmented}"
    );
    eprintln!("{taken} messages, {fragmented} of them fragmented");
}

#[test]
fn a_slot_that_breaks_the_framing_breaks_alone_and_an_unadmitted_slot_breaks_the_queue() {
    let geo = Geometry::new(4096, 200, 4).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives producers and consumer.
    let c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let mut rx = QueueRx::new(c, 4, 256);
    for slot in 0..3 {
        rx.admit(slot, 1000).unwrap();
    }
    let mut txs: Vec<QueueTx> = (0..4)
        .map(|slot| {
            QueueTx::new(unsafe { Producer::attach(s.base, geo, slot) }.unwrap(), 200).unwrap()
        })
        .collect();
    let send = |tx: &mut QueueTx, tag: u8, msg: &[u8]| {
        let (mut sent, mut ring) = (0, false);
        assert!(tx.try_send(tag, msg, &mut sent, &mut ring).unwrap());
    };
    let big: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
    send(&mut txs[0], 0, &big);
    // Slot 1 sends a fragment with no first record, then a message.
    txs[1]
        .producer()
        .push(kind::MORE, 1, &[b"stray"])
        .unwrap()
        .unwrap();
    send(&mut txs[1], 1, b"after");
    send(&mut txs[2], 2, b"two");
    let mut got = Vec::new();
    let (n, _) = rx
        .poll(16, &mut |slot, tag, m| got.push((slot, tag, m.to_vec())))
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(got, vec![(0, 0, big.clone()), (2, 2, b"two".to_vec())]);
    assert!(rx.slot_broken(1));
    assert!(matches!(
        rx.take_slot_error(1),
        Some(Error::Broken(Violation::BadSequence))
    ));
    assert!(rx.take_slot_error(1).is_none() && rx.take_slot_error(0).is_none());
    // The others go on; slot 1's records are passed over.
    send(&mut txs[1], 1, b"ignored");
    send(&mut txs[0], 0, b"zero");
    got.clear();
    rx.poll(16, &mut |slot, tag, m| got.push((slot, tag, m.to_vec())))
        .unwrap();
    assert_eq!(got, vec![(0, 0, b"zero".to_vec())]);
    // Slot 3 was never admitted: its record breaks the queue.
    send(&mut txs[3], 3, b"outsider");
    assert!(matches!(
        rx.poll(16, &mut |_, _, _| panic!("delivered")),
        Err(Error::Broken(Violation::BadSender))
    ));
    assert!(rx.poll(16, &mut |_, _, _| {}).is_err(), "broken for good");
}

#[test]
fn two_piece_fast_pushes_of_every_short_length_arrive_intact_and_leave_the_rest_to_push() {
    // Records of every head and body length from 0 to 70 (both variants
    // of the copy: each piece up to 64 bytes, and longer), through a 4 KiB
    // queue with another slot's records between them: the fast path takes
    // what fits before the end and in the room it knows of, and declines
    // the rest (padding, a full queue), which `push` then sends. Every byte
    // checked.
    let geo = Geometry::new(4096, 1000, 2).unwrap();
    let s = Shm::new(geo);
    // SAFETY: `s` outlives both ends.
    let mut c = unsafe { Consumer::new(s.base, geo) }.unwrap();
    let mut p = unsafe { Producer::attach(s.base, geo, 1) }.unwrap();
    let mut other = unsafe { Producer::attach(s.base, geo, 0) }.unwrap();
    // A consumer that may sleep must be rung: nothing goes the fast way.
    p.learn_peer();
    assert!(!p.push2_fast::<true>(kind::MSG, 1, b"head", b"body"));
    c.declare_polling();
    p.learn_peer();
    let (mut fast, mut slow, mut n) = (0, 0, 0u64);
    for h in 0..=70usize {
        for b in 0..=70usize {
            n += 1;
            let head: Vec<u8> = (0..h).map(|i| byte(1, n, i)).collect();
            let body: Vec<u8> = (0..b).map(|i| byte(1, n, h + i)).collect();
            let tag = (n % 200) as u8;
            let went = if h <= 64 && b <= 64 {
                p.push2_fast::<true>(kind::MSG, tag, &head, &body)
            } else {
                p.push2_fast::<false>(kind::MSG, tag, &head, &body)
            };
            if went {
                fast += 1;
            } else {
                slow += 1;
                // the general path, after the consumer made room
                let mut pushed = p.push(kind::MSG, tag, &[&head, &body]).unwrap();
                while pushed.is_none() {
                    while let Some(r) = c.peek().unwrap() {
                        c.release_quiet(&r);
                    }
                    c.flush();
                    pushed = p.push(kind::MSG, tag, &[&head, &body]).unwrap();
                }
            }
            if n % 3 == 0 {
                other.push(kind::MSG, 7, &[b"between"]).unwrap();
            }
            // take everything there: the other slot's, then this record
            let mut mine = None;
            while let Some(r) = c.peek().unwrap() {
                if r.slot == 1 {
                    // SAFETY: valid until the release below.
                    let got = unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec();
                    mine = Some((r.tag, got));
                } else {
                    assert_eq!((r.slot, r.tag, r.len), (0, 7, 7));
                }
                c.release_quiet(&r);
            }
            let want: Vec<u8> = head.iter().chain(&body).copied().collect();
            assert_eq!(mine, Some((tag, want)), "head {h}, body {b}");
            if c.unpublished() >= BATCH_BYTES {
                c.flush();
            }
        }
    }
    assert!(fast > slow && slow > 0, "{fast} fast, {slow} declined");
    eprintln!("{fast} records the fast way, {slow} declined");
}
