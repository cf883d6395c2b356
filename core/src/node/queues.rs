//! The queue path: a pair of processes that talk through receive queues
//! instead of a pair of rings (docs/design.md, "The queue path").
//!
//! Each process keeps one receive queue per peer domain ([`Hub`]), created
//! when the first process of that domain becomes a peer and shared with
//! every further one, each writing in a slot of its own. A link on the
//! queue path ([`QueueLink`]) sends as a producer in the slot the peer
//! gave it in the peer's queue for this domain, and receives its peer's
//! slot of this process's queue for the peer's domain.
//!
//! Receiving. A queue holds the records of all its slots in the order they
//! were reserved; a link's poll takes them in that order, hands up its own
//! slot's messages and sets the others' aside (copied: the peer could
//! rewrite them in place) for their own links' polls, up to
//! [`STASH_LIMIT`] bytes. Past that a poll takes nothing more from the
//! queue until those links take what waits for them: a link that is never
//! polled holds its domain's queue back, as a full ring holds back its one
//! sender, and never makes the process buffer without bound.
//!
//! Trust. A slot that breaks the framing breaks its own link only; a
//! record that breaks the queue's rules, or names a slot no handshake gave
//! out, breaks the queue and every link of that domain
//! ([`crate::queue_path`]). A link that goes away leaves its slot: records
//! still in the queue for it are passed over.

use crate::card::Card;
use crate::channel::{WaitPolicy, POLL_NAP};
use crate::error::{Error, Result, Violation};
use crate::frame::Stats;
use crate::hypervisor::{self, BellGroup, BellWords, Doorbell, Hypervisor, Region};
use crate::payload::Payload;
use crate::queue::{self, Consumer, Geometry, Producer, Reservation, Wake};
use crate::queue_path::{QueueRx, QueueTx};
use crate::record::kind;
use crate::ring::Batch;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of other links' messages that polls may set aside before they
/// stop taking records from a queue.
pub const STASH_LIMIT: usize = 4 << 20;
/// How long a queue may stay blocked at one record, after a process of
/// its domain was seen to die, before it is broken: a live producer
/// publishes a record it reserved within a copy's time, a dead one never.
pub const STUCK: Duration = Duration::from_secs(1);
/// Longest sleep of a blocking call on the queue path between two looks
/// at the peer (a doorbell normally ends it first).
const NAP: Duration = Duration::from_millis(20);

/// Turns an error kept for later polls into one to return again.
fn again(e: &Error) -> Error {
    match e {
        Error::Broken(v) => Error::Broken(*v),
        e => Error::Protocol(e.to_string()),
    }
}

/// The lock of a queue's receiving state ([`Rx`]): a word taken with one
/// compare-and-swap and given back with one store. A queue link takes it
/// twice for each batch it hands up in place (to take the batch, and to
/// release it), a ping-pong twice a message; `std`'s mutex gives back with
/// a swap and checks for a panic in flight at both ends (a round trip of
/// 8 B messages over queues took 119 more instructions with it). A panic
/// under the lock (a caller's callback) gives it back as the guard
/// unwinds; the mutex's poisoning was ignored here anyway. A thread that
/// finds the lock held spins a little and then yields its core until it
/// is free: holders run a bounded stretch (a poll of the queue hands its
/// records up under the lock, as under the mutex; a sleep for records
/// drops it first).
struct QueueLock<T> {
    held: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: `data` is reached only through a `QueueGuard`, of which one
// exists at a time (the `held` word, taken with acquire and given back
// with release ordering, orders each holder's accesses after the previous
// holder's); `T` may move between threads, as for `Mutex<T>`.
unsafe impl<T: Send> Sync for QueueLock<T> {}

/// Holds a [`QueueLock`] until dropped.
struct QueueGuard<'a, T> {
    lock: &'a QueueLock<T>,
}

impl<T> QueueLock<T> {
    fn new(data: T) -> QueueLock<T> {
        QueueLock {
            held: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    /// The lock, if nobody holds it.
    #[inline]
    fn try_lock(&self) -> Option<QueueGuard<'_, T>> {
        self.held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| QueueGuard { lock: self })
    }

    /// The lock, once free: spins while it looks held, up to 64 looks,
    /// then yields the core between looks.
    fn lock(&self) -> QueueGuard<'_, T> {
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            let mut spins = 0;
            while self.held.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl<T> std::ops::Deref for QueueGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock (see `QueueLock`'s Sync).
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> std::ops::DerefMut for QueueGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and the guard is borrowed mutably.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for QueueGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.held.store(false, Ordering::Release);
    }
}

