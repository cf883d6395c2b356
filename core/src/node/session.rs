//! The handshake drivers: the initiator's blocking exchange, the
//! acceptor's event loop for connections that have not authenticated yet,
//! and the ring negotiation both sides run once authenticated.
//!
//! Bounds (all from [`super::Config`]): every connection has one overall
//! deadline (`connect_timeout`; 10 s at most before it authenticates);
//! the acceptor keeps at most `max_preauth` unauthenticated connections
//! (the oldest goes when another arrives) and buffers at most one small
//! message for each; at most `max_handshakes` authenticated peers set up
//! links at once and at most `max_unclaimed` links wait for the owner
//! (further peers are told "busy" and retry).

use super::fit::{crowded_queue, fair_geometry, offer_fitted};
use super::handshake::{
    ty, Acceptor, Decoder, Initiator, Msg, QueueOffer, Target, Verdict, MAX_PREAUTH,
};
use super::link::PathKind;
use super::peers::State;
use super::queues::{self, QueueLink, SlotOffer};
use super::Inner;
use super::Made;
use crate::card::Card;
use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::hypervisor::{self, Hypervisor};
use crate::record;
use crate::ring::Geometry;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prefix of a REFUSE reason that tells the initiator to try again.
const BUSY: &str = "busy: ";

/// Blocking message I/O on a handshake connection, with one deadline for
/// everything.
pub(super) struct Wire<'a> {
    sock: &'a TcpStream,
    deadline: Instant,
}

fn io_err(e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout,
        _ => e.into(),
    }
}

impl<'a> Wire<'a> {
    pub fn new(sock: &'a TcpStream, deadline: Instant) -> Self {
        Wire { sock, deadline }
    }

