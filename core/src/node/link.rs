//! A link to one peer, on the ring or on TCP. Every fatal error it reports
//! names the peer.

use super::queues::{QueueLink, CLOSE_BYTE};
use crate::card::Card;
use crate::channel::{Alive, Channel, RxHalf, WaitPolicy};
use crate::error::{Error, Result};
use crate::frame::Stats;
use crate::hypervisor::Hypervisor;
use crate::payload::Payload;
use crate::tcp::{self, TcpLink};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The path a link took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Shared ring.
    Ring,
    /// TCP.
    Tcp,
    /// Receive queues shared with the peer's domain (docs/design.md, "The
    /// queue path").
    Queue,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathKind::Ring => "ring",
            PathKind::Tcp => "tcp",
            PathKind::Queue => "queue",
        })
    }
}

pub(super) enum Imp {
    Ring(Box<Channel>),
    Tcp(Box<TcpLink>),
    Queue(Box<QueueLink>),
}

/// A link to one peer, on whichever path was chosen.
pub struct Link {
    pub(super) peer: Card,
    pub(super) path: PathKind,
    pub(super) reason: String,
    pub(super) imp: Imp,
    /// Control connection of the ring path (liveness).
    pub(super) ctl: Option<TcpStream>,
    pub(super) idle_polls: u32,
    pub(super) policy: WaitPolicy,
    pub(super) degraded: bool,
    /// Silence after which the peer is declared gone (`None`: never).
    pub(super) timeout: Option<Duration>,
    /// When the connection was last checked (checks are rate-limited).
    pub(super) last_check: Instant,
    /// The backend that made the ring (`None` on TCP): it may know that the
    /// peer's domain is gone.
    pub(super) hv: Option<Arc<dyn Hypervisor>>,
}

/// Checks the peer of a ring or TCP link: what the ring's backend knows of
/// its domain (`hv`), then its connection `sock`.
fn peer_alive(
    hv: Option<&Arc<dyn Hypervisor>>,
    domain: u32,
    sock: &TcpStream,
    timeout: Option<Duration>,
) -> Result<()> {
    if let Some(hv) = hv {
        let silence = || Duration::from_millis(tcp::silence_ms(sock).map_or(0, u64::from));
        hv.check_peer(domain, &silence)?;
    }
    tcp::check_alive(sock, timeout)
}

