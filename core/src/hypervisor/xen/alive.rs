//! Whether a peer domain still exists, as Xen's toolstack tells it: the
//! explicit signal behind "domain 3 is gone" (docs/design.md, "A peer that
//! dies").
//!
//! Every domain that makes rings publishes a marker in its own xenstore
//! home, `/local/domain/<self>/data/ivcom`, readable by every domain
//! ([`Domains::publish`]). When Xen destroys a domain, the toolstack
//! removes that home with everything in it. A domain watching its peer's
//! marker is told (a watch fires for a readable node that is deleted), and
//! reading the marker then fails: the peer is gone. A domU can learn it no
//! other way: xenstored keeps `/local/domain` and other domains' homes
//! unreadable to it, sends `@releaseDomain` events only to privileged
//! domains, and the guest kernel's xenbus device does not pass
//! `XS_IS_DOMAIN_INTRODUCED` on (measured in the Xen lab; docs/xen-lab.md).
//!
//! A link asks between polls, never on the message path
//! ([`crate::hypervisor::Hypervisor::check_peer`]). Asking costs a round
//! trip to xenstored in dom0 (milliseconds), so the marker is read only when
//! its watch fired since the last read (the first time: the watch fires once
//! when it is set), or when the peer has been silent (nothing acknowledged
//! on the link's control connection) for [`ASK_AFTER`], then at most every
//! [`ASK_EVERY`]. A live peer's kernel acknowledges a keepalive probe every
//! second, so its link only reads once. A paused domain keeps its home: its
//! link waits for the keepalive verdict (the peer timeout), as for any
//! silent peer. A peer without a marker (it could not write one) is never
//! declared gone by this module.

use super::abi::DomId;
use super::xenstore::{self, Reply};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

/// Silence after which a link's peer domain is asked about (a live peer
/// answers a keepalive probe every second).
pub const ASK_AFTER: Duration = Duration::from_millis(1500);
/// Questions about one silent peer domain at most this often.
pub const ASK_EVERY: Duration = Duration::from_millis(500);
/// Looks at the watch for one peer domain at most this often.
const LOOK_EVERY: Duration = Duration::from_millis(20);
/// How long one xenstore request may take.
const XS_TIMEOUT: Duration = Duration::from_secs(2);
/// The marker, relative to a domain's home.
pub const MARKER: &str = "data/ivcom";

/// The absolute path of `domain`'s marker.
pub fn marker_path(domain: DomId) -> String {
    format!("/local/domain/{domain}/{MARKER}")
}

/// The watch token for `domain`'s marker.
fn token(domain: DomId) -> String {
    format!("ivcom-{domain}")
}

/// What the marker of a peer domain says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Marker {
    /// Never read.
    #[default]
    Unknown,
    /// Read at least once: the peer publishes one.
    Seen,
    /// It was there and is not any more: the domain is gone.
    Gone,
    /// The peer publishes none: no verdict from here.
    Absent,
}

/// Interprets a read of a peer's marker, given what was known before.
pub fn read_verdict(before: Marker, r: &Reply) -> Marker {
    match (before, r) {
        (_, Reply::Value(_)) => Marker::Seen,
        // Deleted with the domain's home: reading it (or, with its parents
        // gone, anything below an unreadable parent) fails.
        (Marker::Seen | Marker::Gone, Reply::Error(_)) => Marker::Gone,
        (Marker::Unknown | Marker::Absent, Reply::Error(_)) => Marker::Absent,
    }
}

#[derive(Default)]
struct Peer {
    marker: Marker,
    /// Watch events seen for its marker, and the count when last read.
    events: u64,
    read_at: Option<(Instant, u64)>,
    looked: Option<Instant>,
    watched: bool,
}

enum Watch {
    NotOpen,
    Open(OwnedFd),
    Failed,
}

struct State {
    published: bool,
    watch: Watch,
    peers: HashMap<DomId, Peer>,
}

/// What this domain knows about its peer domains' existence (one per
/// backend).
pub struct Domains {
    xenbus: Vec<PathBuf>,
    domid: DomId,
    state: Mutex<State>,
}