    /// The connection's descriptor (readable: the peer said something).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    fn left(&self) -> Result<Duration> {
        let d = self.deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(Error::Timeout)
        } else {
            Ok(d)
        }
    }

    pub fn send(&mut self, m: &Msg) -> Result<()> {
        let b = m.encode();
        let mut off = 0;
        while off < b.len() {
            self.sock.set_write_timeout(Some(self.left()?))?;
            match (&*self.sock).write(&b[off..]) {
                Ok(0) => return Err(Error::PeerGone("connection closed".into())),
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    /// Fills `buf`, each read bounded by what is left of the deadline (a
    /// peer that trickles bytes gains nothing).
    fn read_full(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut off = 0;
        while off < buf.len() {
            self.sock.set_read_timeout(Some(self.left()?))?;
            match (&*self.sock).read(&mut buf[off..]) {
                Ok(0) => return Err(Error::PeerGone("connection closed".into())),
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Msg> {
        let mut h = [0u8; record::HEADER];
        self.read_full(&mut h)?;
        let (t, len) = Msg::check_header(h)?;
        let mut p = vec![0u8; len];
        self.read_full(&mut p)?;
        Msg::decode(t, &p)
    }

    /// The next message, which must be one of `want`; a REFUSE becomes an
    /// error with the peer's reason.
    pub fn expect(&mut self, want: &[u8]) -> Result<Msg> {
        let m = self.recv()?;
        if let Msg::Refuse(why) = &m {
            return Err(Error::Auth(format!("refused: {why}")));
        }
        if !want.contains(&m.ty()) {
            return Err(Error::Protocol(format!(
                "handshake: {} unexpected here",
                Msg::name(m.ty())
            )));
        }
        Ok(m)
    }
}

/// What an initiator's attempt came to.
pub(super) enum Initiated {
    /// The link, on this connection.
    Link(Box<super::Link>),
    /// The peer connected to us at the same moment and its connection wins.
    Crossed,
}

enum Attempt {
    Done(Result<Initiated>),
    /// The acceptor was busy or dropped us before authentication: try again.
    Retry(String),
}

impl Inner {
    /// Whether this process and its admitted co-resident peers outnumber
    /// the CPUs online: then a receiver prepares a stream's pages in its
    /// slack, a page a call, instead of in one stop that would take the
    /// time of the ranks sharing its core
    /// ([`crate::ring::Consumer::prepare_a_page_a_call`]).
    fn ranks_outnumber_cpus(&self) -> bool {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        self.lock().coresident(&self.card) + 1 > cpus
    }

    /// Connects to `addr` and runs the handshake as initiator (retrying
    /// while the peer is not listening yet or is busy) until `deadline`.
    pub(super) fn initiate(
        &self,
        addr: SocketAddr,
        target: Target,
        deadline: Instant,
    ) -> Result<Initiated> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let sock = match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    // A listener that is not up yet (peer still starting).
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(Error::PeerGone(format!("connect {addr}: {e}"))),
            };
            match self.attempt(sock, target.clone(), deadline) {
                Attempt::Done(r) => return r,
                Attempt::Retry(why) => {
                    if Instant::now() >= deadline {
                        return Err(Error::PeerGone(format!("{addr}: {why}")));
                    }
                    self.log(&format!("{addr}: {why}; trying again"));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn attempt(&self, sock: TcpStream, target: Target, deadline: Instant) -> Attempt {
        if let Err(e) = sock.set_nodelay(true) {
            return Attempt::Done(Err(e.into()));
        }
        let mut w = Wire::new(&sock, deadline);
        let nonce = hypervisor::random_bytes();
        let (mut hs, hello) = Initiator::start(&self.card, target, nonce);
        let challenge = match w.send(&hello).and_then(|_| w.recv()) {
            Ok(m) => m,
            // Dropped before authentication (a flood of other connections
            // evicts the oldest): not a verdict on us.
            Err(Error::PeerGone(why)) => return Attempt::Retry(why),
            Err(e) => return Attempt::Done(Err(e)),
        };
        if let Msg::Refuse(why) = &challenge {
            if let Some(b) = why.strip_prefix(BUSY) {
                return Attempt::Retry(b.to_string());
            }
        }
        let verdict = hs
            .on_challenge(challenge)
            .and_then(|auth| w.send(&auth))
            .and_then(|_| w.recv());
        let verdict = match verdict {
            Ok(Msg::Refuse(why)) if why.starts_with(BUSY) => {
                return Attempt::Retry(why[BUSY.len()..].to_string())
            }
            Ok(m) => hs.on_verdict(m),
            Err(e) => Err(e),
        };
        Attempt::Done(match verdict {
            Ok(Verdict::Crossed(_)) => Ok(Initiated::Crossed),
            Ok(Verdict::Accepted(peer)) => self
                .negotiate(&mut w, peer.clone())
                .and_then(|(path, why, ch)| {
                    let _ = sock.set_write_timeout(None);
                    self.make_link(peer, path, why, sock.try_clone()?, ch)
                })
                .map(|l| Initiated::Link(Box::new(l))),
            Err(e) => Err(e),
        })
    }

    /// The initiator's side of the path: offer a ring when the cards say
    /// the two may share a host and the backend can, TCP otherwise.
    fn negotiate(&self, w: &mut Wire, peer: Card) -> Result<Path> {
        let hv = match (self.backend_for(&peer), self.card.ring_candidate(&peer)) {
            (Some(hv), true) => hv,
            (None, _) => {
                let why = format!("tcp: {}", self.no_ring);
                return stay_on_tcp(w, why, Msg::TcpOnly);
            }
            (Some(_), false) => {
                let why = match (peer.backend, self.card.backend) {
                    (None, _) => "tcp: peer has no shared-memory backend".to_string(),
                    (Some(theirs), Some(ours)) if theirs != ours => {
                        format!("tcp: peer backend {theirs} differs from ours ({ours})")
                    }
                    _ => "tcp: peer is on another host".to_string(),
                };
                return stay_on_tcp(w, why, Msg::TcpOnly);
            }
        };
        let geo = self.cfg.geometry()?;
        let floor = self.cfg.record_floor(geo);
        // Xen: gntalloc's page limit is one pool for every process of this
        // domain; each pair takes at most its fair share of it, and where
        // that holds no rings at the record floor, the pairs take receive
        // queues (one per process and peer domain) that fit theirs.
        let (geo, fair, crowded) = if hv.kind() == hypervisor::BackendKind::Xen {
            let (pairs, queues) = self.lock().pool_users(&self.card);
            let pool = hv.max_share();
            let (fair, why) = fair_geometry(geo, pool, pairs, floor, &hv.describe());
            let crowded = crowded_queue(
                pool,
                pool / pairs.max(1),
                crate::channel::region_bytes(fair),
                queues,
                geo.max_record as usize,
                floor,
                self.cfg.ring_size,
            )
            .map(|q| {
                let why = format!(
                    "{}'s pool of {pool} bytes over {pairs} pairs holds no rings with records of \
                     {floor} bytes; over {queues} queues it holds these",
                    hv.describe()
                );
                (q, why)
            });
            (fair, why, crowded)
        } else {
            (geo, None, None)
        };
        // The queue path where asked for (or where the pool is too crowded
        // for rings) and the backend can share a queue with a whole domain;
        // rings otherwise.
        let queue = match self.cfg.queue_geometry()? {
            Some(q) => Some((q, None)),
            None if self.cfg.crowded_queues => crowded.map(|(q, why)| (q, Some(why))),
            None => None,
        };
        if let (Some((qgeo, why)), true) = (queue, hv.shares_domains()) {
            return self.negotiate_queue(w, &peer, &*hv, qgeo, why);
        }
        let nonce = hypervisor::random_u64();
        let (offered, shrunk) = offer_fitted(&*hv, peer.domain, geo, floor, nonce);
        let shrunk = shrunk.or(fair);
        let mut offer = match offered {
            Ok(o) => o,
            Err(e) => {
                let why = format!("tcp: could not share a ring: {e}");
                return stay_on_tcp(w, why, Msg::TcpOnly);
            }
        };
        if !self.cfg.wait.sleep {
            offer.channel.declare_polling();
        }
        if self.ranks_outnumber_cpus() {
            offer.channel.prepare_a_page_a_call();
        }
        let geo = offer.channel.geometry();
        w.send(&Msg::Offer {
            data_size: geo.data_size,
            max_record: geo.max_record,
            grant: std::mem::take(&mut offer.grant),
            bell: std::mem::take(&mut offer.bell),
        })?;
        // Hand the region over while the peer maps it (host backend), until
        // it answers.
        if let Err(e) = offer.channel.serve_peer(w.deadline, w.fd()) {
            let why = format!("tcp: could not hand the ring over: {e}");
            w.send(&Msg::Abort(why.clone()))?;
            // The peer may still answer MAPPED or REFUSED first.
            let _ = w.expect(&[ty::MAPPED, ty::REFUSED]);
            return Ok((PathKind::Tcp, why, None));
        }
        Ok(match w.expect(&[ty::MAPPED, ty::REFUSED])? {
            Msg::Refused(why) => peer_refused(&why, "the ring"),
            Msg::Mapped(n) if n != nonce => {
                return stay_on_tcp(w, NONCE_DIFFERS.to_string(), Msg::Abort)
            }
            _ => {
                w.send(&Msg::Switch)?;
                offer.channel.peer_attached();
                offer.channel.learn_peer();
                let why = match shrunk {
                    None => format!("ring: co-resident, mapping proved ({})", hv.describe()),
                    Some(e) => format!(
                        "ring: co-resident, mapping proved ({}; rings of {} KiB, records of {} KiB: {e})",
                        hv.describe(),
                        geo.data_size / 1024,
                        geo.max_record / 1024
                    ),
                };
                (
                    PathKind::Ring,
                    why,
                    Some(Made::Ring(Box::new(offer.channel))),
                )
            }
        })
    }

    /// The initiator's side of the queue path: offer a slot in this
    /// process's queue for the peer's domain, map the peer's queue for
    /// ours, prove both mappings (docs/design.md, "The queue path").
    fn negotiate_queue(
        &self,
        w: &mut Wire,
        peer: &Card,
        hv: &dyn Hypervisor,
        qgeo: crate::queue::Geometry,
        note: Option<String>,
    ) -> Result<Path> {
        let ours = self
            .hub(hv, peer.domain, qgeo)
            .and_then(|hub| hub.offer(hv).map(|o| (hub, o)));
        let (hub, mut offer) = match ours {
            Ok(x) => x,
            Err(e) => {
                let why = format!("tcp: could not share a receive queue: {e}");
                return stay_on_tcp(w, why, Msg::TcpOnly);
            }
        };
        w.send(&queue_offer(&hub, &mut offer, None))?;
        // Hand the region over while the peer maps it (host backend).
        if let Err(e) = hub.serve(&mut offer, w.deadline, w.fd()) {
            let why = format!("tcp: could not hand the queue over: {e}");
            // The peer answers first (QMAPPED: it then takes ABORT; REFUSED:
            // its TCP link passes the ABORT over, as after a ring's).
            let _ = w.expect(&[ty::QMAPPED, ty::REFUSED]);
            return stay_on_tcp(w, why, Msg::Abort);
        }
        let (nonce, theirs) = match w.expect(&[ty::QMAPPED, ty::REFUSED])? {
            Msg::Refused(why) => return Ok(peer_refused(&why, "the queue")),
            Msg::QueueMapped { nonce, offer } => (nonce, offer),
            _ => unreachable!("expect() checked the type"),
        };
        if nonce != hub.nonce() {
            return stay_on_tcp(w, NONCE_DIFFERS.to_string(), Msg::Abort);
        }
        let mapped = self.map_queue(hv, peer, &theirs).and_then(|(pq, nonce)| {
            let q = QueueLink::new(pq, hub.clone(), offer.slot, self.cfg.wait)?;
            Ok((q, nonce))
        });
        let (q, their_nonce) = match mapped {
            Ok(x) => x,
            Err(e) => return refuse_map(w, &e, "the peer's queue"),
        };
        // Admitted before the peer may send (it does after SWITCH); a
        // handshake that ends on TCP drops the link, which leaves the slot.
        let slot = hub.admit(offer, self.cfg.max_message)?;
        w.send(&Msg::Mapped(their_nonce))?;
        Ok(match w.expect(&[ty::SWITCH, ty::ABORT])? {
            Msg::Abort(why) => (PathKind::Tcp, why, None),
            _ => (
                PathKind::Queue,
                queue_reason(hv, &hub, slot, &theirs, note.as_deref()),
                Some(Made::Queue(Box::new(q))),
            ),
        })
    }

    /// Maps the queue a peer offered (checked first) and connects to its
    /// doorbell. Returns it and the nonce read in it. Takes no lock of the
    /// node's: a peer that waits for this map holds its queue's turn.
    fn map_queue(
        &self,
        hv: &dyn Hypervisor,
        peer: &Card,
        o: &QueueOffer,
    ) -> Result<(queues::PeerQueue, u64)> {
        let max_size = self.cfg.queue_size.unwrap_or(0).max(self.cfg.ring_size) * 16;
        let geo = queues::check_offer(
            o.data_size as usize,
            o.max_record as usize,
            o.slots as usize,
            o.slot as usize,
            max_size,
            self.cfg.min_record,
        )?;
        queues::PeerQueue::map(hv, peer, &o.grant, &o.bell, geo, o.slot as usize)
    }

    /// The acceptor's side of the queue path, after the initiator's offer
    /// `o`: map its queue, offer a slot in ours, check its proof.
    fn serve_queue(&self, w: &mut Wire, peer: &Card, o: QueueOffer) -> Result<Path> {
        let set_up = (|| {
            let hv = self
                .backend_for(peer)
                .ok_or_else(|| Error::Backend(self.no_ring.clone()))?;
            if !self.card.ring_candidate(peer) {
                return Err(Error::Invalid(
                    "queue offer from a peer on another host".into(),
                ));
            }
            // Mapped first: the initiator holds its queue's turn until we
            // fetched it, and our own turn may wait for another offer.
            let (pq, nonce) = self.map_queue(&*hv, peer, &o)?;
            // Our queue like the offered one (checked by the map) when this
            // side has no queue size of its own (a job's ranks normally
            // agree).
            let qgeo = match self.cfg.queue_geometry()? {
                Some(g) => g,
                None => crate::queue::Geometry::new(
                    o.data_size as usize,
                    o.max_record as usize,
                    crate::queue::MAX_SLOTS,
                )?,
            };
            let hub = self.hub(&*hv, peer.domain, qgeo)?;
            let offer = hub.offer(&*hv)?;
            let q = QueueLink::new(pq, hub.clone(), offer.slot, self.cfg.wait)?;
            Ok((hv, hub, offer, q, nonce))
        })();
        let (hv, hub, mut offer, q, nonce) = match set_up {
            Ok(x) => x,
            Err(e) => return refuse_map(w, &e, "the offered queue"),
        };
        w.send(&queue_offer(&hub, &mut offer, Some(nonce)))?;
        let served = hub.serve(&mut offer, w.deadline, w.fd());
        let why = match (w.expect(&[ty::MAPPED, ty::REFUSED, ty::ABORT])?, served) {
            (Msg::Refused(why), _) => return Ok(peer_refused(&why, "the queue")),
            // The initiator could not hand its own queue over.
            (Msg::Abort(why), _) => return Ok((PathKind::Tcp, why, None)),
            (_, Err(e)) => format!("tcp: could not hand the queue over: {e}"),
            (Msg::Mapped(n), _) if n != hub.nonce() => NONCE_DIFFERS.to_string(),
            _ => {
                // Admitted before SWITCH, after which the peer sends.
                let slot = hub.admit(offer, self.cfg.max_message)?;
                w.send(&Msg::Switch)?;
                return Ok((
                    PathKind::Queue,
                    queue_reason(&*hv, &hub, slot, &o, None),
                    Some(Made::Queue(Box::new(q))),
                ));
            }
        };
        stay_on_tcp(w, why, Msg::Abort)
    }

    /// The full card of an initiator that proved it knows this node's key
    /// and claims `claimed`: the card admitted for its id, or the one the
    /// resolver finds for its name, or (with a job secret) the claim with
    /// its derived key. The claim must match the card the job published.
    fn resolve_peer(&self, claimed: &Card) -> Result<Card> {
        let differs = |c: &Card| {
            Error::Auth(format!(
                "{} claims a card that differs from the one its job published ({})",
                claimed.label(),
                c.label()
            ))
        };
        if let Some(c) = self.lock().admitted(claimed.id) {
            return if c.same_node(claimed) {
                Ok(c.clone())
            } else {
                Err(differs(c))
            };
        }
        if let Some(resolve) = &self.cfg.resolve {
            if let Some(c) = resolve(claimed.name) {
                if c.id != claimed.id || !c.same_node(claimed) {
                    return Err(differs(&c));
                }
                self.admit(&c)?;
                return Ok(c);
            }
        }
        if let Some(psk) = &self.cfg.psk {
            return Ok(Card {
                key: Some(crate::card::Key::derive(psk, claimed.id)),
                ..claimed.clone()
            });
        }
        Err(Error::Auth(format!(
            "{} is not a peer of this node",
            claimed.label()
        )))
    }

    /// The acceptor's side after the initiator authenticated: identify it,
    /// resolve a crossing, answer, and set up the path.
    fn serve(&self, sock: TcpStream, hs: Acceptor, claimed: Card, deadline: Instant) -> Result<()> {
        let mut w = Wire::new(&sock, deadline);
        let peer = match self.resolve_peer(&claimed) {
            Ok(p) => p,
            Err(e) => {
                let _ = w.send(&Msg::Refuse(e.to_string()));
                return Err(e);
            }
        };
        let key = peer.key.clone().expect("resolved cards have keys");
        let id = peer.id;
        {
            let mut peers = self.lock();
            if peers.ready() >= self.cfg.max_unclaimed {
                drop(peers);
                let why = format!("{BUSY}{} links wait to be taken", self.cfg.max_unclaimed);
                let _ = w.send(&Msg::Refuse(why.clone()));
                return Err(Error::PeerGone(why));
            }
            let accept = match peers.get(id) {
                None | Some(State::Failed { .. }) => true,
                Some(State::Connecting { by_acceptor: false }) => id < self.card.id,
                _ => false,
            };
            if !accept {
                drop(peers);
                return w.send(&hs.verdict(&key, false)?);
            }
            peers.set(id, State::Connecting { by_acceptor: true });
        }
        let r = w
            .send(&hs.verdict(&key, true)?)
            .and_then(|_| self.serve_path(&mut w, &peer))
            .and_then(|(path, why, ch)| {
                let _ = sock.set_write_timeout(None);
                self.make_link(peer, path, why, sock.try_clone()?, ch)
            });
        let mut peers = self.lock();
        let out = match r {
            Ok(l) => {
                peers.set(id, State::Ready(Box::new(l)));
                self.ready.store(peers.ready(), Ordering::Release);
                Ok(())
            }
            Err(e) => {
                peers.set(
                    id,
                    State::Failed {
                        why: e.to_string(),
                        at: Instant::now(),
                    },
                );
                Err(e)
            }
        };
        self.cv.notify_all();
        out
    }

    /// The acceptor's side of the path: map an offered ring, prove it.
    fn serve_path(&self, w: &mut Wire, peer: &Card) -> Result<Path> {
        let (data_size, max_record, grant, bell) =
            match w.expect(&[ty::OFFER, ty::TCPONLY, ty::QOFFER])? {
                Msg::TcpOnly(why) => return Ok((PathKind::Tcp, why, None)),
                Msg::QueueOffer(o) => return self.serve_queue(w, peer, o),
                Msg::Offer {
                    data_size,
                    max_record,
                    grant,
                    bell,
                } => (data_size as usize, max_record as usize, grant, bell),
                _ => unreachable!("expect() checked the type"),
            };
        let mapped = (|| {
            let hv = self
                .backend_for(peer)
                .ok_or_else(|| Error::Backend(self.no_ring.clone()))?;
            if !self.card.ring_candidate(peer) {
                return Err(Error::Invalid("offer from a peer on another host".into()));
            }
            if data_size > self.cfg.ring_size.max(1 << 20) * 16 {
                return Err(Error::Invalid(format!(
                    "offered ring of {data_size} bytes is too large"
                )));
            }
            let geo = Geometry::with_max_record(data_size, max_record)?;
            if let Some(min) = self.cfg.min_record.filter(|&m| max_record < m) {
                return Err(Error::Invalid(format!(
                    "offered records of {max_record} bytes are smaller than the {min} this side sends"
                )));
            }
            let (mut ch, nonce) = Channel::accept(&*hv, peer.domain, geo, &grant, &bell)?;
            if !self.cfg.wait.sleep {
                ch.declare_polling();
            }
            if self.ranks_outnumber_cpus() {
                ch.prepare_a_page_a_call();
            }
            ch.learn_peer();
            Ok((ch, nonce))
        })();
        let (ch, nonce) = match mapped {
            Err(e) => return refuse_map(w, &e, "the offered ring"),
            Ok(x) => x,
        };
        w.send(&Msg::Mapped(nonce))?;
        match w.expect(&[ty::SWITCH, ty::ABORT])? {
            Msg::Abort(why) => Ok((PathKind::Tcp, why, None)),
            _ => {
                let hv = self
                    .backend_for(peer)
                    .map_or(String::new(), |h| h.describe());
                let why = if data_size < self.cfg.ring_size {
                    // the offerer had to shrink its rings (it says why)
                    format!(
                        "ring: co-resident, mapping proved ({hv}; rings of {} KiB, records of {} KiB offered)",
                        data_size / 1024,
                        max_record / 1024
                    )
                } else {
                    format!("ring: co-resident, mapping proved ({hv})")
                };
                Ok((PathKind::Ring, why, Some(Made::Ring(Box::new(ch)))))
            }
        }
    }
}

/// The path a handshake agreed on: its kind, why, and what it set up.
type Path = (PathKind, String, Option<Made>);

/// Why a pair stays on TCP when the nonce its peer echoed is not the one
/// in the region offered.
const NONCE_DIFFERS: &str = "tcp: nonce read by the peer differs (not the same memory)";

/// Tells the peer why this side stays on TCP (`msg`: TCPONLY or ABORT)
/// and stays there.
fn stay_on_tcp(w: &mut Wire, why: String, msg: fn(String) -> Msg) -> Result<Path> {
    w.send(&msg(why.clone()))?;
    Ok((PathKind::Tcp, why, None))
}

/// The peer could not map `what` this side offered (it said `why`): TCP.
fn peer_refused(why: &str, what: &str) -> Path {
    (
        PathKind::Tcp,
        format!("tcp: peer could not map {what}: {why}"),
        None,
    )
}

/// This side could not map `what` the peer offered: tells it why (REFUSED)
/// and stays on TCP.
fn refuse_map(w: &mut Wire, e: &Error, what: &str) -> Result<Path> {
    w.send(&Msg::Refused(e.to_string()))?;
    Ok((
        PathKind::Tcp,
        format!("tcp: could not map {what}: {e}"),
        None,
    ))
}

/// The message offering `offer`'s slot of `hub`: QOFFER, or QMAPPED with
/// the `nonce` read in the peer's queue.
fn queue_offer(hub: &queues::Hub, offer: &mut SlotOffer, nonce: Option<u64>) -> Msg {
    let geo = hub.geometry();
    let o = QueueOffer {
        data_size: geo.data_size as u32,
        max_record: geo.max_record as u32,
        slots: geo.slots as u16,
        slot: offer.slot as u16,
        grant: std::mem::take(&mut offer.grant),
        bell: std::mem::take(&mut offer.bell_desc),
    };
    match nonce {
        None => Msg::QueueOffer(o),
        Some(nonce) => Msg::QueueMapped { nonce, offer: o },
    }
}

/// Why a link took the queue path, for the log and the verbose path line.
fn queue_reason(
    hv: &dyn Hypervisor,
    hub: &queues::Hub,
    slot: usize,
    theirs: &QueueOffer,
    note: Option<&str>,
) -> String {
    format!(
        "queue: co-resident, mapping proved ({}; queues of {} KiB, records of {} KiB; slot {} of ours, {} of theirs{}{})",
        hv.describe(),
        hub.geometry().data_size / 1024,
        theirs.max_record / 1024,
        slot,
        theirs.slot,
        if note.is_some() { "; " } else { "" },
        note.unwrap_or("")
    )
}

/// A connection that has not authenticated yet.
struct Pending {
    sock: TcpStream,
    from: SocketAddr,
    since: Instant,
    hs: Acceptor,
    dec: Decoder,
    challenged: bool,
}

/// What reading from a pending connection came to.
enum Step {
    /// Nothing more to read now.
    Wait,
    /// Close it, saying why in the log (and, if `tell`, to the peer).
    Drop { why: String, tell: bool },
    /// The initiator proved it knows our key and claims this card.
    Proven(Card),
}

impl Pending {
    fn step(&mut self) -> Step {
        let mut buf = [0u8; MAX_PREAUTH];
        loop {
            let want = self.dec.want().min(buf.len());
            let n = match (&self.sock).read(&mut buf[..want]) {
                Ok(0) => {
                    return Step::Drop {
                        why: "closed before authenticating".into(),
                        tell: false,
                    }
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Step::Drop {
                        why: e.to_string(),
                        tell: false,
                    }
                }
            };
            let m = match self.dec.feed(&buf[..n]) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    return Step::Drop {
                        why: e.to_string(),
                        tell: true,
                    }
                }
            };
            if !self.challenged {
                match self.hs.on_hello(m) {
                    Ok(ch) => {
                        // A few dozen bytes into an empty socket buffer.
                        if let Err(e) = (&self.sock).write_all(&ch.encode()) {
                            return Step::Drop {
                                why: e.to_string(),
                                tell: false,
                            };
                        }
                        self.challenged = true;
                    }
                    Err(e) => {
                        return Step::Drop {
                            why: e.to_string(),
                            tell: true,
                        }
                    }
                }
            } else {
                return match self.hs.on_auth(m) {
                    Ok(card) => Step::Proven(card),
                    Err(e) => Step::Drop {
                        why: e.to_string(),
                        tell: true,
                    },
                };
            }
        }
    }
}

fn refuse(sock: &TcpStream, why: &str) {
    let _ = sock.set_nonblocking(true);
    let _ = (&*sock).write(&Msg::Refuse(why.to_string()).encode());
}

/// An eventfd that wakes the acceptor (see `Inner::wake`), or `None`.
pub(super) fn wake_fd() -> Option<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: as above.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wakes the acceptor's poll (adds 1 to the eventfd).
pub(super) fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer to an eventfd we own; a
    // failure (the counter full) leaves it readable, which is all we need.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// How long the acceptor's poll may sleep: until the oldest waiting
/// connection's deadline (rounded up to a millisecond), without end when
/// none waits and the node can wake it, 100 ms when it cannot.
fn poll_timeout(oldest: Option<Instant>, preauth: Duration, can_wake: bool) -> libc::c_int {
    match oldest {
        Some(since) => {
            let left = preauth.saturating_sub(since.elapsed());
            (left.as_micros().div_ceil(1000)).min(60_000) as libc::c_int
        }
        None if can_wake => -1,
        None => 100,
    }
}

/// The acceptor thread: one event loop for every connection until it
/// authenticates, then a thread per authenticated peer for the rest.
pub(super) fn acceptor(inner: Arc<Inner>, listener: TcpListener) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let preauth = inner.cfg.preauth_timeout();
    while !inner.stop.load(Ordering::Acquire) {
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for p in &pending {
            fds.push(libc::pollfd {
                fd: p.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // the node's wake-up, last
        if let Some(w) = &inner.wake {
            fds.push(libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = poll_timeout(
            pending.front().map(|p| p.since),
            preauth,
            inner.wake.is_some(),
        );
        // SAFETY: a valid array of pollfds of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // Connections that have something to say (or hung up).
        let mut i = 0;
        let mut k = 1;
        while i < pending.len() {
            let ready = fds[k].revents != 0;
            k += 1;
            if !ready {
                i += 1;
                continue;
            }
            match pending[i].step() {
                Step::Wait => i += 1,
                Step::Drop { why, tell } => {
                    let p = pending.remove(i).expect("in range");
                    if tell {
                        refuse(&p.sock, &why);
                    }
                    inner.log(&format!("refused a connection from {}: {why}", p.from));
                }
                Step::Proven(card) => {
                    let p = pending.remove(i).expect("in range");
                    inner.spawn_serve(p, card);
                }
            }
        }
        // New connections; a full table drops its oldest.
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((sock, from)) => {
                        if sock.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = sock.set_nodelay(true);
                        if pending.len() >= inner.cfg.max_preauth {
                            if let Some(old) = pending.pop_front() {
                                inner.log(&format!(
                                    "dropped a connection from {}: {} connections wait to authenticate",
                                    old.from, inner.cfg.max_preauth
                                ));
                            }
                        }
                        pending.push_back(Pending {
                            sock,
                            from,
                            since: Instant::now(),
                            hs: Acceptor::new(&inner.card, hypervisor::random_bytes()),
                            dec: Decoder::new(MAX_PREAUTH),
                            challenged: false,
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of descriptors, say: the oldest waiter goes.
                        inner.log(&format!("accept: {e}"));
                        if pending.pop_front().is_none() {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        break;
                    }
                }
            }
        }
        // Deadlines.
        while let Some(p) = pending.front() {
            if p.since.elapsed() < preauth {
                break;
            }
            let p = pending.pop_front().expect("front");
            refuse(&p.sock, "too slow to authenticate");
            inner.log(&format!(
                "refused a connection from {}: no authentication within {preauth:?}",
                p.from
            ));
        }
    }
}

impl Inner {
    /// Hands an authenticated connection to a thread of its own, unless
    /// too many are at work already.
    fn spawn_serve(self: &Arc<Self>, p: Pending, card: Card) {
        let deadline = p.since + self.cfg.connect_timeout;
        if self.workers.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_handshakes {
            self.workers.fetch_sub(1, Ordering::AcqRel);
            refuse(&p.sock, &format!("{BUSY}too many handshakes at once"));
            return;
        }
        let inner = Arc::clone(self);
        let from = p.from;
        let started = std::thread::Builder::new()
            .name("ivcom-handshake".into())
            .spawn(move || {
                let r = p
                    .sock
                    .set_nonblocking(false)
                    .map_err(Error::from)
                    .and_then(|_| inner.serve(p.sock, p.hs, card, deadline));
                if let Err(e) = r {
                    inner.log(&format!("connection from {from} failed: {e}"));
                }
                inner.workers.fetch_sub(1, Ordering::AcqRel);
            });
        if started.is_err() {
            self.workers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Config, Node};
    use std::net::{TcpListener, TcpStream};

    /// An initiator that offered its queue, was answered QMAPPED and then
    /// could not go on (its own hand-over failed: it says ABORT) leaves the
    /// pair on TCP: the acceptor takes the ABORT and names why.
    #[test]
    fn an_abort_after_qmapped_leaves_the_pair_on_tcp() {
        let dir = std::env::temp_dir().join(format!("ivcom-abort-{}", std::process::id()));
        let cfg = || Config {
            host_dir: Some(dir.clone()),
            queue_size: Some(16 << 10),
            listen: Some("127.0.0.1".parse().unwrap()),
            ..Config::default()
        };
        let (a, b) = (Node::new(cfg()).unwrap(), Node::new(cfg()).unwrap());
        a.admit(b.card()).unwrap();
        b.admit(a.card()).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sb = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (sa, _) = l.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // B, the initiator, by hand: its queue for A's domain, offered.
        let hv = b.inner.hv.clone().unwrap();
        let qgeo = b.inner.cfg.queue_geometry().unwrap().unwrap();
        let hub = b.inner.hub(&*hv, a.card().domain, qgeo).unwrap();
        let mut offer = hub.offer(&*hv).unwrap();
        let mut wb = Wire::new(&sb, deadline);
        wb.send(&queue_offer(&hub, &mut offer, None)).unwrap();
        let b_card = b.card().clone();
        let acceptor = std::thread::spawn(move || {
            let mut wa = Wire::new(&sa, deadline);
            let o = match wa.expect(&[ty::QOFFER]).unwrap() {
                Msg::QueueOffer(o) => o,
                m => panic!("not an offer: {m:?}"),
            };
            let r = a.inner.serve_queue(&mut wa, &b_card, o);
            (r, a)
        });
        hub.serve(&mut offer, deadline, wb.fd()).unwrap();
        match wb.expect(&[ty::QMAPPED, ty::REFUSED]).unwrap() {
            Msg::QueueMapped { nonce, .. } => assert_eq!(nonce, hub.nonce()),
            m => panic!("A did not map B's queue: {m:?}"),
        }
        wb.send(&Msg::Abort(
            "tcp: could not hand the queue over: a test".into(),
        ))
        .unwrap();
        let (r, _a) = acceptor.join().unwrap();
        let (path, why, made) = r.unwrap();
        assert_eq!(path, PathKind::Tcp);
        assert!(why.contains("a test"), "{why}");
        assert!(made.is_none());
        drop((hub, offer, b));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
