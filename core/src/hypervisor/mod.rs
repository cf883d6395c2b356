//! What a ring needs from below: share pages with a peer domain, map a
//! peer's pages, and doorbells.
//!
//! Two backends implement [`Hypervisor`]:
//! - [`host`]: pages shared between processes of one kernel (processes,
//!   containers, VMs emulated as network namespaces). A directory stands for
//!   "the hypervisor of one physical host". The embedded default.
//! - [`xen`]: Xen grant tables and event channels through `/dev/xen`.
//!
//! The trait is deliberately narrow: a region of bytes shared by reference
//! (an opaque descriptor the peer can map), and a doorbell per side. The
//! ring and channel layers know nothing else about the backend.

pub mod host;
pub mod xen;

use crate::error::{Error, Result};
use std::fmt;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

/// Which backend shares the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BackendKind {
    /// Shared memory between processes of one kernel.
    Host = 1,
    /// Xen grant tables and event channels.
    Xen = 2,
}

impl BackendKind {
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(BackendKind::Host),
            2 => Some(BackendKind::Xen),
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Host => "host",
            BackendKind::Xen => "xen",
        })
    }
}

/// Which backend a node should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// `xen` when the Xen devices exist, `host` otherwise.
    #[default]
    Auto,
    /// Force the host backend.
    Host,
    /// Force the xen backend (fails where there is no Xen).
    Xen,
    /// No shared pages at all: every peer over TCP.
    None,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "host" => Ok(BackendChoice::Host),
            "xen" => Ok(BackendChoice::Xen),
            "none" | "tcp" => Ok(BackendChoice::None),
            _ => Err(Error::Invalid(format!(
                "backend '{s}' (expected auto, host, xen or none)"
            ))),
        }
    }
}

/// Memory shared with (or mapped from) a peer domain.
pub trait Region: Send + Sync {
    /// Start of the mapping, page aligned.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the mapping in bytes.
    fn len(&self) -> usize;
    /// True for an empty mapping (never for a live region).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The peer has proved that it mapped the region: drop whatever name
    /// still lets a third party find it.
    fn peer_attached(&self) {}
    /// Whether either side may give pages of the region back to the
    /// backend while both keep it mapped (`MADV_REMOVE`: they read as
    /// zeros until written again). Granted pages may not.
    fn gives_pages_back(&self) -> bool {
        false
    }
    /// Whether every page of the region exists from the start, so that
    /// its first write costs no page fault (Xen: gntalloc allocates a page
    /// when it is granted, and the grant device maps the peer's pages when
    /// the region is mapped). The host backend's pages come with their
    /// first write.
    fn pages_up_front(&self) -> bool {
        false
    }
    /// Whether both ends run on the CPUs of one kernel, so that a CPU
    /// number means the same on both sides (the host backend). A domain's
    /// virtual CPUs are its own.
    fn shares_cpus(&self) -> bool {
        false
    }
    /// The sharer's part of the peer's map, where the backend needs one
    /// (the host backend hands its memfd over a socket): serves the peer
    /// until `deadline`, or until `abort` (the handshake connection) is
    /// readable, which means the peer answered without mapping.
    fn serve(&self, deadline: std::time::Instant, abort: std::os::fd::RawFd) -> Result<()> {
        let _ = (deadline, abort);
        Ok(())
    }
    /// Offers a region made by [`Hypervisor::share_domain`] to one process
    /// of that domain: the descriptor it maps the region by
    /// ([`Region::serve`] then hands it over). One offer at a time: a new
    /// one replaces an offer nobody took.
    fn offer(&self) -> Result<Vec<u8>> {
        Err(Error::Backend(
            "this region was shared with one peer, not with a domain".into(),
        ))
    }
}

/// The two 32-bit words of a channel that a memory-based doorbell may use:
/// the one this side sleeps on and the one it bumps to wake the peer. Both
/// live in the control pages of the shared region.
#[derive(Clone, Copy)]
pub struct BellWords {
    /// Word this side waits on.
    pub wait: *const AtomicU32,
    /// Word this side bumps to wake the peer.
    pub ring: *const AtomicU32,
}

// SAFETY: the pointers refer to shared memory that the channel keeps mapped
// for as long as the doorbell lives; atomics on it are valid from any thread.
unsafe impl Send for BellWords {}
// SAFETY: as above.
unsafe impl Sync for BellWords {}

/// A doorbell: this side can sleep on it; the peer can ring it.
pub trait Doorbell: Send + Sync {
    /// Snapshot taken *before* the final "is there work?" check; pass it to
    /// [`Doorbell::wait`] so that a ring between the check and the wait is
    /// not lost.
    fn prepare(&self) -> u64;
    /// Sleeps until the peer rings (after `token` was taken) or `timeout`
    /// passes. Spurious returns are allowed.
    fn wait(&self, token: u64, timeout: Duration) -> Result<()>;
    /// Wakes the peer.
    fn notify(&self) -> Result<()>;
}