/// Opens a xenbus device read-write, non-blocking.
fn open_xenbus(paths: &[PathBuf]) -> Result<OwnedFd> {
    let mut last = None;
    for p in paths {
        let c = CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::Invalid(format!("path {}", p.display())))?;
        // SAFETY: open on a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        last = Some(format!(
            "{}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Err(Error::Backend(format!(
        "no xenbus device: {}",
        last.unwrap_or_else(|| "none configured".into())
    )))
}

/// One request on a fresh connection; watch events are not expected there.
fn request(xenbus: &[PathBuf], ty: u32, args: &[&str]) -> Result<Reply> {
    let fd = open_xenbus(xenbus)?;
    xenstore::request_fd(fd.as_fd(), ty, args, XS_TIMEOUT, &mut |_, _| {})
}

impl Domains {
    /// The domains this domain (`domid`) links to, asked about through the
    /// first of `xenbus` that opens. Nothing is opened before the first
    /// [`Domains::publish`] or [`Domains::check`].
    pub fn new(xenbus: Vec<PathBuf>, domid: DomId) -> Self {
        Domains {
            xenbus,
            domid,
            state: Mutex::new(State {
                published: false,
                watch: Watch::NotOpen,
                peers: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes this domain's marker, readable by every domain (once; later
    /// calls do nothing). Errors are returned but harmless: peers then
    /// rely on their timeouts.
    pub fn publish(&self) -> Result<()> {
        let mut st = self.lock();
        if st.published {
            return Ok(());
        }
        st.published = true;
        let path = marker_path(self.domid);
        let ok = |r: Reply, what: &str| match r {
            Reply::Value(_) => Ok(()),
            Reply::Error(e) => Err(Error::Backend(format!("xenstore {what} {path}: {e}"))),
        };
        // The write's payload is the path and the value without a NUL.
        let value = format!("{}", self.domid);
        let fd = open_xenbus(&self.xenbus)?;
        let mut req = Vec::new();
        req.extend_from_slice(path.as_bytes());
        req.push(0);
        req.extend_from_slice(value.as_bytes());
        let r = xenstore::request_raw(fd.as_fd(), xenstore::XS_WRITE, &req, XS_TIMEOUT)?;
        ok(r, "write")?;
        // owner: this domain; everyone else: read
        let perms = format!("r{}", self.domid);
        let r = xenstore::request_fd(
            fd.as_fd(),
            xenstore::XS_SET_PERMS,
            &[&path, &perms],
            XS_TIMEOUT,
            &mut |_, _| {},
        )?;
        ok(r, "set permissions of")
    }

    /// What is known of domain `peer`'s marker (for tools and tests).
    pub fn marker(&self, peer: DomId) -> Marker {
        self.lock()
            .peers
            .get(&peer)
            .map_or(Marker::Unknown, |p| p.marker)
    }

    /// `Err(PeerGone)` once domain `peer` is known to be gone. `silence`
    /// says how long the peer has been silent; it is called only when that
    /// matters. Cheap when nothing happened: a look at the clock and, at
    /// most every 20 ms, a non-blocking look at the watch.
    pub fn check(&self, peer: DomId, silence: &dyn Fn() -> Duration) -> Result<()> {
        let mut st = match self.state.try_lock() {
            Ok(g) => g,
            // another link asks right now
            Err(TryLockError::WouldBlock) => return Ok(()),
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let now = Instant::now();
        let p = st.peers.entry(peer).or_default();
        match p.marker {
            Marker::Gone => return Err(gone(peer)),
            Marker::Absent => return Ok(()),
            Marker::Unknown | Marker::Seen => {}
        }
        if p.looked.is_some_and(|t| now.duration_since(t) < LOOK_EVERY) {
            return Ok(());
        }
        p.looked = Some(now);
        self.look_at_watch(&mut st, peer);
        let p = st.peers.entry(peer).or_default();
        let fired = p.read_at.is_none_or(|(_, seen)| p.events > seen);
        let due = fired
            || (p
                .read_at
                .is_none_or(|(t, _)| now.duration_since(t) >= ASK_EVERY)
                && silence() >= ASK_AFTER);
        if !due {
            return Ok(());
        }
        p.read_at = Some((now, p.events));
        let before = p.marker;
        let Ok(r) = request(&self.xenbus, xenstore::XS_READ, &[&marker_path(peer)]) else {
            return Ok(());
        };
        let p = st.peers.entry(peer).or_default();
        p.marker = read_verdict(before, &r);
        match p.marker {
            Marker::Gone => Err(gone(peer)),
            _ => Ok(()),
        }
    }

    /// Watches `peer`'s marker on first use; counts the events waiting.
    fn look_at_watch(&self, st: &mut State, peer: DomId) {
        if let Watch::NotOpen = st.watch {
            st.watch = match open_xenbus(&self.xenbus) {
                Ok(fd) => Watch::Open(fd),
                Err(_) => Watch::Failed,
            };
        }
        let Watch::Open(fd) = &st.watch else { return };
        let mut broken = false;
        let mut events: Vec<DomId> = Vec::new();
        let mut note = |p: &[u8], t: &[u8]| {
            if let Some(d) = std::str::from_utf8(t)
                .ok()
                .and_then(|t| t.strip_prefix("ivcom-"))
                .and_then(|d| d.parse::<DomId>().ok())
            {
                if p.starts_with(b"/local/domain/") {
                    events.push(d);
                }
            }
        };
        if !st.peers.get(&peer).is_some_and(|p| p.watched) {
            let path = marker_path(peer);
            match xenstore::request_fd(
                fd.as_fd(),
                xenstore::XS_WATCH,
                &[&path, &token(peer)],
                XS_TIMEOUT,
                &mut note,
            ) {
                Ok(_) => st.peers.entry(peer).or_default().watched = true,
                Err(_) => broken = true,
            }
        }
        if !broken {
            loop {
                match xenstore::try_read_message(fd.as_fd()) {
                    Ok(Some((h, payload))) if h.ty == xenstore::XS_WATCH_EVENT => {
                        if let Some((p, t)) = xenstore::parse_watch_event(&payload) {
                            note(p, t);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
        }
        for d in events {
            st.peers.entry(d).or_default().events += 1;
        }
        if broken {
            st.watch = Watch::Failed;
        }
    }
}

fn gone(peer: DomId) -> Error {
    Error::PeerGone(format!(
        "domain {peer} is gone (the toolstack removed its xenstore home: Xen destroyed it)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_verdicts() {
        let val = Reply::Value(b"3".to_vec());
        let enoent = Reply::Error("ENOENT".into());
        let eacces = Reply::Error("EACCES".into());
        assert_eq!(read_verdict(Marker::Unknown, &val), Marker::Seen);
        assert_eq!(read_verdict(Marker::Seen, &val), Marker::Seen);
        // gone only once it was seen: a peer without a marker is no verdict
        assert_eq!(read_verdict(Marker::Seen, &enoent), Marker::Gone);
        assert_eq!(read_verdict(Marker::Seen, &eacces), Marker::Gone);
        assert_eq!(read_verdict(Marker::Unknown, &enoent), Marker::Absent);
        assert_eq!(read_verdict(Marker::Unknown, &eacces), Marker::Absent);
        assert_eq!(marker_path(7), "/local/domain/7/data/ivcom");
        let e = gone(7).to_string();
        assert!(e.contains("domain 7 is gone"), "{e}");
    }

    /// Without a xenbus device nothing is known and nothing fails: the
    /// link's own timeout decides.
    #[test]
    fn no_xenbus_no_verdict() {
        let d = Domains::new(vec![PathBuf::from("/nonexistent/xenbus")], 1);
        assert!(d.publish().is_err());
        assert!(d.publish().is_ok(), "published once");
        for _ in 0..3 {
            d.check(5, &|| Duration::from_secs(10)).unwrap();
            std::thread::sleep(LOOK_EVERY);
        }
        assert_eq!(d.marker(5), Marker::Unknown);
    }
}
