//! A node: one process's end of ivcom. It publishes a [`Card`], listens for
//! peers on TCP, and hands out one [`Link`] per peer, on the shared ring when
//! the peer is co-resident and the probe succeeds, on TCP otherwise.
//!
//! Only the job's own nodes become peers. A node's full card carries a
//! secret key and travels only through the job's private channel (the
//! Open MPI modex, a private file); a node accepts a connection only from
//! a peer that proves it knows this node's key, and whose card it was
//! given ([`Node::admit`], [`Node::link`]), finds through
//! [`Config::resolve`], or whose key derives from the job's shared secret
//! ([`Config::psk`]). The handshake is in [`handshake`] (codec, no I/O)
//! and `session.rs` (the drivers); `docs/design.md` tells the whole of it.
//!
//! Wire-up, once authenticated:
//! 1. If the cards are ring candidates (same backend, same host id), the
//!    initiator shares a region, writes a random nonce into its control
//!    pages and sends `OFFER` (geometry, grant and doorbell descriptors).
//!    Otherwise it sends `TCPONLY` with the reason.
//! 2. The acceptor maps the region and echoes the nonce it read from the
//!    shared page (`MAPPED`), or says why it could not (`REFUSED`).
//! 3. The initiator compares the nonce and sends `SWITCH` (both sides use
//!    the ring) or `ABORT` (both stay on TCP). No data flows before this
//!    exchange ends, so no message can overtake another during the switch.
//!
//! When both sides connect to each other at the same moment, the
//! connection opened by the lower card id wins (both apply the same rule).
//! On the ring path the TCP connection stays open as the control plane:
//! its end of file tells that the peer died.

mod config;
mod fit;
pub mod handshake;
mod link;
mod peers;
mod queues;
mod session;

pub use config::{Config, LogFn, Resolver};
pub use link::{Link, PathKind};

use crate::card::{Card, Key};
use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::hypervisor::{self, BackendOptions, Hypervisor};
use crate::netif;
use crate::tcp::{self, TcpLink};
use handshake::Target;
use link::Imp;
use peers::{Peers, State};
use session::Initiated;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Inner {
    cfg: Config,
    hv: Option<Arc<dyn Hypervisor>>,
    /// With the xen backend: the host backend, for peers in this same VM
    /// (same Xen domain id). Plain shared memory of one kernel needs no
    /// grants, so those pairs cost no gntalloc pages.
    local: Option<Arc<dyn Hypervisor>>,
    no_ring: String,
    note: Option<String>,
    /// This node's full card (with its key).
    card: Card,
    peers: Mutex<Peers>,
    cv: Condvar,
    stop: AtomicBool,
    /// Wakes the acceptor thread when `stop` is set (an eventfd; `None`
    /// if it could not be made: the acceptor then looks at `stop` every
    /// 100 ms). With it the acceptor sleeps until a connection comes, a
    /// waiting one speaks or times out, or the node stops: an idle rank
    /// is not woken ten times a second.
    wake: Option<std::os::fd::OwnedFd>,
    /// Links ready to be taken (a copy of the table's count, for pollers).
    ready: AtomicUsize,
    /// Authenticated handshakes in progress.
    workers: AtomicUsize,
    /// Ring space this node's producers share (`Config::ring_budget`).
    budget: Option<Arc<crate::ring::Budget>>,
    /// The queue path: this process's receive queue for each peer domain,
    /// by backend (on Xen the ranks of this domU share the host backend's
    /// queues, the other domUs Xen's). Held by its links: a queue whose
    /// last link went (the job's end, a domain that died) is given back,
    /// and the domain's next peer gets a new one.
    hubs: Mutex<HubMap>,
}

type HubMap =
    std::collections::HashMap<(hypervisor::BackendKind, u32), std::sync::Weak<queues::Hub>>;

/// The shared-memory path a handshake set up.
enum Made {
    Ring(Box<Channel>),
    Queue(Box<queues::QueueLink>),
}