/// What the polls of one queue share.
struct Rx {
    rx: QueueRx,
    /// Messages of each slot taken by another slot's poll, in order.
    stash: Vec<VecDeque<(u8, Box<[u8]>)>>,
    /// Bytes and messages set aside.
    stashed: usize,
    aside: usize,
    /// Per slot: the doorbell that wakes its producer (shared: a blocking
    /// receive sleeps on it without holding the lock).
    bells: Vec<Option<Arc<dyn Doorbell>>>,
    /// Slots whose link went away: their records are passed over.
    gone: Vec<bool>,
    /// Why the queue broke, for good.
    broken: Option<Error>,
    /// A process of the domain was seen to die (its link's connection):
    /// it may have left a reserved record that will never be published.
    death: bool,
    /// The consumer index at which the queue was first seen blocked after
    /// a death, and when.
    stuck: Option<(u64, Instant)>,
    /// A link holds the queue's next records, handed up in place
    /// ([`Hub::take_heads`]): nothing else reads the queue until they are
    /// released.
    taken: bool,
}

impl Rx {
    /// Rings the producers in `wake` (most often none: a test inline).
    #[inline(always)]
    fn ring(&self, wake: Wake) {
        if wake != Wake::default() {
            self.ring_some(wake);
        }
    }

    #[inline(never)]
    fn ring_some(&self, wake: Wake) {
        for (w, bits) in wake.iter().enumerate() {
            let mut b = *bits;
            while b != 0 {
                let s = w * 64 + b.trailing_zeros() as usize;
                b &= b - 1;
                if let Some(Some(bell)) = self.bells.get(s) {
                    let _ = bell.notify();
                }
            }
        }
    }
}

/// This process's receive queue for one peer domain.
pub(super) struct Hub {
    domain: u32,
    geo: Geometry,
    nonce: u64,
    /// Offers are made one at a time (the host backend hands the region
    /// over once per offer): whether one is under way, and the next slot
    /// to give out.
    offers: Mutex<(bool, usize)>,
    offers_cv: std::sync::Condvar,
    /// The doorbells of the queue's producers, where the backend keeps
    /// them together (Xen); `None`: each is offered on its own.
    bell_group: Option<Box<dyn BellGroup>>,
    rx: QueueLock<Rx>,
    /// The consumer index while the queue is at rest (nothing taken, held
    /// or set aside; not broken; no death seen), with [`CLEAR_DUE`] set
    /// while released space waits to be handed back; else [`BUSY`]: with
    /// `watch`, a poller learns that nothing waits without the lock
    /// ([`Hub::looks_idle`]). Written under the lock.
    rest: AtomicU64,
    /// A poller has looked since space was left to hand back.
    looked: AtomicBool,
    watch: queue::Watch,
    /// The shared pages; dropped after everything that points into them.
    region: Box<dyn Region>,
}

/// [`Hub::rest`] while the queue is not at rest.
const BUSY: u64 = u64::MAX;
/// In [`Hub::rest`] (indices are multiples of 16): released space waits to
/// be handed back.
const CLEAR_DUE: u64 = 1;

/// An offer of a slot in a [`Hub`], from [`Hub::offer`] until the
/// handshake ends. Until [`Hub::serve`] handed the region over, the
/// queue's other offers wait (the host backend hands a region over once
/// per offer); nothing in that wait needs a lock of the peer's, so two
/// processes that offer to each other at once do not wait for each other.
pub(super) struct SlotOffer {
    hub: Arc<Hub>,
    /// Whether this offer still holds the queue's turn.
    turn: bool,
    pub slot: usize,
    pub grant: Vec<u8>,
    pub bell_desc: Vec<u8>,
    bell: Option<Box<dyn Doorbell>>,
}

impl SlotOffer {
    fn end_turn(&mut self) {
        if std::mem::take(&mut self.turn) {
            let mut o = self.hub.offers.lock().unwrap_or_else(|e| e.into_inner());
            o.0 = false;
            self.hub.offers_cv.notify_one();
        }
    }
}

impl Drop for SlotOffer {
    fn drop(&mut self) {
        self.end_turn();
    }
}

impl Hub {
    /// Creates and shares the queue for `domain`: `data_size` bytes of
    /// records of at most `max_record`, messages with tags below
    /// `tag_limit`.
    pub fn new(
        hv: &dyn Hypervisor,
        domain: u32,
        data_size: usize,
        max_record: usize,
        polls: bool,
        tag_limit: u16,
    ) -> Result<Hub> {
        let geo = Geometry::new(data_size, max_record, queue::MAX_SLOTS)?;
        let region = hv.share_domain(domain, geo.region_bytes())?;
        let bell_group = hv.bell_group(domain)?;
        let nonce = hypervisor::random_u64();
        // SAFETY: a fresh, zeroed, page-aligned region of region_bytes that
        // nobody maps yet.
        unsafe { queue::init(region.as_ptr(), geo, nonce) };
        // SAFETY: the region stays mapped as long as the hub (dropped last).
        let c = unsafe { Consumer::new(region.as_ptr(), geo) }?;
        if polls {
            c.declare_polling();
        }
        let watch = c.watch();
        Ok(Hub {
            domain,
            geo,
            nonce,
            offers: Mutex::new((false, 0)),
            offers_cv: std::sync::Condvar::new(),
            bell_group,
            rx: QueueLock::new(Rx {
                rx: QueueRx::new(c, geo.slots, tag_limit),
                stash: (0..geo.slots).map(|_| VecDeque::new()).collect(),
                stashed: 0,
                aside: 0,
                bells: (0..geo.slots).map(|_| None).collect(),
                gone: vec![false; geo.slots],
                broken: None,
                death: false,
                stuck: None,
                taken: false,
            }),
            rest: AtomicU64::new(0),
            looked: AtomicBool::new(false),
            watch,
            region,
        })
    }

