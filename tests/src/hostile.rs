//! A hostile client: what an outsider can throw at a node's TCP port (a
//! local user, another job, the network). Every attack reports what the
//! victim did with it; the only acceptable answers are a refusal or a
//! closed connection, never a step past authentication.
//!
//! Attacks:
//! - `made-up-card`: a HELLO with an invented card, then a guessed proof;
//! - `replayed-handshake`: the initiator's side of a real handshake
//!   recorded between two nodes of another job, replayed;
//! - `garbage`: random bytes;
//! - `huge-length`: record headers announcing gigabytes (a control record,
//!   a data record);
//! - `forged-frames`: data records (what a peer's messages look like on
//!   TCP) without any handshake, and after a HELLO;
//! - `idle-flood`: many connections that say nothing.

use ivcom_core::node::handshake::{self, Msg, NONCE, PROOF};
use ivcom_core::record::{self, kind};
use ivcom_core::{BackendChoice, Card, Config, Key, Node};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the victim did with one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It sent a REFUSE with this reason, then closed.
    Refused(String),
    /// It closed the connection without a word.
    Closed,
    /// It said nothing within the wait (connection still open).
    Silent,
    /// It went past authentication (ACK, REJECT or a path message): a hole.
    Accepted(String),
}

impl Outcome {
    /// True when the attempt got nowhere.
    pub fn refused(&self) -> bool {
        matches!(self, Outcome::Refused(_) | Outcome::Closed)
    }
}

/// The result of one attack on one target.
#[derive(Debug, Clone)]
pub struct Report {
    pub attack: &'static str,
    pub target: SocketAddr,
    pub outcome: Outcome,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (r, why) = match &self.outcome {
            Outcome::Refused(w) => ("refused", w.as_str()),
            Outcome::Closed => ("closed", ""),
            Outcome::Silent => ("silent", ""),
            Outcome::Accepted(w) => ("ACCEPTED", w.as_str()),
        };
        write!(
            f,
            "HOSTILE attack={} target={} result={r} reason=\"{why}\"",
            self.attack, self.target
        )
    }
}

const WAIT: Duration = Duration::from_secs(15);

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    Ok(s)
}

/// Reads the victim's next message: a handshake message, or what became
/// of the connection.
fn answer(s: &mut TcpStream) -> std::result::Result<Msg, Outcome> {
    let mut h = [0u8; record::HEADER];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(Outcome::Silent)
        }
        Err(_) => return Err(Outcome::Closed),
    }
    let Ok((t, len)) = Msg::check_header(h) else {
        return Err(Outcome::Accepted(format!("a malformed answer {h:02x?}")));
    };
    let mut p = vec![0u8; len];
    if s.read_exact(&mut p).is_err() {
        return Err(Outcome::Closed);
    }
    Msg::decode(t, &p).map_err(|e| Outcome::Accepted(format!("an undecodable answer: {e}")))
}

/// What the final answer to an attempt means.
fn verdict(s: &mut TcpStream) -> Outcome {
    match answer(s) {
        Ok(Msg::Refuse(why)) => {
            // After a refusal the victim must close.
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) | Err(_) => Outcome::Refused(why),
                Ok(_) => Outcome::Accepted(format!("kept talking after refusing: {why}")),
            }
        }
        Ok(m) => Outcome::Accepted(format!("answered {}", Msg::name(m.ty()))),
        Err(o) => o,
    }
}

fn random_card() -> Card {
    let b = ivcom_core::hypervisor::random_bytes::<16>();
    Card {
        id: u64::from_le_bytes(b[..8].try_into().unwrap()) | 1,
        name: u64::from_le_bytes(b[8..].try_into().unwrap()),
        backend: None,
        host_id: [0; 16],
        domain: 0,
        addr: "127.0.0.1:9".parse().unwrap(),
        key: None,
    }
}

fn hello(card: &Card) -> Vec<u8> {
    Msg::Hello {
        version: handshake::VERSION,
        nonce: ivcom_core::hypervisor::random_bytes::<NONCE>(),
        card: card.clone(),
    }
    .encode()
}

/// Connects and sends `hello`; the connection once the victim answered
/// with its challenge (as any acceptor does), or what it did instead.
fn challenged(addr: SocketAddr, hello: &[u8]) -> std::result::Result<TcpStream, Outcome> {
    let mut s = connect(addr).map_err(|_| Outcome::Closed)?;
    s.write_all(hello).map_err(|_| Outcome::Closed)?;
    match answer(&mut s)? {
        Msg::Challenge { .. } => Ok(s),
        m => Err(Outcome::Accepted(format!(
            "answered a HELLO with {}",
            Msg::name(m.ty())
        ))),
    }
}

/// A HELLO with an invented card, then a guessed proof.
pub fn made_up_card(addr: SocketAddr) -> Outcome {
    let mut s = match challenged(addr, &hello(&random_card())) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let guess = Msg::Auth(ivcom_core::hypervisor::random_bytes::<PROOF>()).encode();
    if s.write_all(&guess).is_err() {
        return Outcome::Closed;
    }
    verdict(&mut s)
}

/// The initiator's bytes of a real handshake between two nodes of another
/// job (a secret this client made up), recorded through a proxy: HELLO,
/// AUTH and the path message.
pub fn record_handshake() -> Vec<u8> {
    let cfg = Config {
        backend: BackendChoice::None,
        listen: Some("127.0.0.1".parse().unwrap()),
        psk: Some(Key::random()),
        ..Config::default()
    };
    let a = Node::new(cfg.clone()).expect("node a");
    let b = Node::new(cfg).expect("node b");
    let rec = record_handshake_to(&a, &b);
    drop((a, b));
    rec
}