/// A link's path as a blocking call gets it: the ring with the check of
/// its peer (the backend's word on the peer's domain, then the control
/// connection), or TCP with the peer timeout.
enum Blocking<'a> {
    Ring(&'a mut Channel, Alive<'a>),
    Tcp(&'a mut TcpLink, Option<Duration>),
    Queue(&'a mut QueueLink, &'a TcpStream, Alive<'a>),
}

/// Empty polls between two looks at the clock for a liveness check (the
/// same count for a link's own polls and for its receiving side's).
const ALIVE_EVERY: u32 = crate::channel::QUIET_POLLS;
/// Liveness checks of an idle link at most this often.
const CHECK_EVERY: Duration = Duration::from_millis(100);

impl Link {
    /// Names the peer in an error.
    #[cold]
    fn ctx(&self, e: Error) -> Error {
        e.at_peer(|| self.peer.label())
    }

    /// The peer's card.
    pub fn peer(&self) -> &Card {
        &self.peer
    }

    /// The path this link uses.
    pub fn path(&self) -> PathKind {
        self.path
    }

    /// Why this path was chosen.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// True when the peer was a ring candidate but setting up the ring
    /// failed (no space, map refused, nonce mismatch): the link works, on
    /// TCP, and users should be told once.
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// Counters of both directions.
    pub fn stats(&self) -> Stats {
        match &self.imp {
            Imp::Ring(c) => Stats {
                tx_reach: c.tx_reach(),
                ..c.stats()
            },
            Imp::Tcp(t) => t.stats,
            Imp::Queue(q) => q.stats(),
        }
    }

    /// Largest message that travels as one record or frame (and so is
    /// delivered in place and may be sent with `try_send`/`reserve`).
    pub fn max_inline(&self) -> usize {
        match &self.imp {
            Imp::Ring(c) => c.max_record(),
            Imp::Tcp(t) => t.max_frame(),
            Imp::Queue(q) => q.max_record(),
        }
    }

    /// Largest piece to cut a large message into now: on a ring, what fits
    /// twice in the sending ring's share of the process's ring budget (the
    /// largest record while the ring is used whole); on TCP, a frame.
    pub fn piece(&self) -> usize {
        match &self.imp {
            Imp::Ring(c) => c.piece(),
            Imp::Tcp(t) => t.max_frame(),
            Imp::Queue(q) => q.max_record(),
        }
    }

    /// File descriptor to poll for input on the TCP path.
    pub fn tcp_fd(&self) -> Option<i32> {
        match &self.imp {
            Imp::Ring(_) | Imp::Queue(_) => None,
            Imp::Tcp(t) => Some(t.fd()),
        }
    }

    /// The connection that tells whether the peer lives: the control
    /// connection of a ring, the data connection of a TCP link.
    fn watched(&self) -> &TcpStream {
        match (&self.ctl, &self.imp) {
            (Some(s), _) => s,
            (None, Imp::Tcp(t)) => t.sock(),
            (None, Imp::Ring(_) | Imp::Queue(_)) => {
                unreachable!("a ring or queue link keeps its control connection")
            }
        }
    }

    /// Checks that the peer is alive, at most every [`CHECK_EVERY`]: its
    /// connection is open and its kernel answered within the timeout.
    fn check_alive(&mut self) -> Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_check) < CHECK_EVERY {
            return Ok(());
        }
        self.last_check = now;
        let r = peer_alive(
            self.hv.as_ref(),
            self.peer.domain,
            self.watched(),
            self.timeout,
        );
        self.tell_queue_if_gone(&r);
        r.map_err(|e| self.ctx(e))
    }

    /// A queue link whose peer is gone tells its queue: the peer may have
    /// left a record reserved there and never published.
    fn tell_queue_if_gone<T>(&self, r: &Result<T>) {
        if let (Err(Error::PeerGone(_)), Imp::Queue(q)) = (r, &self.imp) {
            q.peer_died();
        }
    }

    /// Counts an empty poll; every [`ALIVE_EVERY`] of them, checks the peer.
    #[inline]
    fn idle(&mut self) -> Result<()> {
        self.idle_polls += 1;
        if self.idle_polls.is_multiple_of(crate::ring::PREPARE_EVERY) {
            if let Imp::Ring(c) = &mut self.imp {
                c.prepare_pages();
            }
        }
        if self.idle_polls >= ALIVE_EVERY {
            self.idle_check()?;
        }
        Ok(())
    }

    /// What a link's idle polls do every `ALIVE_EVERY`: reports a ring
    /// the peer closed (and that was read to its end) as
    /// [`Error::Closed`], checks the peer (at most every `CHECK_EVERY`),
    /// and lets a sending ring that fell silent give its pages back. For a
    /// poller that polls the receiving side alone ([`Link::rx_half`]) when
    /// its [`RxHalf::quiet_poll`] says so; it is a call on the whole link.
    pub fn idle_check(&mut self) -> Result<()> {
        self.idle_polls = 0;
        // A peer that closed its end cleanly (it finalized) is closed, not
        // lost, whatever its connection says by now.
        let finished = match &mut self.imp {
            Imp::Ring(c) => c.rx_finished(),
            Imp::Tcp(_) => Ok(false),
            Imp::Queue(q) => Ok(q.peer_closed()),
        };
        if finished.map_err(|e| self.ctx(e))? {
            return Err(self.ctx(Error::Closed));
        }
        if self.peer_said_close() {
            // Reported at the next idle check: a poll comes first, and takes
            // what the peer sent before it closed.
            return Ok(());
        }
        self.check_alive()?;
        let r = match &mut self.imp {
            Imp::Ring(c) => c.idle_look(),
            Imp::Tcp(_) | Imp::Queue(_) => Ok(()),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Queue path: whether the peer wrote its close byte on the control
    /// connection (it sent everything before), noted once seen.
    fn peer_said_close(&mut self) -> bool {
        match (&mut self.imp, &self.ctl) {
            (Imp::Queue(q), Some(ctl)) => q.saw_close_byte(ctl),
            _ => false,
        }
    }

    /// Whether the peer is taking what this side sent lately (ring links:
    /// [`Channel::consumer_draining`]; always `false` on TCP, whose socket
    /// buffers take a message whole). For a poller that found nothing and
    /// would otherwise give its core away.
    pub fn consumer_draining(&mut self) -> Result<bool> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.consumer_draining(),
            Imp::Tcp(_) | Imp::Queue(_) => Ok(false),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// The receiving side of a ring link on its own, for a poller on one
    /// thread while others send on the link ([`RxHalf`]); `None` on TCP or
    /// while the peer may sleep.
    pub fn rx_half(&self) -> Option<RxHalf> {
        match &self.imp {
            Imp::Ring(c) => c.rx_half(),
            Imp::Tcp(_) | Imp::Queue(_) => None,
        }
    }

    /// Sends a message of any size, blocking until it is in the ring or has
    /// left the process.
    pub fn send(&mut self, tag: u8, msg: &[u8]) -> Result<()> {
        self.send_deadline(tag, msg, None)
    }

    /// [`Link::send`] with a deadline.
    pub fn send_deadline(&mut self, tag: u8, msg: &[u8], deadline: Option<Instant>) -> Result<()> {
        self.blocking(|p| match p {
            Blocking::Ring(c, alive) => c.send(tag, msg, deadline, alive),
            Blocking::Tcp(t, timeout) => t.send(tag, msg, deadline, timeout),
            Blocking::Queue(q, _, alive) => q.send(tag, msg, deadline, alive),
        })
    }

    /// Runs a blocking call `f` on this link's path, with what it checks
    /// the peer by between its waits (see [`Blocking`]).
    fn blocking<R>(&mut self, f: impl FnOnce(Blocking<'_>) -> Result<R>) -> Result<R> {
        let timeout = self.timeout;
        // The control connection of a ring or a queue, and the backend
        // that may know the peer's domain is gone.
        let (ctl, hv, dom) = (self.ctl.as_ref(), self.hv.as_ref(), self.peer.domain);
        let ctl = || ctl.expect("a ring or queue link keeps its control connection");
        let r = match &mut self.imp {
            Imp::Ring(c) => {
                let ctl = ctl();
                f(Blocking::Ring(c, &mut || peer_alive(hv, dom, ctl, timeout)))
            }
            Imp::Tcp(t) => f(Blocking::Tcp(t, timeout)),
            Imp::Queue(q) => {
                let ctl = ctl();
                f(Blocking::Queue(q, ctl, &mut || {
                    peer_alive(hv, dom, ctl, timeout)
                }))
            }
        };
        self.tell_queue_if_gone(&r);
        r.map_err(|e| self.ctx(e))
    }

    /// Sends a message of at most [`Link::max_inline`] bytes, gathered from
    /// `parts`, without blocking. `Ok(false)` when the ring is full (on
    /// TCP: when the send queue is over its bound).
    #[inline]
    pub fn try_send(&mut self, tag: u8, parts: &[&[u8]]) -> Result<bool> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.try_send_parts(tag, parts),
            Imp::Tcp(t) => t.try_send(tag, parts),
            Imp::Queue(q) => q.try_send(tag, parts),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// [`Link::try_send`] of a message in two pieces, `head` then `body`
    /// (on the ring: [`Channel::try_send2`]).
    #[inline]
    pub fn try_send2(&mut self, tag: u8, head: &[u8], body: &[u8]) -> Result<bool> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.try_send2(tag, head, body),
            Imp::Tcp(t) => t.try_send(tag, &[head, body]),
            Imp::Queue(q) => q.try_send(tag, &[head, body]),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// [`Link::try_send2`]'s commonest case on a ring
    /// ([`Channel::try_send2_fast`]) or a queue
    /// ([`crate::queue::Producer::push2_fast`]): `true` when the message
    /// was sent, `false` when nothing was done and [`Link::try_send2`]
    /// must be called (always on TCP). `SMALL`: `head` and `body` are at most
    /// [`crate::ring::SMALL_PIECE`] bytes each (the caller checked), copied
    /// with no call.
    #[inline(always)]
    pub fn try_send2_fast<const SMALL: bool>(&mut self, tag: u8, head: &[u8], body: &[u8]) -> bool {
        debug_assert!(
            !SMALL
                || (head.len() <= crate::ring::SMALL_PIECE
                    && body.len() <= crate::ring::SMALL_PIECE)
        );
        match &mut self.imp {
            Imp::Ring(c) => c.try_send2_fast::<SMALL>(tag, head, body),
            Imp::Queue(q) => q.try_send2_fast::<SMALL>(tag, head, body),
            Imp::Tcp(_) => false,
        }
    }

    /// Sends what is left of `msg` of any size (up to the peer's largest
    /// message) past `*sent` without blocking: on the ring in records of at
    /// most a piece when it does not fit one ([`Channel::try_send_more`]),
    /// on TCP whole. `Ok(true)` once all of it went; `Ok(false)` when the
    /// ring filled first (`*sent` says how far it got) or the TCP send
    /// queue is over its bound (nothing sent). Call again with the same
    /// message and `sent`, sending nothing else on this link meanwhile.
    pub fn try_send_more(&mut self, tag: u8, msg: &[u8], sent: &mut usize) -> Result<bool> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.try_send_more(tag, msg, sent),
            Imp::Tcp(t) => t.try_send(tag, &[msg]).inspect(|&ok| {
                if ok {
                    *sent = msg.len();
                }
            }),
            Imp::Queue(q) => q.try_send_more(tag, msg, sent),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// True when a [`Link::try_send`] of `len` bytes (at most
    /// [`Link::max_inline`]) would be accepted now (on the queue path a
    /// hint: the peer domain's other processes may take the room first,
    /// and the send then reports the queue full).
    pub fn can_send(&mut self, len: usize) -> Result<bool> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.fits(len),
            Imp::Tcp(t) => t.has_room(len),
            // A hint on a queue: other processes of the peer's domain may
            // take the room before this side's send.
            Imp::Queue(q) => q.can_send(len),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// On the ring, the bytes sent that the peer has not yet taken and
    /// handed back: small while it keeps up, growing when it falls behind.
    /// `Ok(None)` on TCP.
    pub fn backlog(&mut self) -> Result<Option<u64>> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.backlog().map(Some),
            Imp::Tcp(_) | Imp::Queue(_) => Ok(None),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Reserves ring or queue space for a message of `len` bytes (at most
    /// [`Link::max_inline`]) to be written in place. `Ok(None)` when the ring
    /// or queue is full or the link is on TCP. On a queue, commit or cancel
    /// soon: the peer's consumer waits at the reservation.
    #[inline]
    pub fn reserve(&mut self, len: usize) -> Result<Option<*mut u8>> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.reserve(len),
            Imp::Queue(q) => q.reserve(len),
            Imp::Tcp(_) => Ok(None),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Sends the reserved message.
    #[inline]
    pub fn commit(&mut self, len: usize, tag: u8) -> Result<()> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.commit(len, tag),
            Imp::Queue(q) => q.commit(len, tag),
            Imp::Tcp(_) => Err(Error::Invalid("commit without reservation".into())),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Drops a reservation (on a queue: publishes its space as skipped).
    #[inline]
    pub fn cancel(&mut self) {
        match &mut self.imp {
            Imp::Ring(c) => c.cancel(),
            Imp::Queue(q) => q.cancel(),
            Imp::Tcp(_) => {}
        }
    }

    /// Delivers up to `max` messages to `f(tag, bytes)` without blocking
    /// (in place where possible: the view is valid only during the call),
    /// and pushes queued TCP output. Returns how many were delivered.
    pub fn poll(&mut self, max: usize, f: &mut dyn FnMut(u8, Payload<'_>)) -> Result<usize> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.poll(max, f),
            Imp::Tcp(t) => t.poll(max, f),
            Imp::Queue(q) => q.poll(max, f),
        };
        let n = r.map_err(|e| self.ctx(e))?;
        if n == 0 {
            self.idle()?;
        }
        Ok(n)
    }

    /// Cheap test for pollers: `false` when a full poll would certainly find
    /// nothing (ring path: one load; queue path: two, without the queue's
    /// lock). Every few thousand idle answers it
    /// returns `true` anyway, so that the full poll checks the peer's close
    /// flag and the control connection.
    #[inline]
    pub fn worth_polling(&mut self) -> bool {
        let idle = match &self.imp {
            Imp::Ring(c) => c.looks_idle(),
            Imp::Queue(q) => q.looks_idle(),
            Imp::Tcp(_) => false,
        };
        if !idle {
            return true;
        }
        self.idle_polls += 1;
        // Let the full poll look at the close flag (the close byte) and
        // the control connection now and then.
        self.idle_polls >= ALIVE_EVERY
    }

    /// The next complete message without blocking, as `(tag, pointer,
    /// len)`, valid until [`Link::release_msg`] (which must come before the
    /// next `peek_msg`). No borrow is held meanwhile: the caller may send on
    /// this link while it handles the message (the Open MPI receive upcall
    /// does), but must not poll it again.
    #[inline]
    pub fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.peek_msg(),
            Imp::Tcp(t) => t.peek_msg(),
            Imp::Queue(q) => q.peek_msg(),
        };
        let r = r.map_err(|e| self.ctx(e))?;
        if r.is_none() {
            self.idle()?;
        }
        Ok(r)
    }

    /// The whole messages waiting in place on the ring or the receive
    /// queue, up to `max`, into `out` ([`Channel::peek_msgs`]), valid until
    /// [`Link::release_msg`], which releases them all: a poller's common
    /// case in a batch, handed up without touching the link between
    /// messages. 0 when the next message needs [`Link::peek_msg`] (nothing
    /// there, anything but a whole message of this link, TCP), which also
    /// looks after an idle link.
    #[inline]
    pub fn peek_msgs(&mut self, out: &mut crate::ring::Batch, max: usize) -> usize {
        match &mut self.imp {
            Imp::Ring(c) => c.peek_msgs(out, max),
            Imp::Queue(q) => q.peek_msgs(out, max),
            Imp::Tcp(_) => 0,
        }
    }

    /// [`Link::peek_msgs`] handing each message to `put` (its place in the
    /// run, from 0, its pointer, length and tag) in place of a [`Batch`],
    /// for a caller with an array of its own (the C ABI's).
    ///
    /// [`Batch`]: crate::ring::Batch
    #[inline]
    pub fn peek_msgs_with(
        &mut self,
        max: usize,
        mut put: impl FnMut(usize, *const u8, usize, u8),
    ) -> usize {
        match &mut self.imp {
            Imp::Ring(c) => c.peek_msgs_with(max, |i, r| put(i, r.ptr, r.len, r.tag)),
            Imp::Queue(q) => q.peek_msgs_with(max, |i, r| put(i, r.ptr, r.len, r.tag)),
            Imp::Tcp(_) => 0,
        }
    }

    /// True when nothing waits on the ring or for this link in its receive
    /// queue, and nothing is held: a poller that just released a batch
    /// stops there instead of looking again the full way (false on TCP).
    #[inline]
    pub fn looks_idle(&self) -> bool {
        match &self.imp {
            Imp::Ring(c) => c.looks_idle(),
            Imp::Queue(q) => q.looks_idle(),
            Imp::Tcp(_) => false,
        }
    }

    /// Releases the message returned by [`Link::peek_msg`] (or those of
    /// [`Link::peek_msgs`]). On the ring, the space may go back to the sender only with the next
    /// [`Link::flush_rx`]: call it after each batch of messages.
    #[inline]
    pub fn release_msg(&mut self) -> Result<()> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.release_msg(),
            Imp::Tcp(t) => {
                t.release_msg();
                Ok(())
            }
            Imp::Queue(q) => {
                q.release_msg();
                Ok(())
            }
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Ends a batch that [`Link::peek_msgs`] took: [`Link::release_msg`]
    /// and [`Link::flush_rx`], then whether more seems to wait (not
    /// [`Link::looks_idle`]), in one step.
    #[inline]
    pub fn done_batch(&mut self) -> Result<bool> {
        match &mut self.imp {
            Imp::Queue(q) => {
                q.release_msg();
                Ok(!q.looks_idle())
            }
            _ => {
                self.release_msg()?;
                self.flush_rx()?;
                Ok(!self.looks_idle())
            }
        }
    }

    /// Hands the space of all released messages back to the sender.
    pub fn flush_rx(&mut self) -> Result<()> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.flush_rx(),
            Imp::Tcp(_) | Imp::Queue(_) => Ok(()),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Receives one message into `out` (blocking until `deadline`); returns
    /// its tag.
    pub fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<u8> {
        self.blocking(|p| match p {
            Blocking::Ring(c, alive) => c.recv(out, deadline, alive),
            Blocking::Tcp(t, timeout) => t.recv(out, deadline, timeout),
            Blocking::Queue(q, ctl, alive) => q.recv(out, deadline, ctl, alive),
        })
    }

    /// Pushes queued TCP output without blocking; returns the bytes still
    /// queued.
    pub fn flush(&mut self) -> Result<usize> {
        let r = match &mut self.imp {
            Imp::Ring(_) | Imp::Queue(_) => Ok(0),
            Imp::Tcp(t) => t.flush().map(|_| t.queued()),
        };
        r.map_err(|e| self.ctx(e))
    }

    /// Bytes queued on the TCP path and not yet written to the socket.
    pub fn queued(&self) -> usize {
        match &self.imp {
            Imp::Ring(_) | Imp::Queue(_) => 0,
            Imp::Tcp(t) => t.queued(),
        }
    }

    /// Closes the link: the peer drains what was sent, then sees
    /// [`Error::Closed`].
    pub fn close(&mut self) {
        match &mut self.imp {
            Imp::Ring(c) => c.close(),
            Imp::Tcp(t) => t.close(),
            Imp::Queue(q) => {
                // Everything sent is in the peer's queue: say so on the
                // control connection (its end of file alone would read as
                // a crash), once.
                if !q.close_once() {
                    return;
                }
                if let Some(ctl) = &self.ctl {
                    let _ = std::io::Write::write(&mut &*ctl, &[CLOSE_BYTE]);
                    let _ = ctl.shutdown(std::net::Shutdown::Write);
                }
            }
        }
    }

    /// The sending ring of a ring link (its control page) and geometry, for
    /// tests that play a hostile peer; `None` on TCP. Not for anything else.
    #[doc(hidden)]
    pub fn raw_tx_ring(&self) -> Option<(*mut u8, crate::ring::Geometry)> {
        match &self.imp {
            Imp::Ring(c) => Some(c.raw_tx_ring()),
            Imp::Tcp(_) | Imp::Queue(_) => None,
        }
    }

    /// Reserves `len` bytes in the peer's receive queue and never
    /// publishes them, as a process that dies mid-write does; `Ok(false)`
    /// when there was no room, an error off the queue path. For tests
    /// that play a dying peer; not for anything else.
    #[doc(hidden)]
    pub fn leave_a_hole_in_the_queue(&mut self, len: usize) -> Result<bool> {
        match &mut self.imp {
            Imp::Queue(q) => q.leave_a_hole(len),
            _ => Err(Error::Invalid("not a queue link".into())),
        }
    }

    /// Drops a queue link without saying on its control connection that
    /// it closed, as a process that crashes leaves it (its peer then
    /// reports a lost peer, not `Closed`). For tests that play a dying
    /// peer; not for anything else.
    #[doc(hidden)]
    pub fn drop_as_crashed(mut self) {
        if let Imp::Queue(q) = &mut self.imp {
            q.close_once();
        }
    }

    /// The wait policy of blocking calls.
    pub fn wait_policy(&self) -> WaitPolicy {
        self.policy
    }
}

impl Drop for Link {
    /// A ring's end and a TCP link close as they go (their own drops); a
    /// queue link says on its control connection that everything it sent
    /// is in the peer's queue, so that the peer reads the rest and then
    /// reports `Closed`, not a lost peer (a process that frees its links,
    /// as an MPI rank at finalize, closes them cleanly).
    fn drop(&mut self) {
        if let Imp::Queue(_) = self.imp {
            self.close();
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer.to_string())
            .field("path", &self.path)
            .field("reason", &self.reason)
            .finish()
    }
}