/// One process's end of ivcom.
pub struct Node {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    /// Starts a node: opens the backend (a failure leaves the node TCP-only
    /// and is reported by [`Node::ring_status`]), binds the TCP listener on
    /// the selected interface and starts the acceptor thread.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.check()?;
        let opts = BackendOptions {
            host_dir: cfg.host_dir.clone(),
            share_limit: cfg.share_limit,
        };
        let (hv, no_ring, note) = match hypervisor::open(cfg.backend, &opts) {
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
                hypervisor::host::HostBackend::open(&opts)
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
        let id = hypervisor::random_u64() | 1;
        let key = match &cfg.psk {
            Some(psk) => Key::derive(psk, id),
            None => Key::random(),
        };
        let card = Card {
            id,
            name: cfg.name,
            backend: hv.as_ref().map(|h| h.kind()),
            host_id: hv.as_ref().map_or([0; 16], |h| h.host_id()),
            domain: hv.as_ref().map_or(0, |h| h.domain_id()),
            addr,
            key: Some(key),
        };
        let cfg_budget = cfg.ring_budget.map(crate::ring::Budget::new);
        let inner = Arc::new(Inner {
            cfg,
            hv,
            local,
            no_ring,
            note,
            card,
            peers: Mutex::new(Peers::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            wake: session::wake_fd(),
            ready: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            budget: cfg_budget,
            hubs: Mutex::new(Default::default()),
        });
        if !inner.no_ring.is_empty() {
            inner.log(&inner.no_ring.clone());
        }
        let i2 = inner.clone();
        let thread = std::thread::Builder::new()
            .name("ivcom-accept".into())
            .spawn(move || session::acceptor(i2, listener))?;
        Ok(Node {
            inner,
            thread: Some(thread),
        })
    }

    /// This node's full card, with its key: publish it only through a
    /// channel the job trusts (its peers need it to connect), and its
    /// public form ([`Card::public`], `Display`) anywhere.
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

    /// Accepts `card` (a full card, with key) as a peer: the node it
    /// describes may now connect to this one.
    pub fn admit(&self, card: &Card) -> Result<()> {
        if card.id == self.inner.card.id {
            return Err(Error::Invalid("cannot admit this node itself".into()));
        }
        self.inner.admit(card)
    }

    /// The link to `peer` (a full card): established now (as initiator)
    /// or taken from the acceptor if the peer connected first. Both sides
    /// may call this at the same moment; exactly one connection survives.
    pub fn link(&self, peer: &Card) -> Result<Link> {
        let inner = &self.inner;
        if peer.id == inner.card.id {
            return Err(Error::Invalid("cannot link to self".into()));
        }
        let peer = match (&peer.key, &inner.cfg.psk) {
            (Some(_), _) => peer.clone(),
            (None, Some(psk)) => Card {
                key: Some(Key::derive(psk, peer.id)),
                ..peer.clone()
            },
            (None, None) => {
                return Err(Error::Invalid(format!(
                    "the card of {} has no key: link needs the full card",
                    peer.label()
                )))
            }
        };
        inner.admit(&peer)?;
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        {
            let mut peers = inner.lock();
            match peers.get(peer.id) {
                Some(State::Ready(_)) => return inner.take(&mut peers, peer.id),
                Some(State::Taken) => {
                    return Err(Error::Invalid(format!(
                        "already linked to {}",
                        peer.label()
                    )))
                }
                Some(State::Connecting { .. }) => {
                    drop(peers);
                    return inner.wait_ready(peer.id, deadline);
                }
                Some(State::Failed { .. }) | None => {
                    peers.set(peer.id, State::Connecting { by_acceptor: false });
                }
            }
        }
        match inner.initiate(peer.addr, Target::Card(peer.clone()), deadline) {
            Ok(Initiated::Link(l)) => {
                inner.lock().set(peer.id, State::Taken);
                Ok(*l)
            }
            Ok(Initiated::Crossed) => inner.wait_ready(peer.id, deadline),
            Err(e) => {
                let e = e.at_peer(|| peer.label());
                let mut peers = inner.lock();
                if let Some(State::Connecting { by_acceptor: false }) = peers.get(peer.id) {
                    peers.set(
                        peer.id,
                        State::Failed {
                            why: e.to_string(),
                            at: Instant::now(),
                        },
                    );
                }
                inner.cv.notify_all();
                Err(e)
            }
        }
    }

    /// Connects to a node known only by its address. Needs the job's shared
    /// secret ([`Config::psk`]): the peer's card is learned, and its
    /// knowledge of the secret proved, in the handshake.
    pub fn connect(&self, addr: SocketAddr) -> Result<Link> {
        let inner = &self.inner;
        let psk = inner.cfg.psk.clone().ok_or_else(|| {
            Error::Invalid(
                "connecting by address needs the job's shared secret (Config::psk); \
                 otherwise link to the peer's card"
                    .into(),
            )
        })?;
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        match inner.initiate(addr, Target::Psk(psk), deadline)? {
            Initiated::Link(l) => {
                inner.lock().set(l.peer.id, State::Taken);
                Ok(*l)
            }
            Initiated::Crossed => Err(Error::Protocol("peer rejected the connection".into())),
        }
    }

    /// Number of links that peers established with this node and that were
    /// not taken yet (cheap: one atomic load).
    pub fn pending(&self) -> usize {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// How many of the admitted peers are co-resident (may share this
    /// host's memory, whether or not a ring to them exists yet).
    pub fn coresident_peers(&self) -> usize {
        let card = &self.inner.card;
        self.inner.lock().coresident(card)
    }

    /// The ids of the peers whose links wait to be taken.
    pub fn pending_ids(&self) -> Vec<u64> {
        self.inner.lock().ready_ids()
    }

    /// Takes the link that peer `id` established, if it is waiting.
    pub fn take(&self, id: u64) -> Option<Link> {
        let inner = &self.inner;
        let mut peers = inner.lock();
        inner.take(&mut peers, id).ok()
    }

    /// Takes a link that a peer established, waiting up to `timeout`.
    pub fn accept(&self, timeout: Duration) -> Result<Option<Link>> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        let mut peers = inner.lock();
        loop {
            if let Some(id) = peers.any_ready() {
                return inner.take(&mut peers, id).map(Some);
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
        if let Some(w) = &self.inner.wake {
            session::wake(w);
        }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `card` as a peer. A new one that may share this host's
    /// memory counts toward the ring budget's division from now on
    /// ([`crate::ring::Budget::expect_one`]), before any ring to it exists.
    fn admit(&self, card: &Card) -> Result<()> {
        let new = self.lock().admit(card)?;
        if new && self.card.ring_candidate(card) {
            if let Some(b) = &self.budget {
                b.expect_one();
            }
        }
        Ok(())
    }

    fn log(&self, msg: &str) {
        if let Some(l) = &self.cfg.log {
            l(msg);
        }
    }

    fn take(&self, peers: &mut Peers, id: u64) -> Result<Link> {
        let l = peers
            .take(id)
            .ok_or_else(|| Error::Invalid("link already taken".into()))?;
        self.ready.store(peers.ready(), Ordering::Release);
        Ok(l)
    }

    fn wait_ready(&self, id: u64, deadline: Instant) -> Result<Link> {
        let mut peers = self.lock();
        loop {
            match peers.get(id) {
                Some(State::Ready(_)) => return self.take(&mut peers, id),
                Some(State::Failed { why, .. }) => return Err(Error::PeerGone(why.clone())),
                Some(State::Taken) => return Err(Error::Invalid("link already taken".into())),
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

    /// This process's receive queue for `domain` (created and shared on
    /// first use).
    fn hub(
        &self,
        hv: &dyn Hypervisor,
        domain: u32,
        geo: crate::queue::Geometry,
    ) -> Result<Arc<queues::Hub>> {
        let key = (hv.kind(), domain);
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hubs.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(h);
        }
        let h = Arc::new(queues::Hub::new(
            hv,
            domain,
            geo.data_size,
            geo.max_record,
            !self.cfg.wait.sleep,
            self.cfg.tag_limit,
        )?);
        hubs.retain(|_, h| h.strong_count() > 0);
        hubs.insert(key, Arc::downgrade(&h));
        Ok(h)
    }

    fn make_link(
        &self,
        peer: Card,
        path: PathKind,
        reason: String,
        sock: TcpStream,
        made: Option<Made>,
    ) -> Result<Link> {
        sock.set_read_timeout(None)?;
        if let Some(t) = self.cfg.peer_timeout {
            // The control connection of a ring or queue carries nothing
            // more: the kernel may give up on it by itself.
            tcp::watch(&sock, t, made.is_some())?;
        }
        let (imp, ctl) = match made {
            Some(Made::Queue(q)) => {
                sock.set_nonblocking(true)?;
                (Imp::Queue(q), Some(sock))
            }
            Some(Made::Ring(mut c)) => {
                c.policy = self.cfg.wait;
                c.set_max_message(self.cfg.max_message);
                c.set_tag_limit(self.cfg.tag_limit);
                if let Some(b) = &self.budget {
                    c.set_budget(b.clone());
                }
                sock.set_nonblocking(true)?;
                (Imp::Ring(c), Some(sock))
            }
            None => {
                let mut t = TcpLink::new(sock, self.cfg.tcp_frame)?;
                t.set_max_message(self.cfg.max_message);
                t.set_tag_limit(self.cfg.tag_limit);
                t.set_max_queue(self.cfg.tcp_queue);
                (Imp::Tcp(Box::new(t)), None)
            }
        };
        self.log(&format!("peer {}: path {path}: {reason}", peer.label()));
        let degraded =
            path == PathKind::Tcp && self.hv.is_some() && self.card.ring_candidate(&peer);
        let hv = match &imp {
            Imp::Ring(_) | Imp::Queue(_) => self.backend_for(&peer),
            Imp::Tcp(_) => None,
        };
        Ok(Link {
            hv,
            degraded,
            peer,
            path,
            reason,
            imp,
            ctl,
            idle_polls: 0,
            policy: self.cfg.wait,
            timeout: self.cfg.peer_timeout,
            last_check: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

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
        b.admit(a.card()).unwrap();
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

    /// Whether `link`'s receiving ring prepares a page a call.
    fn by_page(link: &Link) -> bool {
        match &link.imp {
            link::Imp::Ring(c) => c.prepares_a_page_a_call(),
            link::Imp::Tcp(_) | link::Imp::Queue(_) => {
                panic!("not a ring link: {}", link.reason())
            }
        }
    }

    /// A ring between `a` and `b`, both ends: whether each prepares a page
    /// a call.
    fn ring_ends(a: &Node, b: Node) -> (bool, bool) {
        let (card_a, card_b) = (a.card().clone(), b.card().clone());
        let t = std::thread::spawn(move || by_page(&b.link(&card_a).unwrap()));
        let la = a.link(&card_b).unwrap();
        (by_page(&la), t.join().unwrap())
    }

    #[test]
    fn receivers_prepare_pages_in_their_slack_once_the_hosts_ranks_outnumber_its_cpus() {
        // Two nodes of one host: two ranks. Their receiving rings prepare
        // a stream's pages in one call where two ranks have a CPU each,
        // else a page a call. With as many more co-resident peers admitted
        // as there are CPUs (ranks that will share cores), the rings of a
        // new pair prepare a page a call, on both ends.
        // SAFETY: no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let dir = std::env::temp_dir().join(format!("ivcom-slack-{}", std::process::id()));
        let node = || {
            Node::new(Config {
                host_dir: Some(dir.clone()),
                ring_size: MIB,
                listen: Some("127.0.0.1".parse().unwrap()),
                ..Config::default()
            })
            .unwrap()
        };
        let (a, b) = (node(), node());
        b.admit(a.card()).unwrap();
        let two = 2 > cpus;
        assert_eq!(ring_ends(&a, b), (two, two));
        let (c, d) = (node(), node());
        d.admit(c.card()).unwrap();
        for n in [&c, &d] {
            for i in 0..cpus as u64 {
                n.admit(&Card {
                    id: 0xC0FFEE00 + i,
                    key: Some(crate::card::Key::random()),
                    ..n.card().clone()
                })
                .unwrap();
            }
        }
        assert_eq!(ring_ends(&c, d), (true, true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