    /// The queue's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The nonce a mapper must read back.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    fn rx(&self) -> QueueGuard<'_, Rx> {
        self.rx.lock()
    }

    /// Gives the next slot to a process of the domain: its descriptor and
    /// doorbell. The offer holds the queue's turn (other offers wait)
    /// until it is served ([`Hub::serve`]), admitted or dropped.
    pub fn offer(self: &Arc<Self>, hv: &dyn Hypervisor) -> Result<SlotOffer> {
        let mut o = self.offers.lock().unwrap_or_else(|e| e.into_inner());
        while o.0 {
            // Bounded by the other handshake's deadline.
            o = self.offers_cv.wait(o).unwrap_or_else(|e| e.into_inner());
        }
        let slot = o.1;
        if slot >= self.geo.slots {
            return Err(Error::Backend(format!(
                "the receive queue for domain {} has given out all its {} slots",
                self.domain, self.geo.slots
            )));
        }
        // A slot offered is never offered again, taken or not: no record
        // of an earlier taker can be read as a later one's.
        o.1 += 1;
        o.0 = true;
        drop(o);
        let mut offer = SlotOffer {
            hub: self.clone(),
            turn: true,
            slot,
            grant: Vec::new(),
            bell_desc: Vec::new(),
            bell: None,
        };
        offer.grant = self.region.offer()?;
        let words = {
            let mut g = self.rx();
            let c = g.rx.consumer();
            BellWords {
                wait: c.bell(),
                ring: c.slot_bell(slot),
            }
        };
        let (bell, bell_desc) = match &self.bell_group {
            Some(g) => g.offer(words)?,
            None => hv.bell_offer(self.domain, words)?,
        };
        offer.bell = Some(bell);
        offer.bell_desc = bell_desc;
        Ok(offer)
    }

    /// Hands the region over to the process `offer` is for (host
    /// backend), until it fetched it, `deadline` passes or `abort` turns
    /// readable; then lets the queue's next offer go.
    pub fn serve(
        &self,
        offer: &mut SlotOffer,
        deadline: Instant,
        abort: std::os::fd::RawFd,
    ) -> Result<()> {
        let r = self.region.serve(deadline, abort);
        offer.end_turn();
        r
    }

    /// Admits the slot of an offer the peer proved it mapped.
    pub fn admit(&self, mut offer: SlotOffer, max_message: usize) -> Result<usize> {
        offer.end_turn();
        let mut g = self.rx();
        g.rx.admit(offer.slot, max_message)?;
        g.bells[offer.slot] = offer.bell.take().map(Arc::from);
        Ok(offer.slot)
    }

    /// The link of `slot` went away: its records are passed over from now.
    fn leave(&self, slot: usize) {
        let mut g = self.rx();
        g.gone[slot] = true;
        let (freed, n) = g.stash[slot]
            .drain(..)
            .fold((0, 0), |(b, n), (_, m)| (b + m.len(), n + 1));
        g.stashed -= freed;
        g.aside -= n;
        g.bells[slot] = None;
        self.note_rest(&g);
    }

    /// Notes whether the queue is at rest now ([`Hub::rest`]); under the
    /// lock, after anything that changes it.
    #[inline]
    fn note_rest(&self, g: &Rx) {
        let at_rest = !g.taken && g.broken.is_none() && !g.death && g.aside == 0;
        let at = match at_rest.then(|| g.rx.at_rest()).flatten() {
            Some(idx) if g.rx.unpublished() > 0 => {
                self.looked.store(false, Ordering::Relaxed);
                idx | CLEAR_DUE
            }
            Some(idx) => idx,
            None => BUSY,
        };
        self.rest.store(at, Ordering::Release);
    }

    /// Whether nothing waits for the queue's links now, learnt without the
    /// lock: the queue is at rest and no record is published at its index.
    /// While released space waits to be handed back, the first look leaves
    /// it and the next one hands it back (under the lock, when it is free:
    /// else it answers `false`, and the full poll does): the stores that
    /// clear the space each wait for a line a producer wrote, and would
    /// otherwise queue in front of what the receiver sends in between, its
    /// answer to the message it took. A hint for pollers (a full poll
    /// decides); `false` when unsure.
    #[inline]
    pub fn looks_idle(&self) -> bool {
        let at = self.rest.load(Ordering::Acquire);
        if at == BUSY || self.watch.published_at(at & !CLEAR_DUE) {
            return false;
        }
        if at & CLEAR_DUE == 0 || !self.looked.swap(true, Ordering::Relaxed) {
            return true;
        }
        self.clear_due()
    }

    /// The look that hands released space back ([`Hub::looks_idle`]):
    /// whether the queue is idle after it; `false` when another thread
    /// holds the queue.
    #[inline(never)]
    fn clear_due(&self) -> bool {
        let Some(mut g) = self.rx.try_lock() else {
            return false;
        };
        self.hand_back(&mut g);
        drop(g);
        let at = self.rest.load(Ordering::Acquire);
        at != BUSY && !self.watch.published_at(at & !CLEAR_DUE)
    }

    /// A process of the domain died (a link's control connection said so).
    pub fn peer_died(&self) {
        let mut g = self.rx();
        g.death = true;
        self.note_rest(&g);
    }

    /// Delivers up to `max` of `slot`'s messages to `f`: those set aside
    /// first, then from the queue (setting the other slots' aside). `Ok(0)`
    /// as well when another thread polls the queue (it sets ours aside).
    fn poll(
        &self,
        slot: usize,
        max: usize,
        f: &mut dyn FnMut(u8, Payload<'_>),
        stats: &mut Stats,
    ) -> Result<usize> {
        let Some(mut g) = self.rx.try_lock() else {
            return Ok(0);
        };
        let r = self.poll_locked(&mut g, slot, max, f, stats);
        self.note_rest(&g);
        r
    }

    /// [`Hub::poll`] under the lock.
    fn poll_locked(
        &self,
        g: &mut Rx,
        slot: usize,
        max: usize,
        f: &mut dyn FnMut(u8, Payload<'_>),
        stats: &mut Stats,
    ) -> Result<usize> {
        if g.taken {
            // Another link holds the head; this one's records come after.
            return Ok(0);
        }
        if let Some(e) = &g.broken {
            return Err(again(e));
        }
        if let Some(e) = g.rx.take_slot_error(slot) {
            return Err(e);
        }
        if g.rx.slot_broken(slot) {
            return Err(Error::Protocol(
                "this link's records broke its framing earlier".into(),
            ));
        }
        let mut n = 0;
        while n < max {
            let Some((tag, m)) = g.stash[slot].pop_front() else {
                break;
            };
            g.stashed -= m.len();
            g.aside -= 1;
            stats.rx_msgs += 1;
            stats.rx_bytes += m.len() as u64;
            f(tag, Payload::private(&m));
            n += 1;
        }
        if n == max || g.stashed > STASH_LIMIT {
            return Ok(n);
        }
        let Rx {
            rx,
            stash,
            stashed,
            aside,
            gone,
            ..
        } = g;
        let r = rx.poll(max - n, &mut |s, tag, p| {
            if s == slot {
                stats.rx_msgs += 1;
                stats.rx_bytes += p.len() as u64;
                f(tag, p);
                n += 1;
            } else if !gone[s] {
                let mut m = vec![0u8; p.len()].into_boxed_slice();
                p.read_at(0, &mut m);
                *stashed += m.len();
                *aside += 1;
                stash[s].push_back((tag, m));
            }
        });
        let r = match r {
            Ok((0, wake)) if g.death => {
                g.ring(wake);
                self.check_stuck(g)
            }
            r => r.map(|(_, wake)| g.ring(wake)),
        };
        match r {
            Ok(()) => Ok(n),
            Err(e) => {
                g.broken = Some(again(&e));
                // Producers that sleep for room learn it from the closed
                // flag.
                let wake = g.rx.consumer().close();
                g.ring(wake);
                Err(e)
            }
        }
    }

    /// The queue's next records while they are whole messages of `slot`
    /// and nothing of `slot`'s waits aside: up to `max` (at most a
    /// [`Batch`]'s), each handed to `put` (its place in the run, from 0,
    /// and the record), in place in the shared pages, held (the queue's
    /// other links take nothing) until [`Hub::release_head`]. Returns how
    /// many; 0 in any other case, errors included: [`Hub::poll`] deals
    /// with those.
    #[inline(always)]
    fn take_heads(
        &self,
        slot: usize,
        max: usize,
        stats: &mut Stats,
        mut put: impl FnMut(usize, &queue::Record),
    ) -> usize {
        let Some(mut g) = self.rx.try_lock() else {
            return 0;
        };
        if g.taken || g.broken.is_some() || !g.stash[slot].is_empty() {
            return 0;
        }
        let mut bytes = 0;
        let n =
            g.rx.take_own(slot, max.min(Batch::CAP), |i, r| {
                bytes += r.len as u64;
                put(i, r);
            })
            .unwrap_or(0);
        if n > 0 {
            g.taken = true;
            self.note_rest(&g);
            stats.rx_msgs += n as u64;
            stats.rx_bytes += bytes;
        }
        n
    }

    /// Releases the records [`Hub::take_heads`] handed out.
    #[inline]
    fn release_head(&self) {
        let mut g = self.rx();
        debug_assert!(g.taken);
        g.taken = false;
        let wake = g.rx.release_taken();
        g.ring(wake);
        self.note_rest(&g);
    }

    /// After a death, with nothing to take: a queue blocked at the same
    /// record for [`STUCK`] is broken (the dead process had reserved it).
    fn check_stuck(&self, g: &mut Rx) -> Result<()> {
        let c = g.rx.consumer();
        if !c.blocked() {
            g.stuck = None;
            return Ok(());
        }
        let idx = c.index();
        match g.stuck {
            Some((at, since)) if at == idx => {
                if since.elapsed() >= STUCK {
                    return Err(Error::PeerGone(format!(
                        "receive queue for domain {}: a process of that domain died while \
                         writing a record, which the queue waited for {} ms",
                        self.domain,
                        since.elapsed().as_millis()
                    )));
                }
            }
            _ => g.stuck = Some((idx, Instant::now())),
        }
        Ok(())
    }

    /// Hands back what was taken (producers waiting for room wait for it).
    fn flush(&self) {
        self.hand_back(&mut self.rx());
    }

    /// [`Hub::flush`] under the lock: clears and publishes what was
    /// released, rings the producers that wait for it, notes the rest.
    fn hand_back(&self, g: &mut Rx) {
        let wake = g.rx.consumer().flush();
        g.ring(wake);
        self.note_rest(g);
    }

    /// Sleeps until a producer rings the queue or `timeout` passes (at
    /// once when records wait).
    fn wait(&self, slot: usize, timeout: Duration) {
        let mut g = self.rx();
        self.hand_back(&mut g);
        let Some(bell) = g.bells[slot].clone() else {
            return;
        };
        let token = bell.prepare();
        if !g.rx.consumer().prepare_sleep() {
            g.rx.consumer().finish_sleep();
            return;
        }
        // Asleep without the lock: the queue's other links poll meanwhile.
        drop(g);
        // A doorbell that fails leaves the time-limited sleep.
        let _ = bell.wait(token, timeout);
        self.rx().rx.consumer().finish_sleep();
    }
}

/// A queue's record as a batch holds a message taken in place.
#[inline(always)]
fn in_place(r: &queue::Record) -> crate::ring::Record {
    crate::ring::Record {
        ptr: r.ptr,
        len: r.len,
        kind: r.kind,
        tag: r.tag,
    }
}

/// A link's two ends on the queue path.
pub(super) struct QueueLink {
    tx: QueueTx,
    /// Rings the peer's queue; this slot sleeps on it for room.
    tx_bell: Box<dyn Doorbell>,
    /// The peer's queue, mapped (after `tx`, which points into it).
    _tx_region: Box<dyn Region>,
    max_record: usize,
    /// How blocking calls wait; without doorbell sleeps (`sleep` false)
    /// the producer declared that it never sleeps for room.
    policy: WaitPolicy,
    hub: Arc<Hub>,
    /// The peer's slot in `hub`.
    slot: usize,
    /// What `peek_msg` or `peek_msgs` took, until `release_msg`.
    held: Held,
    /// The bytes of a message copied out ([`Held::Copied`]), kept from one
    /// message to the next: no allocation a message.
    held_buf: Vec<u8>,
    /// The last `peek_msgs` found nothing to take in place.
    heads_tried: bool,
    /// Space reserved in the peer's queue for a message written in place
    /// ([`QueueLink::reserve`]), until it is committed or cancelled: the
    /// queue's consumer waits at it, so it is never left behind.
    reserved: Option<Reservation>,
    stats: Stats,
    /// The peer said on the control connection that it closed.
    peer_closed: bool,
    /// This side said so.
    closed: bool,
}

/// What a [`QueueLink`] handed up and holds until its `release_msg`.
#[derive(Clone, Copy)]
enum Held {
    /// Nothing.
    None,
    /// A message copied out of the queue into `held_buf`: its tag.
    Copied(u8),
    /// A message in the queue: its tag, and its payload's address and
    /// length in the shared pages. The queue stays taken
    /// ([`Hub::take_heads`]) until it is released.
    InPlace(u8, usize, usize),
    /// The messages of a [`Batch`], in the queue, holding it as
    /// [`Held::InPlace`] does.
    Batch,
}

/// The byte a closing link writes on its control connection: everything
/// it sent is in the queue before it.
pub(super) const CLOSE_BYTE: u8 = b'C';

/// A peer's queue for this domain, mapped, with this process attached as
/// the producer of its slot in it, and the doorbell it rings the queue by.
pub(super) struct PeerQueue {
    /// Attached to `region` (declared first: dropped before it).
    producer: Producer,
    max_record: usize,
    region: Box<dyn Region>,
    bell: Box<dyn Doorbell>,
}

impl PeerQueue {
    /// Maps the queue a peer offered (`grant`, geometry `geo` checked by
    /// [`check_offer`]) and attaches to it as the producer of `slot`,
    /// after checking its control page; then connects to its doorbell
    /// (`bell`). Returns it and the nonce read in it.
    pub fn map(
        hv: &dyn Hypervisor,
        peer: &Card,
        grant: &[u8],
        bell: &[u8],
        geo: Geometry,
        slot: usize,
    ) -> Result<(PeerQueue, u64)> {
        let region = hv.map(peer.domain, grant, geo.region_bytes())?;
        if region.len() < geo.region_bytes() {
            return Err(Error::Broken(Violation::BadGeometry));
        }
        // SAFETY: the mapping holds region_bytes and lives as long as the
        // producer (the struct drops the producer first).
        let producer = unsafe { Producer::attach(region.as_ptr(), geo, slot) }?;
        let words = BellWords {
            wait: producer.slot_bell(),
            ring: producer.bell(),
        };
        let bell = hv.bell_accept(peer.domain, bell, words)?;
        let nonce = producer.nonce();
        let pq = PeerQueue {
            producer,
            max_record: geo.max_record,
            region,
            bell,
        };
        Ok((pq, nonce))
    }
}

impl QueueLink {
    /// Attaches to the peer's queue `pq` as the producer of its slot;
    /// receives slot `slot` of `hub`.
    /// Blocking calls wait as `policy` says; without doorbell sleeps
    /// the producer declares that it polls.
    pub fn new(pq: PeerQueue, hub: Arc<Hub>, slot: usize, policy: WaitPolicy) -> Result<QueueLink> {
        let PeerQueue {
            producer: mut p,
            max_record,
            region,
            bell,
        } = pq;
        let polls = !policy.sleep;
        if polls {
            p.declare_polling();
        }
        p.learn_peer();
        Ok(QueueLink {
            tx: QueueTx::new(p, max_record)?,
            tx_bell: bell,
            _tx_region: region,
            max_record,
            policy,
            hub,
            slot,
            held: Held::None,
            held_buf: Vec::new(),
            heads_tried: false,
            reserved: None,
            stats: Stats::default(),
            peer_closed: false,
            closed: false,
        })
    }

    pub fn max_record(&self) -> usize {
        self.max_record
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether the peer wrote its close byte on the control connection
    /// `ctl` (everything it sent is in the queue before it), noted the
    /// first time: `true` only then.
    pub fn saw_close_byte(&mut self, ctl: &std::net::TcpStream) -> bool {
        if self.peer_closed {
            return false;
        }
        self.peer_closed = matches!(crate::tcp::peek_byte(ctl), Ok(Some(CLOSE_BYTE)));
        self.peer_closed
    }

    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Marks this side closed: `true` the first time only (the close byte
    /// is written once).
    pub fn close_once(&mut self) -> bool {
        !std::mem::replace(&mut self.closed, true)
    }

    /// Counts a message of `len` bytes that went whole (`done`), and rings
    /// the peer's queue when its consumer sleeps (`ring`).
    fn sent(&mut self, done: bool, ring: bool, len: usize) -> Result<()> {
        if done {
            self.stats.tx_msgs += 1;
            self.stats.tx_bytes += len as u64;
        }
        if ring {
            self.stats.tx_doorbells += 1;
            self.tx_bell.notify()?;
        }
        Ok(())
    }

    /// A message of at most a record, gathered from `parts`.
    pub fn try_send(&mut self, tag: u8, parts: &[&[u8]]) -> Result<bool> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_record {
            return Err(Error::TooLarge {
                len,
                max: self.max_record,
            });
        }
        match self.tx.producer().push(kind::MSG, tag, parts)? {
            Some(ring) => self.sent(true, ring, len).map(|_| true),
            None => Ok(false),
        }
    }

    /// [`QueueLink::try_send`] of two pieces in its commonest case
    /// ([`Producer::push2_fast`]): `true` when the message went, `false`
    /// when nothing was done and `try_send` must be called.
    #[inline(always)]
    pub fn try_send2_fast<const SMALL: bool>(&mut self, tag: u8, head: &[u8], body: &[u8]) -> bool {
        if !self
            .tx
            .producer()
            .push2_fast::<SMALL>(kind::MSG, tag, head, body)
        {
            return false;
        }
        self.stats.tx_msgs += 1;
        self.stats.tx_bytes += (head.len() + body.len()) as u64;
        true
    }

    /// Reserves a record of `len` bytes (at most a record) in the peer's
    /// queue for a message written in place: its payload, or `Ok(None)`
    /// when the queue is full for now. A reservation still held is given
    /// back first ([`QueueLink::cancel`]). Commit or cancel it soon: the
    /// peer takes no record reserved after it (its domain's other
    /// processes' included) until then.
    #[inline]
    pub fn reserve(&mut self, len: usize) -> Result<Option<*mut u8>> {
        self.cancel();
        // (a length above a record: the producer's `TooLarge`)
        Ok(self.tx.producer().reserve(len)?.map(|res| {
            let p = res.payload();
            self.reserved = Some(res);
            p
        }))
    }

    /// Sends the reserved message, its first `len` bytes.
    #[inline]
    pub fn commit(&mut self, len: usize, tag: u8) -> Result<()> {
        let Some(res) = self.reserved.take() else {
            return Err(Error::Invalid("commit without reservation".into()));
        };
        let ring = self.tx.producer().commit_len(res, len, kind::MSG, tag);
        self.sent(true, ring, len)
    }

    /// Gives the reservation back unused, if one is held: the peer's
    /// consumer passes its space. A doorbell that fails here is left for
    /// the link's next call to find (a consumer's sleeps are bounded).
    pub fn cancel(&mut self) {
        if let Some(res) = self.reserved.take() {
            if self.tx.producer().cancel(res) {
                self.stats.tx_doorbells += 1;
                let _ = self.tx_bell.notify();
            }
        }
    }

    /// Whether a message of `len` bytes (at most a record) finds room now;
    /// other processes of the peer's domain may take it first.
    pub fn can_send(&mut self, len: usize) -> Result<bool> {
        self.tx.producer().fits(len)
    }

    /// What is left of `msg` past `*sent`, in records.
    pub fn try_send_more(&mut self, tag: u8, msg: &[u8], sent: &mut usize) -> Result<bool> {
        let mut ring = false;
        let done = self.tx.try_send(tag, msg, sent, &mut ring)?;
        self.sent(done, ring, msg.len())?;
        Ok(done)
    }

    /// Sends `msg` whole, waiting for room until `deadline` as the wait
    /// policy says (spin, yield, then sleep until the consumer hands space
    /// back, or nap when this side does not sleep); `alive` checks the
    /// peer between sleeps.
    pub fn send(
        &mut self,
        tag: u8,
        msg: &[u8],
        deadline: Option<Instant>,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut sent = 0;
        let policy = self.policy;
        let start = Instant::now();
        loop {
            if self.try_send_more(tag, msg, &mut sent)? {
                return Ok(());
            }
            if policy.pause(start) {
                continue;
            }
            let nap = nap_until(deadline)?.min(policy.slice);
            if !policy.sleep {
                std::thread::sleep(nap.min(POLL_NAP));
            } else {
                let token = self.tx_bell.prepare();
                let p = self.tx.producer();
                if p.prepare_sleep() {
                    self.tx_bell.wait(token, nap)?;
                }
                self.tx.producer().finish_sleep();
            }
            alive()?;
        }
    }

    /// Up to `max` of the peer's messages, without blocking.
    pub fn poll(&mut self, max: usize, f: &mut dyn FnMut(u8, Payload<'_>)) -> Result<usize> {
        self.hub.poll(self.slot, max, f, &mut self.stats)
    }

    /// One message into `out`, waiting until `deadline` as the wait policy
    /// says (spin, yield, then sleep on the queue's doorbell, or nap when
    /// this side does not sleep); the peer's close byte and `alive` are
    /// looked at between sleeps.
    pub fn recv(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
        ctl: &std::net::TcpStream,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u8> {
        let policy = self.policy;
        let start = Instant::now();
        loop {
            // (a look without the queue's lock first: a spinning receiver
            // does not take it from the links that have messages)
            if !self.hub.looks_idle() {
                let mut tag = None;
                self.poll(1, &mut |t, p| {
                    out.clear();
                    out.resize(p.len(), 0);
                    p.read_at(0, out);
                    tag = Some(t);
                })?;
                if let Some(t) = tag {
                    return Ok(t);
                }
            }
            if self.peer_closed {
                return Err(Error::Closed);
            }
            if policy.pause(start) {
                continue;
            }
            if self.saw_close_byte(ctl) {
                // One more poll takes what came before the byte.
                continue;
            }
            alive()?;
            let nap = nap_until(deadline)?.min(policy.slice);
            if policy.sleep {
                self.hub.wait(self.slot, nap);
            } else {
                // Producers do not ring a consumer that polls.
                self.hub.flush();
                std::thread::sleep(nap.min(POLL_NAP));
            }
        }
    }

    /// The next message, until [`QueueLink::release_msg`]: in place when it
    /// is the queue's next record and whole (the queue's other links wait
    /// until it is released: call that soon), copied out otherwise.
    pub fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        match self.held {
            Held::InPlace(t, p, len) => return Ok(Some((t, p as *const u8, len))),
            Held::Copied(t) => return Ok(Some((t, self.held_buf.as_ptr(), self.held_buf.len()))),
            Held::Batch => return Ok(None),
            Held::None => {}
        }
        // (not again right after a `peek_msgs` that took nothing: the poll
        // below takes whatever came since, copied)
        let mut one = None;
        if !std::mem::take(&mut self.heads_tried) {
            self.hub.take_heads(self.slot, 1, &mut self.stats, |_, r| {
                one = Some(in_place(r))
            });
        }
        if let Some(m) = one {
            self.held = Held::InPlace(m.tag, m.ptr as usize, m.len);
            return Ok(Some((m.tag, m.ptr, m.len)));
        }
        let (mut got, buf) = (None, &mut self.held_buf);
        self.hub.poll(
            self.slot,
            1,
            &mut |t, p| {
                buf.clear();
                buf.resize(p.len(), 0);
                p.read_at(0, buf);
                got = Some(t);
            },
            &mut self.stats,
        )?;
        Ok(got.map(|t| {
            self.held = Held::Copied(t);
            (t, self.held_buf.as_ptr(), self.held_buf.len())
        }))
    }

    /// True when nothing waits for this link and it holds nothing (a hint
    /// taken without the queue's lock: [`Hub::looks_idle`]).
    #[inline]
    pub fn looks_idle(&self) -> bool {
        matches!(self.held, Held::None) && self.hub.looks_idle()
    }

    /// The queue's next records while they are whole messages of this
    /// link, in place, up to `max` (at most a [`Batch`]), into `out`,
    /// until [`QueueLink::release_msg`], which releases them all (the
    /// queue's other links wait until then). 0 when the next message needs
    /// [`QueueLink::peek_msg`] (nothing there, another link's record, a
    /// message in fragments, an error), or one is held.
    pub fn peek_msgs(&mut self, out: &mut Batch, max: usize) -> usize {
        out.clear();
        self.peek_msgs_with(max, |_, r| out.push(in_place(r)))
    }

    /// [`QueueLink::peek_msgs`] handing each message to `put` (its place
    /// in the run, from 0, and the record) in place of a [`Batch`].
    #[inline(always)]
    pub fn peek_msgs_with(&mut self, max: usize, put: impl FnMut(usize, &queue::Record)) -> usize {
        if !matches!(self.held, Held::None) {
            return 0;
        }
        let n = self.hub.take_heads(self.slot, max, &mut self.stats, put);
        if n > 0 {
            self.held = Held::Batch;
        }
        self.heads_tried = n == 0;
        n
    }

    /// Releases what [`QueueLink::peek_msg`] or [`QueueLink::peek_msgs`]
    /// took (the queue's other links may take theirs again).
    #[inline]
    pub fn release_msg(&mut self) {
        if let Held::InPlace(..) | Held::Batch = std::mem::replace(&mut self.held, Held::None) {
            self.hub.release_head();
        }
        // A large message's buffer is not kept.
        if self.held_buf.capacity() > 256 << 10 {
            self.held_buf = Vec::new();
        }
    }

    /// The peer was found dead: its queue slot may hold a record it will
    /// never publish.
    pub fn peer_died(&self) {
        self.hub.peer_died();
    }

    /// Reserves a record in the peer's queue and never publishes it, as a
    /// process that dies mid-write does. For tests only.
    pub fn leave_a_hole(&mut self, len: usize) -> Result<bool> {
        Ok(self.tx.producer().reserve(len)?.is_some())
    }
}

impl Drop for QueueLink {
    fn drop(&mut self) {
        // A reservation left would hold the peer's queue at it.
        self.cancel();
        // A message held in place would hold the queue's other links back.
        self.release_msg();
        self.hub.leave(self.slot);
    }
}

/// How long a blocking call may sleep now: [`NAP`] or what is left before
/// `deadline`; `Err(Timeout)` once it passed.
fn nap_until(deadline: Option<Instant>) -> Result<Duration> {
    match deadline {
        None => Ok(NAP),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Error::Timeout)
            } else {
                Ok(left.min(NAP))
            }
        }
    }
}

