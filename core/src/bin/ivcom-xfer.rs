//! `ivcom-xfer`: two processes exchange checksummed messages over an ivcom
//! link. Used by the core's process tests and by the Xen lab.
//!
//! ```text
//! ivcom-xfer listen  [--card-file F] [options]      # side B: waits for one peer
//! ivcom-xfer connect (--card-file F | --addr IP:PORT --psk HEX) [options]   # side A
//! options: --psk HEX (the job's shared secret, 64 hex digits; the listener
//!          makes one up and writes it to the card file when not given)
//!          --count N (messages A->B, 0 = until killed)  --max-size BYTES
//!          --echo N (round trips first, of 1 to min(4096, max-size) bytes)  --seed S  --backend auto|host|xen|none
//!          --host-dir DIR  --ring-size BYTES  --listen-ip IP  --port N
//!          --queue-size BYTES (the queue path)  --min-record BYTES (the
//!          record floor rings shrink to)  --no-crowded-queues (Xen: a
//!          pool too crowded for rings gives rings while it holds
//!          them, then TCP)
//!          --expect-path ring|queue|tcp  --verbose  --tag-limit N (tags >= N break the link)
//!          --timeout SECS (default 600)  --peer-timeout SECS (0: never)
//!          --duration SECS (A: stream this long, then stop; with --count 0)
//!          --linger SECS (after a failure: drop the link, report what is
//!          left mapped, wait this long, then exit)
//! ivcom-xfer xen-ask --peer DOMID [--silence MS]   # what Xen says of a domain
//! ```
//! Every message starts with its index and length; the payload is a
//! pseudo-random stream. Both sides hash every byte moved; at the end B
//! sends its digest and A compares. Prints `RESULT PASS ...` or exits
//! non-zero with the reason. After a link failure it prints, besides
//! `RESULT FAIL <error>`, `DETECT idle_ms=N` (how long the link had made no
//! progress: the time to notice a dead peer) and, once the link is dropped,
//! `RELEASED gntdev_maps=N gntalloc_maps=M` (grant mappings left in the
//! process: 0 when the link released the dead peer's pages).
//!
//! The two sides are one job: they share a secret (`--psk`, or the one the
//! listener writes into its card file, mode 0600, beside its full card),
//! and neither accepts a peer that does not know it.

use ivcom_core::{BackendChoice, Card, Config, Key, Link, Node, PathKind};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::exit;
use std::time::{Duration, Instant};

struct Opts {
    role: String,
    card_file: Option<String>,
    addr: Option<String>,
    count: u64,
    max_size: usize,
    echo: u64,
    seed: u64,
    expect: Option<PathKind>,
    cfg: Config,
    timeout: Duration,
    duration: Option<Duration>,
    linger: Duration,
    peer: Option<u32>,
    silence_ms: u64,
}

fn die(msg: &str) -> ! {
    eprintln!("ivcom-xfer: {msg}");
    exit(2)
}

