//! A node: one process's end of ivcom. It publishes a [`Card`], listens for
//! peers on TCP, and hands out one [`Link`] per peer, on the shared ring when
//! the peer is co-resident and the probe succeeds, on TCP otherwise.
//!
//! Wire-up (DESIGN.md, "Choosing the path for a peer"):
//! 1. The initiator connects to the peer's TCP address and sends `HELLO`
//!    with its card; the acceptor answers `ACK` with its own card, or
//!    `REJECT` when the two sides connected to each other at the same moment
//!    and this connection loses (the connection opened by the lower card id
//!    wins; both sides apply the same rule, so exactly one survives).
//! 2. If the cards are ring candidates (same backend, same host id), the
//!    initiator shares a region, writes a random nonce into its control
//!    pages and sends `OFFER` (geometry, grant and doorbell descriptors).
//!    Otherwise it sends `TCPONLY` with the reason.
//! 3. The acceptor maps the region and echoes the nonce it read from the
//!    shared page (`MAPPED`), or says why it could not (`REFUSED`).
//! 4. The initiator compares the nonce and sends `SWITCH` (both sides use
//!    the ring) or `ABORT` (both stay on TCP). No data flows before this
//!    exchange ends, so no message can overtake another during the switch.
//!
//! On the ring path the TCP connection stays open as the control plane: its
//! end of file tells that the peer died.

use crate::card::Card;
use crate::channel::{Channel, WaitPolicy};
use crate::error::{Error, Result};
use crate::frame::Stats;
use crate::hypervisor::{self, BackendChoice, BackendOptions, Hypervisor};
use crate::netif::{self, IfSpec};
use crate::ring::{kind, Geometry, RECORD_HEADER};
use crate::tcp::{self, TcpLink};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A sink for verbose messages.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Configuration of a node. `Default` works without tuning.
#[derive(Clone)]
pub struct Config {
    /// Backend choice (`auto`: xen on a Xen guest, host otherwise).
    pub backend: BackendChoice,
    /// Hypervisor directory of the host backend.
    pub host_dir: Option<PathBuf>,
    /// Data bytes of each ring direction (power of two).
    pub ring_size: usize,
    /// Largest record payload (default: a quarter of the ring).
    pub max_record: Option<usize>,
    /// Smallest largest-record a pair's rings may be shrunk to when the
    /// backend cannot share the configured ones (Xen's gntalloc page limit,
    /// a nearly full hypervisor directory), and the smallest an offered
    /// ring must have to be accepted. `None`: the configured largest record
    /// (rings shrink only while they still hold it) and no check on
    /// offers. A caller that sends at most `n` bytes per
    /// [`Link::try_send`]/[`Link::reserve`] may set `n` here: links then
    /// stay on a (smaller) ring instead of falling back to TCP.
    pub min_record: Option<usize>,
    /// Interfaces or subnets to publish an address from.
    pub if_include: Vec<IfSpec>,
    /// Interfaces or subnets never to publish.
    pub if_exclude: Vec<IfSpec>,
    /// Explicit address to listen on (overrides the interface lists).
    pub listen: Option<IpAddr>,
    /// TCP port to listen on (0: any free port).
    pub port: u16,
    /// Time allowed for connecting and the handshake.
    pub connect_timeout: Duration,
    /// Largest TCP frame payload.
    pub tcp_frame: usize,
    /// Largest message accepted from a peer.
    pub max_message: usize,
    /// Wait policy of blocking calls.
    pub wait: WaitPolicy,
    /// Where verbose messages go (none: silent).
    pub log: Option<LogFn>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendChoice::Auto,
            host_dir: None,
            ring_size: 1 << 20,
            max_record: None,
            min_record: None,
            if_include: Vec::new(),
            if_exclude: Vec::new(),
            listen: None,
            port: 0,
            connect_timeout: Duration::from_secs(30),
            tcp_frame: tcp::DEFAULT_FRAME,
            max_message: crate::DEFAULT_MAX_MESSAGE,
            wait: WaitPolicy::default(),
            log: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("host_dir", &self.host_dir)
            .field("ring_size", &self.ring_size)
            .field("max_record", &self.max_record)
            .field("min_record", &self.min_record)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The ring geometry this configuration asks for (an error names the
    /// parameter that is out of range).
    pub fn geometry(&self) -> Result<Geometry> {
        let geo = match self.max_record {
            Some(m) => Geometry::with_max_record(self.ring_size, m)?,
            None => Geometry::new(self.ring_size)?,
        };
        if let Some(m) = self.min_record {
            if m > geo.max_record as usize {
                return Err(Error::Invalid(format!(
                    "smallest record {m} exceeds the largest record {}",
                    geo.max_record
                )));
            }
        }
        Ok(geo)
    }

    /// The smallest largest-record rings may shrink to.
    fn record_floor(&self, geo: Geometry) -> usize {
        self.min_record.unwrap_or(geo.max_record as usize)
    }
}

/// The path a link took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Shared ring.
    Ring,
    /// TCP.
    Tcp,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathKind::Ring => "ring",
            PathKind::Tcp => "tcp",
        })
    }
}