/// The doorbells of one receive queue, from [`Hypervisor::bell_group`]:
/// one per producer, all on one waiting point, so that the consumer,
/// waiting on any of them, wakes when any producer rings.
pub trait BellGroup: Send + Sync {
    /// Offers the doorbell of one more producer (as
    /// [`Hypervisor::bell_offer`] does for a pair).
    fn offer(&self, words: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)>;
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// This domain's id (Xen domid; for the host backend the network
    /// namespace, an emulated VM or container, whose processes share
    /// receive queues).
    fn domain_id(&self) -> u32;
    /// Identifies the physical host as far as the backend can tell; two
    /// domains with the same kind and host id are ring candidates.
    fn host_id(&self) -> [u8; 16];
    /// Shares `len` bytes (a multiple of the page size) with domain `peer`.
    /// Returns the local mapping and the descriptor the peer maps it by.
    fn share(&self, peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)>;
    /// Shares `len` bytes with every process of domain `peer` (a receive
    /// queue): the local mapping, which [`Region::offer`] offers to each
    /// process of that domain. Backends that cannot: an error.
    fn share_domain(&self, peer: u32, len: usize) -> Result<Box<dyn Region>> {
        let _ = (peer, len);
        Err(Error::Backend(format!(
            "the {} backend cannot share a region with a whole domain",
            self.kind()
        )))
    }
    /// Whether [`Hypervisor::share_domain`] works on this backend.
    fn shares_domains(&self) -> bool {
        false
    }
    /// The doorbells of a receive queue shared with domain `peer`, where a
    /// doorbell of [`Hypervisor::bell_offer`] would wake its consumer for
    /// its own producer only (Xen: an event channel per pair, one
    /// `/dev/xen/evtchn` file for the queue). `None` where each doorbell
    /// offered with the queue's [`BellWords`] already wakes the consumer
    /// for all (the host backend's futex words: the consumer sleeps on
    /// the queue's word).
    fn bell_group(&self, peer: u32) -> Result<Option<Box<dyn BellGroup>>> {
        let _ = peer;
        Ok(None)
    }
    /// Maps `len` bytes that domain `peer` shared under `desc`.
    fn map(&self, peer: u32, desc: &[u8], len: usize) -> Result<Box<dyn Region>>;
    /// Creates the offering side's doorbell; returns it and its descriptor.
    fn bell_offer(&self, peer: u32, words: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)>;
    /// Connects to the doorbell the peer offered under `desc`.
    fn bell_accept(&self, peer: u32, desc: &[u8], words: BellWords) -> Result<Box<dyn Doorbell>>;
    /// Human-readable location (directory, device), for messages.
    fn describe(&self) -> String;
    /// Largest region [`Hypervisor::share`] can provide (the channel shrinks
    /// its rings to fit).
    fn max_share(&self) -> usize {
        usize::MAX
    }
    /// What the backend knows about the domain `peer` on the other side of
    /// a ring it made: `Err(Error::PeerGone(..))`, saying what happened,
    /// once it knows that domain is gone (Xen: "domain 3 is gone"). Links
    /// ask between polls, never on the message path; `silence` tells, when
    /// called, how long the peer has been silent (nothing acknowledged on
    /// the link's control connection). Must be cheap when nothing happened.
    /// By default nothing is known: the link's own timeout decides.
    fn check_peer(&self, peer: u32, silence: &dyn Fn() -> Duration) -> Result<()> {
        let _ = (peer, silence);
        Ok(())
    }
}

/// Options of the backends.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Hypervisor directory of the host backend (default: `$IVCOM_HOST_DIR`
    /// or `/dev/shm/ivcom-<uid>`).
    pub host_dir: Option<std::path::PathBuf>,
    /// Bytes the host backend may share at once (`None`: no limit).
    pub share_limit: Option<usize>,
}

/// A backend that was opened, and a note for the user when `auto` had to
/// settle for less than it could have had.
pub struct Opened {
    /// The backend (`None` for [`BackendChoice::None`]).
    pub backend: Option<Arc<dyn Hypervisor>>,
    /// Why the preferred backend is not in use (to be shown once).
    pub note: Option<String>,
}

/// Opens the backend `choice` asks for. With [`BackendChoice::Auto`], `xen`
/// is chosen on a Xen guest whose grant and event-channel devices work. On
/// a Xen guest where they do not (a module missing, say), the note names
/// what is missing and the host backend is used: peers in other VMs have
/// another host identity and so talk over TCP, while ranks inside this VM
/// still share memory.
pub fn open(choice: BackendChoice, opts: &BackendOptions) -> Result<Opened> {
    let host = || -> Result<Option<Arc<dyn Hypervisor>>> {
        Ok(Some(Arc::new(host::HostBackend::open(opts)?)))
    };
    Ok(match choice {
        BackendChoice::None => Opened { backend: None, note: None },
        BackendChoice::Host => Opened { backend: host()?, note: None },
        BackendChoice::Xen => Opened {
            backend: Some(Arc::new(xen::XenBackend::open()?)),
            note: None,
        },
        BackendChoice::Auto if xen::is_xen_guest() => match xen::XenBackend::open() {
            Ok(x) => Opened { backend: Some(Arc::new(x)), note: None },
            Err(e) => Opened {
                backend: host()?,
                note: Some(format!(
                    "Xen guest without usable grant/event-channel devices ({e}): peers in other VMs use TCP"
                )),
            },
        },
        BackendChoice::Auto => Opened { backend: host()?, note: None },
    })
}

/// Maps `len` bytes of `fd` from `offset`, shared and read-write: how both
/// backends map what they share (a file, a grant device region). Not
/// populated: the host backend's pages come into being with their first
/// use (a ring that the consumer keeps up with touches only its first
/// pages; its first lap costs a page fault per 4 KiB on each side, once).
pub(crate) fn mmap_shared(
    fd: libc::c_int,
    len: usize,
    offset: libc::off_t,
) -> std::io::Result<*mut u8> {
    let flags = libc::MAP_SHARED;
    // SAFETY: a new mapping chosen by the kernel (no fixed address), of a
    // descriptor the caller owns; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// 16 random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into buf[got..].
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), N - got, 0) };
        if r > 0 {
            got += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    buf
}

/// A random 64-bit value.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}