/// Checks an offered queue before mapping it: a geometry this side can
/// use, a slot inside it, records not below `min_record`, a size not above
/// `max_size`.
pub(super) fn check_offer(
    data_size: usize,
    max_record: usize,
    slots: usize,
    slot: usize,
    max_size: usize,
    min_record: Option<usize>,
) -> Result<Geometry> {
    if data_size > max_size {
        return Err(Error::Invalid(format!(
            "offered queue of {data_size} bytes is too large (at most {max_size})"
        )));
    }
    let geo = Geometry::new(data_size, max_record, slots)?;
    if slot >= slots {
        return Err(Error::Invalid(format!(
            "offered slot {slot} of a queue of {slots}"
        )));
    }
    if let Some(min) = min_record.filter(|&m| max_record < m) {
        return Err(Error::Invalid(format!(
            "offered records of {max_record} bytes are smaller than the {min} this side sends"
        )));
    }
    Ok(geo)
}

#[cfg(test)]
mod tests {
    use super::QueueLock;
    use std::sync::Arc;

    #[test]
    fn the_queue_lock_lets_one_holder_in_at_a_time_and_a_panic_gives_it_back() {
        // Four threads add to two counters under the lock, two of them
        // through `lock`, two through `try_lock` (trying again): the
        // counters must agree at every look (no two holders at once) and
        // end at the sum.
        let l = Arc::new(QueueLock::new((0u64, 0u64)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..50_000 {
                        let mut g = if t % 2 == 0 {
                            l.lock()
                        } else {
                            loop {
                                if let Some(g) = l.try_lock() {
                                    break g;
                                }
                                std::hint::spin_loop();
                            }
                        };
                        let (a, b) = *g;
                        assert_eq!(a, b, "two holders at once");
                        g.0 = a + 1;
                        std::hint::black_box(&mut *g);
                        g.1 = b + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), (200_000, 200_000));
        let held = l.clone();
        let panicked = std::thread::spawn(move || {
            let _g = held.lock();
            panic!("under the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(l.try_lock().is_some(), "the panic gave the lock back");
    }
}