fn parse() -> Opts {
    let mut a = std::env::args().skip(1);
    let role = a
        .next()
        .unwrap_or_else(|| die("usage: ivcom-xfer listen|connect [options]"));
    let mut o = Opts {
        role,
        card_file: None,
        addr: None,
        count: 1000,
        max_size: 1 << 20,
        echo: 100,
        seed: 1,
        expect: None,
        cfg: Config::default(),
        timeout: Duration::from_secs(600),
        duration: None,
        linger: Duration::ZERO,
        peer: None,
        silence_ms: 2000,
    };
    while let Some(k) = a.next() {
        let mut v = || {
            a.next()
                .unwrap_or_else(|| die(&format!("{k} needs a value")))
        };
        let num = |s: String| {
            s.parse::<u64>()
                .unwrap_or_else(|_| die(&format!("bad number {s}")))
        };
        match k.as_str() {
            "--card-file" => o.card_file = Some(v()),
            "--tag-limit" => o.cfg.tag_limit = num(v()).min(256) as u16,
            "--psk" => {
                o.cfg.psk = Some(Key::from_hex(&v()).unwrap_or_else(|e| die(&e.to_string())))
            }
            "--addr" => o.addr = Some(v()),
            "--count" => o.count = num(v()),
            "--max-size" => o.max_size = num(v()) as usize,
            "--echo" => o.echo = num(v()),
            "--seed" => o.seed = num(v()),
            "--backend" => {
                o.cfg.backend = v()
                    .parse::<BackendChoice>()
                    .unwrap_or_else(|e| die(&e.to_string()))
            }
            "--host-dir" => o.cfg.host_dir = Some(v().into()),
            "--ring-size" => o.cfg.ring_size = num(v()) as usize,
            "--queue-size" => o.cfg.queue_size = Some(num(v()) as usize),
            "--min-record" => o.cfg.min_record = Some(num(v()) as usize),
            "--no-crowded-queues" => o.cfg.crowded_queues = false,
            "--port" => o.cfg.port = num(v()) as u16,
            "--listen-ip" => o.cfg.listen = Some(v().parse().unwrap_or_else(|_| die("bad ip"))),
            "--timeout" => o.timeout = Duration::from_secs(num(v())),
            "--peer-timeout" => {
                o.cfg.peer_timeout = match num(v()) {
                    0 => None,
                    n => Some(Duration::from_secs(n)),
                }
            }
            "--duration" => o.duration = Some(Duration::from_secs(num(v()))),
            "--linger" => o.linger = Duration::from_secs(num(v())),
            "--peer" => o.peer = Some(num(v()) as u32),
            "--silence" => o.silence_ms = num(v()),
            "--expect-path" => {
                o.expect = Some(match v().as_str() {
                    "ring" => PathKind::Ring,
                    "tcp" => PathKind::Tcp,
                    "queue" => PathKind::Queue,
                    x => die(&format!("bad path {x}")),
                })
            }
            "--verbose" => {
                o.cfg.log = Some(std::sync::Arc::new(|m: &str| eprintln!("[ivcom] {m}")))
            }
            _ => die(&format!("unknown option {k}")),
        }
    }
    o
}

/// Word-wise digest of a byte stream (fast, order-sensitive).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Digest {
    h: u64,
    bytes: u64,
    msgs: u64,
}