/// `a` connects (by address, with its job's secret) to `b` through a
/// recording proxy; returns what `a` sent. Both nodes stay up.
pub fn record_handshake_to(a: &Node, b: &Node) -> Vec<u8> {
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy");
    let paddr = proxy.local_addr().unwrap();
    let target = b.card().addr;
    let rec = Arc::new(Mutex::new(Vec::new()));
    let r2 = Arc::clone(&rec);
    let t = std::thread::spawn(move || {
        let (mut from_a, _) = proxy.accept().unwrap();
        let mut to_b = TcpStream::connect(target).unwrap();
        let mut back_a = from_a.try_clone().unwrap();
        let mut from_b = to_b.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_b, &mut back_a);
        });
        let mut buf = [0u8; 4096];
        loop {
            match from_a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    r2.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_b.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    let link = a.connect(paddr).expect("the recorded handshake itself");
    let theirs = b.accept(Duration::from_secs(10));
    drop(link);
    drop(theirs);
    let _ = t.join();
    let v = rec.lock().unwrap().clone();
    v
}

/// Splits recorded bytes into records.
fn records(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= record::HEADER {
        let len = (u64::from_le_bytes(b[..8].try_into().unwrap()) & 0xffff_ffff) as usize;
        let end = (record::HEADER + len).min(b.len());
        out.push(b[..end].to_vec());
        b = &b[end..];
    }
    out
}

/// Replays a recorded initiator stream: its HELLO, then (after the
/// victim's fresh challenge) its old AUTH.
pub fn replay(addr: SocketAddr, recorded: &[u8]) -> Outcome {
    let recs = records(recorded);
    if recs.len() < 2 {
        return Outcome::Accepted("nothing was recorded".into());
    }
    let mut s = match challenged(addr, &recs[0]) {
        Ok(s) => s,
        Err(o) => return o,
    };
    // The old AUTH and whatever followed it.
    for r in &recs[1..] {
        if s.write_all(r).is_err() {
            break;
        }
    }
    verdict(&mut s)
}

/// Random bytes.
pub fn garbage(addr: SocketAddr) -> Outcome {
    let Ok(mut s) = connect(addr) else {
        return Outcome::Closed;
    };
    let mut junk = Vec::with_capacity(64 << 10);
    while junk.len() < 64 << 10 {
        junk.extend_from_slice(&ivcom_core::hypervisor::random_bytes::<32>());
    }
    // The victim may close before it read everything.
    let _ = s.write_all(&junk);
    verdict(&mut s)
}

/// Headers announcing gigabytes: a control record, then (on a new
/// connection) a data record.
pub fn huge_length(addr: SocketAddr) -> Outcome {
    let mut last = Outcome::Closed;
    for k in [kind::CTRL, kind::MSG] {
        let Ok(mut s) = connect(addr) else {
            return Outcome::Closed;
        };
        let h = record::encode_bytes(u32::MAX as usize, k, handshake::ty::HELLO);
        if s.write_all(&h).is_err() {
            continue;
        }
        // and then some data, as if the gigabytes followed
        let _ = s.write_all(&[0x41; 4096]);
        last = verdict(&mut s);
        if !last.refused() {
            return last;
        }
    }
    last
}

/// Data records as a peer would send them (an ob1-tagged message), with
/// no handshake at all, and after a HELLO instead of the proof.
pub fn forged_frames(addr: SocketAddr) -> Outcome {
    let frame = |tag: u8| {
        let payload = [0x5au8; 64];
        let mut f = record::encode_bytes(payload.len(), kind::MSG, tag).to_vec();
        f.extend_from_slice(&payload);
        f
    };
    let Ok(mut s) = connect(addr) else {
        return Outcome::Closed;
    };
    let mut burst = Vec::new();
    for _ in 0..16 {
        burst.extend_from_slice(&frame(0x41));
    }
    let _ = s.write_all(&burst);
    let first = verdict(&mut s);
    if !first.refused() {
        return first;
    }
    let mut s = match challenged(addr, &hello(&random_card())) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let _ = s.write_all(&burst);
    verdict(&mut s)
}

/// The result of an idle flood.
#[derive(Debug, Clone)]
pub struct Flood {
    /// Connections opened.
    pub opened: usize,
    /// Connections that could not be opened.
    pub failed: usize,
    /// Connections the victim had closed by the end of the hold.
    pub closed: usize,
}

/// Opens `n` connections that say nothing, holds them for `hold`, and
/// counts how many the victim closed meanwhile.
pub fn idle_flood(addr: SocketAddr, n: usize, hold: Duration) -> Flood {
    raise_fd_limit();
    let mut socks = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => socks.push(s),
            Err(_) => failed += 1,
        }
    }
    let until = Instant::now() + hold;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut closed = 0;
    for s in &socks {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 256];
        // A refusal (REFUSE then close) or a bare close both count.
        loop {
            match (&*s).read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    Flood {
        opened: socks.len(),
        failed,
        closed,
    }
}

/// Raises this process's descriptor limit to its hard limit.
pub fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Every single-connection attack on `addr`, with a recording for the
/// replay.
pub fn attack_all(addr: SocketAddr, recorded: &[u8]) -> Vec<Report> {
    let r = |attack, outcome| Report {
        attack,
        target: addr,
        outcome,
    };
    vec![
        r("made-up-card", made_up_card(addr)),
        r("replayed-handshake", replay(addr, recorded)),
        r("garbage", garbage(addr)),
        r("huge-length", huge_length(addr)),
        r("forged-frames", forged_frames(addr)),
    ]
}