enum Imp {
    Ring(Box<Channel>),
    Tcp(TcpLink),
}

/// A link to one peer, on whichever path was chosen.
pub struct Link {
    peer: Card,
    path: PathKind,
    reason: String,
    imp: Imp,
    /// Control connection of the ring path (liveness).
    ctl: Option<TcpStream>,
    idle_polls: u32,
    policy: WaitPolicy,
    degraded: bool,
}

/// Empty polls between two liveness checks of the control connection.
const ALIVE_EVERY: u32 = 4096;

impl Link {
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
            Imp::Ring(c) => c.stats,
            Imp::Tcp(t) => t.stats,
        }
    }

    /// Largest message that travels as one record or frame (and so is
    /// delivered in place and may be sent with `try_send`/`reserve`).
    pub fn max_inline(&self) -> usize {
        match &self.imp {
            Imp::Ring(c) => c.max_record(),
            Imp::Tcp(t) => t.max_frame(),
        }
    }

    /// File descriptor to poll for input on the TCP path.
    pub fn tcp_fd(&self) -> Option<i32> {
        match &self.imp {
            Imp::Ring(_) => None,
            Imp::Tcp(t) => Some(t.fd()),
        }
    }

    fn check_alive(&self) -> Result<()> {
        match &self.ctl {
            Some(s) => tcp::check_alive(s),
            None => Ok(()),
        }
    }

    /// Sends a message of any size, blocking until it is in the ring or has
    /// left the process.
    pub fn send(&mut self, tag: u8, msg: &[u8]) -> Result<()> {
        self.send_deadline(tag, msg, None)
    }

    /// [`Link::send`] with a deadline.
    pub fn send_deadline(&mut self, tag: u8, msg: &[u8], deadline: Option<Instant>) -> Result<()> {
        match &mut self.imp {
            Imp::Ring(c) => {
                let ctl = &self.ctl;
                let mut alive = || ctl.as_ref().map_or(Ok(()), tcp::check_alive);
                c.send(tag, msg, deadline, &mut alive)
            }
            Imp::Tcp(t) => t.send(tag, msg, deadline),
        }
    }

    /// Sends a message of at most [`Link::max_inline`] bytes, gathered from
    /// `parts`, without blocking. `Ok(false)` when the ring is full (the TCP
    /// path queues instead and always accepts).
    pub fn try_send(&mut self, tag: u8, parts: &[&[u8]]) -> Result<bool> {
        match &mut self.imp {
            Imp::Ring(c) => c.try_send_parts(tag, parts),
            Imp::Tcp(t) => t.send_nb(tag, parts).map(|_| true),
        }
    }

    /// Reserves ring space for a message of `len` bytes (at most
    /// [`Link::max_inline`]) to be written in place. `Ok(None)` when the ring
    /// is full or the link is on TCP.
    #[inline]
    pub fn reserve(&mut self, len: usize) -> Result<Option<*mut u8>> {
        match &mut self.imp {
            Imp::Ring(c) => c.reserve(len),
            Imp::Tcp(_) => Ok(None),
        }
    }

    /// Sends the reserved message.
    #[inline]
    pub fn commit(&mut self, len: usize, tag: u8) -> Result<()> {
        match &mut self.imp {
            Imp::Ring(c) => c.commit(len, tag),
            Imp::Tcp(_) => Err(Error::Invalid("commit without reservation".into())),
        }
    }

    /// Drops a reservation.
    #[inline]
    pub fn cancel(&mut self) {
        if let Imp::Ring(c) = &mut self.imp {
            c.cancel()
        }
    }

    /// Delivers up to `max` messages to `f(tag, bytes)` without blocking
    /// (in place where possible: the slice is valid only during the call),
    /// and pushes queued TCP output. Returns how many were delivered.
    pub fn poll(&mut self, max: usize, f: &mut dyn FnMut(u8, &[u8])) -> Result<usize> {
        let n = match &mut self.imp {
            Imp::Ring(c) => c.poll(max, f)?,
            Imp::Tcp(t) => t.poll(max, f)?,
        };
        if n == 0 && self.ctl.is_some() {
            self.idle_polls += 1;
            if self.idle_polls >= ALIVE_EVERY {
                self.idle_polls = 0;
                self.check_alive()?;
            }
        }
        Ok(n)
    }

    /// Cheap test for pollers: `false` when a full poll would certainly find
    /// nothing (ring path: one load). Every few thousand idle answers it
    /// returns `true` anyway, so that the full poll checks the peer's close
    /// flag and the control connection.
    #[inline]
    pub fn worth_polling(&mut self) -> bool {
        match &self.imp {
            Imp::Ring(c) if c.looks_idle() => {
                self.idle_polls += 1;
                // Let the full poll look at the close flag and the control
                // connection now and then.
                self.idle_polls >= ALIVE_EVERY
            }
            _ => true,
        }
    }

    /// The next complete message without blocking, as `(tag, pointer,
    /// len)`, valid until [`Link::release_msg`] (which must come before the
    /// next `peek_msg`). No borrow is held meanwhile: the caller may send on
    /// this link while it handles the message (the Open MPI receive upcall
    /// does), but must not poll it again.
    #[inline]
    pub fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        let r = match &mut self.imp {
            Imp::Ring(c) => c.peek_msg()?,
            Imp::Tcp(t) => t.peek_msg()?,
        };
        if r.is_none() && self.ctl.is_some() {
            self.idle_polls += 1;
            if self.idle_polls >= ALIVE_EVERY {
                self.idle_polls = 0;
                self.check_alive()?;
            }
        }
        Ok(r)
    }

    /// Releases the message returned by [`Link::peek_msg`]. On the ring, the
    /// space may go back to the sender only with the next
    /// [`Link::flush_rx`]: call it after each batch of messages.
    #[inline]
    pub fn release_msg(&mut self) -> Result<()> {
        match &mut self.imp {
            Imp::Ring(c) => c.release_msg(),
            Imp::Tcp(t) => {
                t.release_msg();
                Ok(())
            }
        }
    }

    /// Hands the space of all released messages back to the sender.
    pub fn flush_rx(&mut self) -> Result<()> {
        match &mut self.imp {
            Imp::Ring(c) => c.flush_rx(),
            Imp::Tcp(_) => Ok(()),
        }
    }

    /// Receives one message into `out` (blocking until `deadline`); returns
    /// its tag.
    pub fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<u8> {
        match &mut self.imp {
            Imp::Ring(c) => {
                let ctl = &self.ctl;
                let mut alive = || ctl.as_ref().map_or(Ok(()), tcp::check_alive);
                c.recv(out, deadline, &mut alive)
            }
            Imp::Tcp(t) => t.recv(out, deadline, &mut || Ok(())),
        }
    }

    /// Pushes queued TCP output without blocking; returns the bytes still
    /// queued.
    pub fn flush(&mut self) -> Result<usize> {
        match &mut self.imp {
            Imp::Ring(_) => Ok(0),
            Imp::Tcp(t) => {
                t.flush()?;
                Ok(t.queued())
            }
        }
    }

    /// Bytes queued on the TCP path and not yet written to the socket.
    pub fn queued(&self) -> usize {
        match &self.imp {
            Imp::Ring(_) => 0,
            Imp::Tcp(t) => t.queued(),
        }
    }

    /// Closes the link: the peer drains what was sent, then sees
    /// [`Error::Closed`].
    pub fn close(&mut self) {
        match &mut self.imp {
            Imp::Ring(c) => c.close(),
            Imp::Tcp(t) => t.close(),
        }
    }

    /// The wait policy of blocking calls.
    pub fn wait_policy(&self) -> WaitPolicy {
        self.policy
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

enum Peer {
    Connecting { by_acceptor: bool },
    Ready(Box<Link>),
    Taken,
    Failed(String),
}

struct Inner {
    cfg: Config,
    hv: Option<Arc<dyn Hypervisor>>,
    /// With the xen backend: the host backend, for peers in this same VM
    /// (same Xen domain id). Plain shared memory of one kernel needs no
    /// grants, so those pairs cost no gntalloc pages.
    local: Option<Arc<dyn Hypervisor>>,
    no_ring: String,
    note: Option<String>,
    card: Card,
    peers: Mutex<HashMap<u64, Peer>>,
    cv: Condvar,
    stop: AtomicBool,
    ready: AtomicUsize,
}

/// One process's end of ivcom.
pub struct Node {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

// Handshake messages (CTRL frames on the TCP connection).
const HELLO: u8 = 1;
const ACK: u8 = 2;
const REJECT: u8 = 3;
const OFFER: u8 = 4;
const TCPONLY: u8 = 5;
const MAPPED: u8 = 6;
const REFUSED: u8 = 7;
const SWITCH: u8 = 8;
const ABORT: u8 = 9;
const MAX_CTL: usize = 1 << 20;

fn ctl_send(s: &mut TcpStream, tag: u8, payload: &[u8]) -> Result<()> {
    let h = (payload.len() as u64 | (kind::CTRL as u64) << 32 | (tag as u64) << 40).to_le_bytes();
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&h);
    v.extend_from_slice(payload);
    s.write_all(&v)?;
    Ok(())
}

fn ctl_recv(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; RECORD_HEADER];
    s.read_exact(&mut h)?;
    let (len, k, tag) = tcp::parse_header(h, MAX_CTL)?;
    if k != kind::CTRL {
        return Err(Error::Protocol("expected a control frame".into()));
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((tag, p))
}

fn expect(s: &mut TcpStream, want: &[u8]) -> Result<(u8, Vec<u8>)> {
    let (t, p) = ctl_recv(s)?;
    if !want.contains(&t) {
        return Err(Error::Protocol(format!("unexpected control message {t}")));
    }
    Ok((t, p))
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(Error::Protocol("short offer".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn blob(&mut self) -> Result<&[u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

enum Initiated {
    Link(Box<Link>),
    Rejected,
}

/// Offers a channel with geometry `geo`, or with smaller rings when the
/// backend cannot share that much: its fixed limit (`max_share`, e.g.
/// gntalloc's page limit per domain) is respected up front, and a failed
/// share (no room left now, e.g. pages held by other links) is retried with
/// half the rings while that remains a valid geometry whose largest record
/// is at least `min_record` ([`Geometry::halved`]). Returns the offer (or
/// the last error) and, when the rings were shrunk, why.
fn offer_fitted(
    hv: &dyn Hypervisor,
    peer: u32,
    mut geo: Geometry,
    min_record: usize,
    nonce: u64,
) -> (Result<crate::channel::Offer>, Option<String>) {
    let mut why = None;
    while crate::channel::region_bytes(geo) > hv.max_share() {
        match geo.halved(min_record) {
            Some(g) => {
                why.get_or_insert_with(|| {
                    format!(
                        "{} bytes exceed what {} can share ({})",
                        crate::channel::region_bytes(geo),
                        hv.describe(),
                        hv.max_share()
                    )
                });
                geo = g;
            }
            None => break,
        }
    }
    loop {
        match Channel::offer(hv, peer, geo, nonce) {
            Ok(o) => return (Ok(o), why),
            Err(e) => match geo.halved(min_record) {
                Some(g) => {
                    why = Some(e.to_string());
                    geo = g;
                }
                None => return (Err(e), why),
            },
        }
    }
}

impl Node {
    /// Starts a node: opens the backend (a failure leaves the node TCP-only
    /// and is reported by [`Node::ring_status`]), binds the TCP listener on
    /// the selected interface and starts the acceptor thread.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.geometry()?;
        let (hv, no_ring, note) = match hypervisor::open(
            cfg.backend,
            &BackendOptions {
                host_dir: cfg.host_dir.clone(),
            },
        ) {
            Ok(o) => match o.backend {
                Some(hv) => (Some(hv), String::new(), o.note),
                None => (
                    None,
                    "shared rings disabled (backend none)".to_string(),
                    o.note,
                ),
            },
            Err(e) => (None, format!("no shared-memory backend: {e}"), None),
        };
        let local = match &hv {
            Some(h) if h.kind() == hypervisor::BackendKind::Xen => {
                hypervisor::host::HostBackend::open(&BackendOptions {
                    host_dir: cfg.host_dir.clone(),
                })
                .ok()
                .map(|h| Arc::new(h) as Arc<dyn Hypervisor>)
            }
            _ => None,
        };
        let ip = match cfg.listen {
            Some(ip) => ip,
            None => netif::select(&cfg.if_include, &cfg.if_exclude)?,
        };
        let listener = TcpListener::bind(SocketAddr::new(ip, cfg.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let card = Card {
            id: hypervisor::random_u64() | 1,
            backend: hv.as_ref().map(|h| h.kind()),
            host_id: hv.as_ref().map_or([0; 16], |h| h.host_id()),
            domain: hv.as_ref().map_or(0, |h| h.domain_id()),
            addr,
        };
        let inner = Arc::new(Inner {
            cfg,
            hv,
            local,
            no_ring,
            note,
            card,
            peers: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
        });
        if !inner.no_ring.is_empty() {
            inner.log(&inner.no_ring.clone());
        }
        let i2 = inner.clone();
        let thread = std::thread::Builder::new()
            .name("ivcom-accept".into())
            .spawn(move || acceptor(i2, listener))?;
        Ok(Node {
            inner,
            thread: Some(thread),
        })
    }

    /// This node's card.
    pub fn card(&self) -> &Card {
        &self.inner.card
    }

    /// `Ok(description)` of the backend, or `Err(reason)` why this node
    /// cannot offer or accept rings.
    pub fn ring_status(&self) -> std::result::Result<String, String> {
        match &self.inner.hv {
            Some(h) => Ok(h.describe()),
            None => Err(self.inner.no_ring.clone()),
        }
    }

    /// Why the preferred backend is not in use, if `auto` had to settle
    /// (for example a Xen guest without the grant modules); show it once.
    pub fn backend_note(&self) -> Option<&str> {
        self.inner.note.as_deref()
    }

    /// The link to `peer`: established now (as initiator) or taken from the
    /// acceptor if the peer connected first. Both sides may call this at the
    /// same moment; exactly one connection survives.
    pub fn link(&self, peer: &Card) -> Result<Link> {
        let inner = &self.inner;
        if peer.id == inner.card.id {
            return Err(Error::Invalid("cannot link to self".into()));
        }
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        {
            let mut peers = inner.lock();
            match peers.get(&peer.id) {
                Some(Peer::Ready(_)) => return Ok(inner.take(&mut peers, peer.id)),
                Some(Peer::Taken) => {
                    return Err(Error::Invalid(format!("already linked to {peer}")))
                }
                Some(Peer::Connecting { .. }) => {
                    drop(peers);
                    return inner.wait_ready(peer.id, deadline);
                }
                Some(Peer::Failed(_)) | None => {
                    peers.insert(peer.id, Peer::Connecting { by_acceptor: false });
                }
            }
        }
        match inner.initiate(peer.addr, Some(peer), deadline) {
            Ok(Initiated::Link(l)) => {
                inner.lock().insert(peer.id, Peer::Taken);
                Ok(*l)
            }
            Ok(Initiated::Rejected) => inner.wait_ready(peer.id, deadline),
            Err(e) => {
                let mut peers = inner.lock();
                if let Some(Peer::Connecting { by_acceptor: false }) = peers.get(&peer.id) {
                    peers.insert(peer.id, Peer::Failed(e.to_string()));
                }
                inner.cv.notify_all();
                Err(e)
            }
        }
    }

    /// Connects to a node known only by its address (its card is learned in
    /// the handshake).
    pub fn connect(&self, addr: SocketAddr) -> Result<Link> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        match inner.initiate(addr, None, deadline)? {
            Initiated::Link(l) => {
                inner.lock().insert(l.peer.id, Peer::Taken);
                Ok(*l)
            }
            Initiated::Rejected => Err(Error::Protocol("peer rejected the connection".into())),
        }
    }

    /// Number of links that peers established with this node and that were
    /// not taken yet (cheap: one atomic load).
    pub fn pending(&self) -> usize {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Takes a link that a peer established, waiting up to `timeout`.
    pub fn accept(&self, timeout: Duration) -> Result<Option<Link>> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        let mut peers = inner.lock();
        loop {
            let id = peers
                .iter()
                .find(|(_, p)| matches!(p, Peer::Ready(_)))
                .map(|(id, _)| *id);
            if let Some(id) = id {
                return Ok(Some(inner.take(&mut peers, id)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            peers = inner
                .cv
                .wait_timeout(peers, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// The backend for a ring with `peer`: the host backend when both sides
    /// use xen from the same domain (two processes of one VM), the node's
    /// backend otherwise. (Equal domain ids on two different Xen hosts
    /// cannot share memory either way: the host backend's map fails there
    /// and the pair uses TCP, as the xen map would.)
    fn backend_for(&self, peer: &Card) -> Option<Arc<dyn Hypervisor>> {
        let same_vm = self.card.backend == Some(hypervisor::BackendKind::Xen)
            && peer.backend == self.card.backend
            && peer.domain == self.card.domain;
        match (&self.local, same_vm) {
            (Some(l), true) => Some(l.clone()),
            _ => self.hv.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, msg: &str) {
        if let Some(l) = &self.cfg.log {
            l(msg);
        }
    }

    fn take(&self, peers: &mut HashMap<u64, Peer>, id: u64) -> Link {
        match peers.insert(id, Peer::Taken) {
            Some(Peer::Ready(l)) => {
                self.ready.fetch_sub(1, Ordering::AcqRel);
                *l
            }
            _ => unreachable!("take of a peer that is not ready"),
        }
    }

    fn wait_ready(&self, id: u64, deadline: Instant) -> Result<Link> {
        let mut peers = self.lock();
        loop {
            match peers.get(&id) {
                Some(Peer::Ready(_)) => return Ok(self.take(&mut peers, id)),
                Some(Peer::Failed(e)) => return Err(Error::PeerGone(e.clone())),
                Some(Peer::Taken) => return Err(Error::Invalid("link already taken".into())),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout);
            }
            peers = self
                .cv
                .wait_timeout(peers, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn make_link(
        &self,
        peer: Card,
        path: PathKind,
        reason: String,
        sock: TcpStream,
        ch: Option<Channel>,
    ) -> Result<Link> {
        sock.set_read_timeout(None)?;
        let (imp, ctl) = match ch {
            Some(mut c) => {
                c.policy = self.cfg.wait;
                c.set_max_message(self.cfg.max_message);
                sock.set_nonblocking(true)?;
                (Imp::Ring(Box::new(c)), Some(sock))
            }
            None => {
                let mut t = TcpLink::new(sock, self.cfg.tcp_frame)?;
                t.set_max_message(self.cfg.max_message);
                (Imp::Tcp(t), None)
            }
        };
        self.log(&format!("peer {peer}: path {path}: {reason}"));
        let degraded =
            path == PathKind::Tcp && self.hv.is_some() && self.card.ring_candidate(&peer);
        Ok(Link {
            degraded,
            peer,
            path,
            reason,
            imp,
            ctl,
            idle_polls: 0,
            policy: self.cfg.wait,
        })
    }

    /// The initiator's side of the handshake.
    fn initiate(
        &self,
        addr: SocketAddr,
        expect_peer: Option<&Card>,
        deadline: Instant,
    ) -> Result<Initiated> {
        let left = deadline.saturating_duration_since(Instant::now());
        // A listener that is not up yet (peer still starting): retry.
        let mut sock = loop {
            match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::PeerGone(format!("connect {addr}: {e}"))),
            }
        };
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(100))))?;
        ctl_send(&mut sock, HELLO, &self.card.to_bytes())?;
        let (t, p) = expect(&mut sock, &[ACK, REJECT])?;
        if t == REJECT {
            return Ok(Initiated::Rejected);
        }
        let peer = Card::from_bytes(&p)?;
        if let Some(e) = expect_peer {
            if e.id != peer.id {
                return Err(Error::Protocol(format!(
                    "{addr} answered as {peer}, expected {e}"
                )));
            }
        }
        // Decide the path.
        let hv = match (self.backend_for(&peer), self.card.ring_candidate(&peer)) {
            (Some(hv), true) => hv,
            (None, _) => {
                let why = format!("tcp: {}", self.no_ring);
                ctl_send(&mut sock, TCPONLY, why.as_bytes())?;
                return self
                    .make_link(peer, PathKind::Tcp, why, sock, None)
                    .map(|l| Initiated::Link(Box::new(l)));
            }
            (Some(_), false) => {
                let why = match (peer.backend, self.card.backend) {
                    (None, _) => "tcp: peer has no shared-memory backend".to_string(),
                    (Some(theirs), Some(ours)) if theirs != ours => {
                        format!("tcp: peer backend {theirs} differs from ours ({ours})")
                    }
                    _ => "tcp: peer is on another host".to_string(),
                };
                ctl_send(&mut sock, TCPONLY, why.as_bytes())?;
                return self
                    .make_link(peer, PathKind::Tcp, why, sock, None)
                    .map(|l| Initiated::Link(Box::new(l)));
            }
        };
        let nonce = hypervisor::random_u64();
        let geo = self.cfg.geometry()?;
        let floor = self.cfg.record_floor(geo);
        let (offered, shrunk) = offer_fitted(&*hv, peer.domain, geo, floor, nonce);
        let mut offer = match offered {
            Ok(o) => o,
            Err(e) => {
                let why = format!("tcp: could not share a ring: {e}");
                ctl_send(&mut sock, TCPONLY, why.as_bytes())?;
                return self
                    .make_link(peer, PathKind::Tcp, why, sock, None)
                    .map(|l| Initiated::Link(Box::new(l)));
            }
        };
        if !self.cfg.wait.sleep {
            offer.channel.declare_polling();
        }
        let geo = offer.channel.geometry();
        let mut msg = Vec::new();
        msg.extend_from_slice(&geo.data_size.to_le_bytes());
        msg.extend_from_slice(&geo.max_record.to_le_bytes());
        for blob in [&offer.grant, &offer.bell] {
            msg.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            msg.extend_from_slice(blob);
        }
        ctl_send(&mut sock, OFFER, &msg)?;
        let (t, p) = expect(&mut sock, &[MAPPED, REFUSED])?;
        let (path, why, ch) = if t == REFUSED {
            let why = format!(
                "tcp: peer could not map the ring: {}",
                String::from_utf8_lossy(&p)
            );
            (PathKind::Tcp, why, None)
        } else if Reader(&p).u64()? != nonce {
            let why = "tcp: nonce read by the peer differs (not the same memory)".to_string();
            ctl_send(&mut sock, ABORT, why.as_bytes())?;
            (PathKind::Tcp, why, None)
        } else {
            ctl_send(&mut sock, SWITCH, &[])?;
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
            (PathKind::Ring, why, Some(offer.channel))
        };
        self.make_link(peer, path, why, sock, ch)
            .map(|l| Initiated::Link(Box::new(l)))
    }

    /// The acceptor's side of the handshake.
    fn serve(&self, mut sock: TcpStream) -> Result<()> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(self.cfg.connect_timeout))?;
        let (_, p) = expect(&mut sock, &[HELLO])?;
        let peer = Card::from_bytes(&p)?;
        {
            let mut peers = self.lock();
            let accept = match peers.get(&peer.id) {
                None | Some(Peer::Failed(_)) => true,
                Some(Peer::Connecting { by_acceptor: false }) => peer.id < self.card.id,
                _ => false,
            };
            if !accept {
                drop(peers);
                return ctl_send(&mut sock, REJECT, &[]);
            }
            peers.insert(peer.id, Peer::Connecting { by_acceptor: true });
        }
        let id = peer.id;
        let r = self.serve_accepted(&mut sock, peer);
        let mut peers = self.lock();
        let out = match r {
            Ok(l) => {
                peers.insert(id, Peer::Ready(Box::new(l)));
                self.ready.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                peers.insert(id, Peer::Failed(e.to_string()));
                Err(e)
            }
        };
        self.cv.notify_all();
        out
    }

    fn serve_accepted(&self, sock: &mut TcpStream, peer: Card) -> Result<Link> {
        ctl_send(sock, ACK, &self.card.to_bytes())?;
        let (t, p) = expect(sock, &[OFFER, TCPONLY])?;
        let s2 = sock.try_clone()?;
        if t == TCPONLY {
            let why = String::from_utf8_lossy(&p).into_owned();
            return self.make_link(peer, PathKind::Tcp, why, s2, None);
        }
        let mut r = Reader(&p);
        let data_size = r.u32()? as usize;
        let max_record = r.u32()? as usize;
        let grant = r.blob()?.to_vec();
        let bell = r.blob()?.to_vec();
        let mapped = (|| {
            let hv = self
                .backend_for(&peer)
                .ok_or_else(|| Error::Backend(self.no_ring.clone()))?;
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
            ch.learn_peer();
            Ok((ch, nonce))
        })();
        match mapped {
            Err(e) => {
                let why = format!("tcp: could not map the offered ring: {e}");
                ctl_send(sock, REFUSED, e.to_string().as_bytes())?;
                self.make_link(peer, PathKind::Tcp, why, s2, None)
            }
            Ok((ch, nonce)) => {
                ctl_send(sock, MAPPED, &nonce.to_le_bytes())?;
                let (t, p) = expect(sock, &[SWITCH, ABORT])?;
                if t == SWITCH {
                    let hv = self
                        .backend_for(&peer)
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
                    self.make_link(peer, PathKind::Ring, why, s2, Some(ch))
                } else {
                    let why = String::from_utf8_lossy(&p).into_owned();
                    drop(ch);
                    self.make_link(peer, PathKind::Tcp, why, s2, None)
                }
            }
        }
    }
}

fn acceptor(inner: Arc<Inner>, listener: TcpListener) {
    let fd = listener.as_raw_fd();
    while !inner.stop.load(Ordering::Acquire) {
        let _ = tcp::wait_fd(
            fd,
            libc::POLLIN,
            Some(Instant::now() + Duration::from_millis(100)),
        );
        match listener.accept() {
            Ok((sock, _)) => {
                let i2 = inner.clone();
                let _ = std::thread::Builder::new()
                    .name("ivcom-handshake".into())
                    .spawn(move || {
                        if let Err(e) = sock
                            .set_nonblocking(false)
                            .map_err(Error::from)
                            .and_then(|_| i2.serve(sock))
                        {
                            i2.log(&format!("incoming connection failed: {e}"));
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::host::HostBackend;
    use crate::hypervisor::{BackendKind, BellWords, Doorbell, Region};

    /// The host backend with a fixed share limit (`max_share`, like Xen's
    /// gntalloc limit) and a smaller room left at share time, in a
    /// directory of its own that goes with it.
    struct Limited {
        inner: HostBackend,
        max_share: usize,
        room: usize,
        dir: std::path::PathBuf,
    }

    impl Drop for Limited {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Hypervisor for Limited {
        fn kind(&self) -> BackendKind {
            self.inner.kind()
        }
        fn domain_id(&self) -> u32 {
            self.inner.domain_id()
        }
        fn host_id(&self) -> [u8; 16] {
            self.inner.host_id()
        }
        fn share(&self, peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
            if len > self.room {
                return Err(Error::Backend(format!("no room for {len} bytes")));
            }
            self.inner.share(peer, len)
        }
        fn map(&self, peer: u32, desc: &[u8], len: usize) -> Result<Box<dyn Region>> {
            self.inner.map(peer, desc, len)
        }
        fn bell_offer(&self, peer: u32, w: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
            self.inner.bell_offer(peer, w)
        }
        fn bell_accept(&self, peer: u32, d: &[u8], w: BellWords) -> Result<Box<dyn Doorbell>> {
            self.inner.bell_accept(peer, d, w)
        }
        fn describe(&self) -> String {
            "limited".into()
        }
        fn max_share(&self) -> usize {
            self.max_share
        }
    }

    fn limited(tag: &str, max_share: usize, room: usize) -> Limited {
        let dir = std::env::temp_dir().join(format!("ivcom-fit-{tag}-{}", std::process::id()));
        Limited {
            inner: HostBackend::open_dir(&dir).unwrap(),
            max_share,
            room,
            dir,
        }
    }

    const MIB: usize = 1 << 20;

    fn data_size(r: &Result<crate::channel::Offer>) -> usize {
        r.as_ref().unwrap().channel.geometry().data_size as usize
    }

    #[test]
    fn rings_fit_the_backends_share_limit() {
        // 2 MiB rings (two rings + control pages: 4 MiB + 8 KiB) on a 4 MiB
        // limit, records of 256 KiB: 1 MiB rings.
        let hv = limited("limit", 4 * MIB, usize::MAX);
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), MIB);
        assert!(why.unwrap().contains("exceed what limited can share"));
    }

    #[test]
    fn rings_shrink_when_the_backend_has_no_room_now() {
        let hv = limited("room", usize::MAX, 3 * MIB);
        let geo = Geometry::with_max_record(4 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), MIB);
        assert!(why.unwrap().contains("no room"));
    }

    #[test]
    fn rings_never_shrink_below_the_largest_record() {
        // 512 KiB records need rings of at least 2 MiB (a record fits in
        // half a ring): the offer fails with the backend's error.
        let hv = limited("floor", 4 * MIB, usize::MAX);
        let geo = Geometry::new(2 * MIB).unwrap();
        let (r, _) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        let e = r.err().expect("no ring of 2 MiB fits");
        assert!(
            e.to_string().contains("exceed what limited can share"),
            "{e}"
        );
    }

    #[test]
    fn records_shrink_down_to_the_floor_when_rings_must() {
        // 2 MiB rings of 256 KiB records, floor 8 KiB. With 3 MiB of room
        // (other links hold the rest) 1 MiB rings keep their records; with
        // 600 KiB, 256 KiB rings get records of 128 KiB - 8 (the largest
        // that fits in half a ring).
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let hv = limited("rec1", 4 * MIB, 3 * MIB);
        let (r, _) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (MIB as u32, 256 << 10));
        let hv = limited("rec2", 4 * MIB, 600 << 10);
        let (r, why) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (256 << 10, (128 << 10) - 8));
        assert!(why.unwrap().contains("no room"));
    }

    #[test]
    fn records_never_shrink_below_the_floor() {
        // 40 KiB of room: 16 KiB rings (two rings + control pages: 40 KiB)
        // would fit, but their records of 8 KiB - 8 are below the floor of
        // 8 KiB: no offer.
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let hv = limited("rec3", 4 * MIB, 40 << 10);
        let (r, _) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        assert!(r
            .err()
            .expect("no ring fits")
            .to_string()
            .contains("no room"));
        // the same room with a 4000-byte floor: 16 KiB rings
        let hv = limited("rec4", 4 * MIB, 40 << 10);
        let (r, _) = offer_fitted(&hv, 1, geo, 4000, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (16 << 10, (8 << 10) - 8));
    }

    #[test]
    fn halving_keeps_a_valid_geometry() {
        let mut g = Geometry::with_max_record(4 * MIB, 256 << 10).unwrap();
        let mut sizes = Vec::new();
        while let Some(h) = g.halved(1024) {
            assert!(Geometry::with_max_record(h.data_size as usize, h.max_record as usize).is_ok());
            assert!(h.max_record <= g.max_record && h.max_record >= 1024);
            sizes.push(h.data_size);
            g = h;
        }
        // down to the smallest data area (4 KiB, records of 2 KiB - 8)
        assert_eq!(*sizes.last().unwrap() as usize, crate::ring::MIN_DATA);
        assert_eq!(
            Geometry::with_max_record(2 * MIB, 256 << 10)
                .unwrap()
                .halved(256 << 10),
            Some(Geometry::with_max_record(MIB, 256 << 10).unwrap())
        );
        assert_eq!(
            Geometry::with_max_record(MIB, 256 << 10)
                .unwrap()
                .halved(256 << 10),
            None
        );
    }

    #[test]
    fn an_offer_with_records_below_the_acceptors_floor_is_refused() {
        // a offers 64 KiB rings (16 KiB records); b sends up to 32 KiB in
        // one record: b refuses the ring and the pair works over TCP.
        let dir = std::env::temp_dir().join(format!("ivcom-floor-{}", std::process::id()));
        let cfg = |ring_size, min_record| Config {
            host_dir: Some(dir.clone()),
            ring_size,
            min_record,
            listen: Some("127.0.0.1".parse().unwrap()),
            ..Config::default()
        };
        let a = Node::new(cfg(64 << 10, None)).unwrap();
        let b = Node::new(cfg(MIB, Some(32 << 10))).unwrap();
        let card_b = b.card().clone();
        let mut la = a.link(&card_b).unwrap();
        assert_eq!(la.path(), PathKind::Tcp, "{}", la.reason());
        assert!(
            la.reason()
                .contains("smaller than the 32768 this side sends"),
            "{}",
            la.reason()
        );
        // the link works all the same
        let card_a = a.card().clone();
        let t = std::thread::spawn(move || {
            let mut lb = b.link(&card_a).unwrap();
            let mut m = Vec::new();
            let tag = lb.recv(&mut m, None).unwrap();
            (tag, m)
        });
        la.send(9, &[1, 2, 3]).unwrap();
        assert_eq!(t.join().unwrap(), (9, vec![1, 2, 3]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rings_that_fit_are_left_alone() {
        let hv = limited("fits", 8 * MIB, usize::MAX);
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), 2 * MIB);
        assert!(why.is_none());
    }
}