impl Digest {
    fn add(&mut self, b: &[u8]) {
        let mut h = self.h ^ (b.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        for &x in chunks.remainder() {
            h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.h = h;
        self.bytes += b.len() as u64;
        self.msgs += 1;
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Size of message `i`: edge sizes first, then mostly small messages with a
/// tail of large ones up to `max`.
fn size_of(i: u64, rng: &mut Rng, max: usize) -> usize {
    let edges = [
        0usize,
        1,
        7,
        8,
        9,
        4095,
        4096,
        4097,
        65535,
        65536,
        65537,
        max / 2,
        max,
    ];
    if (i as usize) < edges.len() {
        return edges[i as usize].min(max);
    }
    let cap = if rng.next().is_multiple_of(10) {
        max
    } else {
        max.min(64 << 10)
    };
    let bits = 64 - (cap as u64).leading_zeros() as u64;
    let e = rng.next() % (bits + 1);
    ((rng.next() & ((1u64 << e) - 1)) as usize).min(cap)
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng(seed | 1);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    for x in chunks.into_remainder() {
        *x = r.next() as u8;
    }
}

const TAG_DATA: u8 = 1;
const TAG_ECHO: u8 = 2;
const TAG_DONE: u8 = 3;

fn check_path(o: &Opts, l: &Link) {
    println!("PATH {} reason=\"{}\"", l.path(), l.reason());
    if let Some(p) = o.expect {
        if l.path() != p {
            eprintln!(
                "ivcom-xfer: expected path {p}, got {} ({})",
                l.path(),
                l.reason()
            );
            exit(4);
        }
    }
}

fn fail(e: ivcom_core::Error) -> ! {
    println!("RESULT FAIL {e}");
    eprintln!("ivcom-xfer: {e}");
    exit(3)
}

/// Grant mappings (`/dev/xen/gntdev`, `/dev/xen/gntalloc`) in this process.
fn grant_maps() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let n = |dev: &str| maps.lines().filter(|l| l.ends_with(dev)).count();
    (n("/dev/xen/gntdev"), n("/dev/xen/gntalloc"))
}

/// A link failed after `idle` without progress: says so, drops the link
/// (which unmaps and ends its grants), reports what is left mapped, lingers.
fn fail_link(o: &Opts, l: Link, e: ivcom_core::Error, idle: Duration) -> ! {
    println!("RESULT FAIL {e}");
    println!("DETECT idle_ms={}", idle.as_millis());
    eprintln!("ivcom-xfer: {e}");
    let before = grant_maps();
    drop(l);
    let after = grant_maps();
    println!(
        "RELEASED gntdev_maps={} gntalloc_maps={} (before: {} {})",
        after.0, after.1, before.0, before.1
    );
    let _ = std::io::stdout().flush();
    std::thread::sleep(o.linger);
    exit(3)
}

/// How long the link has made no progress.
struct Progress(Instant);
impl Progress {
    fn tick(&mut self) {
        self.0 = Instant::now();
    }
    fn idle(&self) -> Duration {
        self.0.elapsed()
    }
}

/// `xen-ask`: what this domain's Xen backend learns about domain `peer`,
/// and what xenstored answers to the questions one could ask.
fn xen_ask(o: &Opts) -> ! {
    use ivcom_core::hypervisor::xen::{xenstore, XenBackend};
    let peer = o.peer.unwrap_or_else(|| die("xen-ask needs --peer DOMID"));
    let x = XenBackend::open().unwrap_or_else(|e| die(&e.to_string()));
    if let Err(e) = x.publish_marker() {
        println!("XENASK publish failed: {e}");
    }
    let ask = |what: &str, ty: u32, arg: &str| {
        use std::os::fd::AsFd;
        let r = x.xenbus_paths().iter().find_map(|p| {
            // (a blocking file: the request waits for its reply)
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .ok()?;
            Some(xenstore::request_fd(
                f.as_fd(),
                ty,
                &[arg],
                Duration::from_secs(5),
                &mut |_, _| {},
            ))
        });
        println!("XENASK raw {what} {arg}: {r:?}");
    };
    ask(
        "is-domain-introduced",
        xenstore::XS_IS_DOMAIN_INTRODUCED,
        &peer.to_string(),
    );
    ask("read", xenstore::XS_READ, &format!("/local/domain/{peer}"));
    ask(
        "read",
        xenstore::XS_READ,
        &format!("/local/domain/{peer}/data/ivcom"),
    );
    // as a link would: the first check sets the watch and reads at once
    let mut last = None;
    for _ in 0..5 {
        last = Some(x.ask_about(peer, Duration::from_millis(o.silence_ms)));
        std::thread::sleep(Duration::from_millis(50));
    }
    match last.expect("asked") {
        (Ok(()), m) => println!("XENASK peer={peer} verdict=alive-or-unknown marker={m:?}"),
        (Err(e), m) => println!("XENASK peer={peer} verdict=gone marker={m:?} why=\"{e}\""),
    }
    exit(0)
}

/// Writes the job secret and the full card to `f`, mode 0600, atomically.
fn write_card_file(f: &str, psk: &Key, card: &Card) {
    let tmp = format!("{f}.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap_or_else(|e| die(&format!("{tmp}: {e}")));
    writeln!(w, "PSK {}\nCARD {}", psk.to_hex(), card.to_secret_string())
        .unwrap_or_else(|e| die(&e.to_string()));
    std::fs::rename(&tmp, f).unwrap_or_else(|e| die(&e.to_string()));
}

/// Reads a card file written by the listener (waiting for it to appear).
fn read_card_file(f: &str, timeout: Duration) -> (Key, Card) {
    let t0 = Instant::now();
    let s = loop {
        match std::fs::read_to_string(f) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => die(&format!("{f}: {e}")),
        }
    };
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| die(&format!("{f}: no {k}line")))
            .trim()
            .to_string()
    };
    let psk = Key::from_hex(&field("PSK ")).unwrap_or_else(|e| die(&e.to_string()));
    let card = Card::parse(&field("CARD ")).unwrap_or_else(|e| die(&e.to_string()));
    (psk, card)
}

/// Side B: answers echoes, checks and hashes data, sends its digest.
fn listen(
    l: &mut Link,
    deadline: Option<Instant>,
    p: &mut Progress,
) -> Result<(), ivcom_core::Error> {
    use ivcom_core::Error;
    let mut d = Digest::default();
    let mut buf = Vec::new();
    loop {
        let tag = l.recv(&mut buf, deadline)?;
        p.tick();
        match tag {
            TAG_ECHO => l.send(TAG_ECHO, &buf)?,
            TAG_DATA => {
                if buf.len() < 16 {
                    return Err(Error::Protocol("short data message".into()));
                }
                let idx = u64::from_le_bytes(buf[..8].try_into().unwrap());
                let len = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                if idx != d.msgs || len != buf.len() as u64 {
                    return Err(Error::Protocol(format!(
                        "message {idx} (len {len}) arrived as number {} with {} bytes",
                        d.msgs,
                        buf.len()
                    )));
                }
                d.add(&buf);
            }
            TAG_DONE => {
                let mut r = Vec::new();
                for x in [d.h, d.bytes, d.msgs] {
                    r.extend_from_slice(&x.to_le_bytes());
                }
                l.send(TAG_DONE, &r)?;
                println!(
                    "RESULT PASS received msgs={} bytes={} digest={:016x}",
                    d.msgs, d.bytes, d.h
                );
                let s = l.stats();
                println!(
                    "STATS rx_msgs={} rx_bytes={} tx_doorbells={} rx_doorbells={}",
                    s.rx_msgs, s.rx_bytes, s.tx_doorbells, s.rx_doorbells
                );
                // Wait for the peer to close so it can read our digest.
                let _ = l.recv(&mut buf, Some(Instant::now() + Duration::from_secs(10)));
                return Ok(());
            }
            t => return Err(Error::Protocol(format!("unexpected tag {t}"))),
        }
    }
}

/// Side A: echoes, then the stream, then compares digests.
fn connect(
    o: &Opts,
    l: &mut Link,
    deadline: Option<Instant>,
    p: &mut Progress,
) -> Result<(), ivcom_core::Error> {
    use ivcom_core::Error;
    let mut rng = Rng(o.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut buf = vec![0u8; o.max_size.max(16)];
    let mut back = Vec::new();
    let t0 = Instant::now();
    for i in 0..o.echo {
        // 1 to 4,096 bytes, and never above --max-size
        let n = 1 + (rng.next() % o.max_size.clamp(1, 4096) as u64) as usize;
        fill(&mut buf[..n], rng.next());
        l.send(TAG_ECHO, &buf[..n])?;
        let t = l.recv(&mut back, deadline)?;
        p.tick();
        if t != TAG_ECHO || back != buf[..n] {
            return Err(Error::Protocol(format!("echo {i} came back different")));
        }
    }
    let echo_t = t0.elapsed();
    let mut d = Digest::default();
    let t1 = Instant::now();
    let stop = o.duration.map(|s| t1 + s);
    let mut i = 0u64;
    while (o.count == 0 || i < o.count) && stop.is_none_or(|s| Instant::now() < s) {
        let n = size_of(i, &mut rng, o.max_size).max(16);
        let m = &mut buf[..n];
        fill(&mut m[16..], rng.next());
        m[..8].copy_from_slice(&i.to_le_bytes());
        m[8..16].copy_from_slice(&(n as u64).to_le_bytes());
        d.add(m);
        l.send_deadline(TAG_DATA, m, deadline)?;
        p.tick();
        i += 1;
    }
    l.send(TAG_DONE, &[])?;
    let t = l.recv(&mut back, deadline)?;
    p.tick();
    let stream_t = t1.elapsed();
    let w = |k: usize| u64::from_le_bytes(back[8 * k..8 * k + 8].try_into().unwrap());
    if t != TAG_DONE || back.len() != 24 {
        return Err(Error::Protocol("bad digest reply".into()));
    }
    let theirs = Digest {
        h: w(0),
        bytes: w(1),
        msgs: w(2),
    };
    if theirs != d {
        println!("RESULT FAIL digest mismatch: sent {d:?}, peer got {theirs:?}");
        exit(5);
    }
    let s = l.stats();
    println!(
        "RESULT PASS sent msgs={} bytes={} digest={:016x} echo_rtt_us={:.2} stream_MBps={:.0}",
        d.msgs,
        d.bytes,
        d.h,
        echo_t.as_secs_f64() * 1e6 / o.echo.max(1) as f64,
        d.bytes as f64 / stream_t.as_secs_f64() / 1e6
    );
    println!(
        "STATS tx_msgs={} tx_bytes={} tx_doorbells={} rx_doorbells={}",
        s.tx_msgs, s.tx_bytes, s.tx_doorbells, s.rx_doorbells
    );
    Ok(())
}

fn main() {
    let mut o = parse();
    if o.role == "xen-ask" {
        xen_ask(&o);
    }
    let mut peer_card = None;
    if o.role == "connect" && o.addr.is_none() {
        let f = o
            .card_file
            .clone()
            .unwrap_or_else(|| die("--card-file or --addr needed"));
        let (psk, card) = read_card_file(&f, o.timeout);
        o.cfg.psk = Some(psk);
        peer_card = Some(card);
    }
    if o.role == "listen" && o.cfg.psk.is_none() {
        if o.card_file.is_none() {
            die("listen needs --psk or a --card-file to write the job's secret into");
        }
        o.cfg.psk = Some(Key::random());
    }
    let node = Node::new(o.cfg.clone()).unwrap_or_else(|e| die(&e.to_string()));
    if let Some(n) = node.backend_note() {
        println!("NOTE {n}");
    }
    let deadline = Some(Instant::now() + o.timeout);
    match o.role.as_str() {
        "listen" => {
            println!("CARD {}", node.card());
            if let Some(f) = &o.card_file {
                write_card_file(f, o.cfg.psk.as_ref().expect("set above"), node.card());
            }
            let mut l = match node.accept(o.timeout) {
                Ok(Some(l)) => l,
                Ok(None) => die("no peer connected"),
                Err(e) => fail(e),
            };
            check_path(&o, &l);
            let mut p = Progress(Instant::now());
            if let Err(e) = listen(&mut l, deadline, &mut p) {
                fail_link(&o, l, e, p.idle());
            }
        }
        "connect" => {
            let mut l = match (&o.addr, &peer_card) {
                (Some(a), _) => {
                    if o.cfg.psk.is_none() {
                        die("--addr needs --psk (the job's shared secret)");
                    }
                    node.connect(a.parse().unwrap_or_else(|_| die("bad --addr")))
                }
                (None, Some(card)) => node.link(card),
                (None, None) => unreachable!("read above"),
            }
            .unwrap_or_else(|e| fail(e));
            check_path(&o, &l);
            let mut p = Progress(Instant::now());
            if let Err(e) = connect(&o, &mut l, deadline, &mut p) {
                fail_link(&o, l, e, p.idle());
            }
        }
        r => die(&format!("unknown role {r}")),
    }
}
