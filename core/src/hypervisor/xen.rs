//! The xen backend: Xen grant tables and event channels through the Linux
//! guest devices in `/dev/xen`.
//!
//! - [`Hypervisor::share`] allocates zeroed pages with `/dev/xen/gntalloc`
//!   (`IOCTL_GNTALLOC_ALLOC_GREF`, writable grants to the peer domain) and
//!   maps them at the returned offset. The descriptor is the list of grant
//!   references under a small versioned header ([`desc`]). Dropping the
//!   region unmaps it and removes the grants (`IOCTL_GNTALLOC_DEALLOC_GREF`);
//!   pages the peer still maps are freed by the kernel once it unmaps them.
//!   No unmap notification is set: the ring format has no liveness byte the
//!   backend could clear, and a vanished peer shows on the control
//!   connection.
//! - [`Hypervisor::map`] validates the peer's descriptor strictly (it is
//!   untrusted input), registers the references with `/dev/xen/gntdev`
//!   (`IOCTL_GNTDEV_MAP_GRANT_REF`) and maps them; drop unmaps and
//!   unregisters them (`IOCTL_GNTDEV_UNMAP_GRANT_REF`). It maps grants only
//!   of the domain the caller names (the authenticated peer's card), never
//!   a reference it already maps for another link (two links over the same
//!   pages would let one peer write into the other's ring), and at most
//!   [`MAX_PEER_PAGES`] pages of one peer domain at once ([`Grants`]).
//! - [`Hypervisor::share_domain`] grants a receive queue's pages once to
//!   the peer domain; [`Region::offer`] gives every process there the same
//!   references (each maps them through its own gntdev, and proves it by
//!   the queue's nonce).
//! - Doorbells are interdomain event channels, each on its own
//!   `/dev/xen/evtchn` file: the offerer allocates an unbound port for the
//!   peer, the acceptor binds to it; `notify` is `IOCTL_EVTCHN_NOTIFY`; `wait`
//!   polls the file, reads the fired port and writes it back to unmask it.
//!   A receive queue's doorbells ([`Hypervisor::bell_group`]) are one port
//!   per producer on one file: its consumer, waiting on the file, wakes when
//!   any producer rings, and rings each producer on its own port.
//!   An event is latched by the kernel until read, so a notification between
//!   [`Doorbell::prepare`] and [`Doorbell::wait`] is never lost. The
//!   memory-based [`BellWords`] are not used.
//! - The domain id is read from xenstore (key `domid`, relative to this
//!   domain's home) through `/dev/xen/xenbus` or `/proc/xen/xenbus`.
//! - Each side of a ring publishes a marker in its xenstore home and
//!   watches its peer's ([`alive`]); [`Hypervisor::check_peer`] reads the
//!   peer's marker when the watch fired or the peer fell silent: when Xen
//!   destroys a domain, the toolstack removes its home, and the link says
//!   "domain 3 is gone" instead of waiting for its timeout. The survivor's
//!   link then breaks and drops its regions, which unmaps the dead domain's
//!   grants (gntdev) and ends this domain's own.
//! - The host id is one constant for every Xen guest: a PV or HVM domU has
//!   no cheap, portable way to name its physical host (xenstore keeps
//!   nothing host-wide that guests may read, and the hypervisor version is
//!   the same on many hosts), so any two Xen guests are ring candidates and
//!   the mapping probe decides: grants made for another domain do not map
//!   and the nonce check catches anything else.
//!
//! Sizes: gntalloc limits the pages all its users in this domain may have
//! granted at once (module parameter `limit`, 1024 pages by default);
//! [`Hypervisor::max_share`] reports it so that the channel can shrink its
//! rings.

pub mod abi;
pub mod alive;
pub mod desc;
pub mod xenstore;

use super::{BackendKind, BellGroup, BellWords, Doorbell, Hypervisor, Region};
use crate::error::{Error, Result};
use abi::{DomId, EvtchnPort, GrantRef, XEN_PAGE_SIZE};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Pages of one peer domain this domain maps at most at once (128 MiB):
/// room for dozens of links' rings, and a bound on what one peer can make
/// us map.
pub const MAX_PEER_PAGES: usize = 1 << 15;

/// The grant references this domain maps, per peer domain.
#[derive(Default)]
pub struct Grants {
    by_peer: Mutex<HashMap<DomId, HashSet<GrantRef>>>,
    max_pages: usize,
}

impl Grants {
    /// A registry allowing `max_pages` pages per peer domain.
    pub fn new(max_pages: usize) -> Self {
        Grants {
            by_peer: Mutex::new(HashMap::new()),
            max_pages,
        }
    }

    /// Claims `refs` of domain `peer` for one mapping: refused when one of
    /// them is mapped already, or when the peer would pass its page bound.
    pub fn claim(&self, peer: DomId, refs: &[GrantRef]) -> Result<()> {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        let held = m.entry(peer).or_default();
        if let Some(r) = refs.iter().find(|r| held.contains(r)) {
            return Err(Error::Backend(format!(
                "grant reference {r} of domain {peer} is already mapped for another link"
            )));
        }
        if held.len() + refs.len() > self.max_pages {
            return Err(Error::Backend(format!(
                "domain {peer} asks this domain to map {} more pages while {} are mapped \
                 (at most {} per peer domain)",
                refs.len(),
                held.len(),
                self.max_pages
            )));
        }
        held.extend(refs.iter().copied());
        Ok(())
    }

    /// Gives back a mapping's references.
    pub fn release(&self, peer: DomId, refs: &[GrantRef]) {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = m.get_mut(&peer) {
            for r in refs {
                held.remove(r);
            }
            if held.is_empty() {
                m.remove(&peer);
            }
        }
    }
}

/// The host id every Xen guest reports (see the module documentation).
pub const XEN_HOST_ID: [u8; 16] = *b"ivcom:xen-guest\0";

/// gntalloc's default `limit` (pages), assumed when the parameter is not
/// readable.
pub const DEFAULT_GNTALLOC_LIMIT: usize = 1024;

/// How long reading the domain id from xenstore may take.
const XENSTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// A device the backend needs, and the module that provides it.
struct Device {
    path: &'static str,
    module: &'static str,
}

const GNTALLOC: Device = Device {
    path: "dev/xen/gntalloc",
    module: "xen-gntalloc",
};
const GNTDEV: Device = Device {
    path: "dev/xen/gntdev",
    module: "xen-gntdev",
};
const EVTCHN: Device = Device {
    path: "dev/xen/evtchn",
    module: "xen-evtchn",
};
const DEVICES: [&Device; 3] = [&GNTALLOC, &GNTDEV, &EVTCHN];
const XENBUS: [&str; 2] = ["dev/xen/xenbus", "proc/xen/xenbus"];
const GNTALLOC_LIMIT: &str = "sys/module/xen_gntalloc/parameters/limit";

/// Where the system files are (`/` but for tests).
#[derive(Debug, Clone)]
struct Root(PathBuf);

impl Root {
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// The kernel says it runs on Xen, devices or not.
    fn xen_platform(&self) -> bool {
        self.path("proc/xen/capabilities").exists()
            || std::fs::read_to_string(self.path("sys/hypervisor/type"))
                .is_ok_and(|t| t.trim() == "xen")
    }

    fn is_xen_guest(&self) -> bool {
        DEVICES.iter().all(|d| self.path(d.path).exists()) || self.xen_platform()
    }

    /// Names every missing piece, or `Ok` when all devices exist.
    fn check_devices(&self) -> Result<()> {
        let missing: Vec<&Device> = DEVICES
            .iter()
            .copied()
            .filter(|d| !self.path(d.path).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if missing.len() == DEVICES.len() && !self.xen_platform() {
            return Err(Error::Backend(format!(
                "not a Xen guest: {}, {} and {} are missing and {} does not say xen",
                self.path(GNTALLOC.path).display(),
                self.path(GNTDEV.path).display(),
                self.path(EVTCHN.path).display(),
                self.path("sys/hypervisor/type").display()
            )));
        }
        let why: Vec<String> = missing
            .iter()
            .map(|d| {
                format!(
                    "{m} kernel module not loaded: {p} missing (modprobe {m})",
                    m = d.module,
                    p = self.path(d.path).display()
                )
            })
            .collect();
        Err(Error::Backend(why.join("; ")))
    }

    fn gntalloc_limit(&self) -> usize {
        std::fs::read_to_string(self.path(GNTALLOC_LIMIT))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map_or(DEFAULT_GNTALLOC_LIMIT, |n| {
                n.clamp(0, i64::from(u32::MAX)) as usize
            })
    }

    /// This domain's id, from xenstore.
    fn read_domid(&self) -> Result<DomId> {
        let mut errors = Vec::new();
        for rel in XENBUS {
            let p = self.path(rel);
            if !p.exists() {
                continue;
            }
            let r = open_dev(&p, libc::O_NONBLOCK).and_then(|fd| {
                let v = xenstore::read_fd(fd.as_fd(), "domid", XENSTORE_TIMEOUT)?;
                xenstore::parse_domid(&v)
            });
            match r {
                Ok(d) => return Ok(d),
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            }
        }
        if errors.is_empty() {
            errors.push(format!(
                "neither {} nor {} exists (is xenfs mounted?)",
                self.path(XENBUS[0]).display(),
                self.path(XENBUS[1]).display()
            ));
        }
        Err(Error::Backend(format!(
            "cannot read this domain's id from xenstore: {}",
            errors.join("; ")
        )))
    }
}

/// True when this kernel runs under Xen: the grant and event-channel
/// devices all exist, or `/proc/xen/capabilities` exists, or
/// `/sys/hypervisor/type` says `xen`. [`XenBackend::open`] then either works
/// or names what is missing.
pub fn is_xen_guest() -> bool {
    Root(PathBuf::from("/")).is_xen_guest()
}

/// Opens a device read-write, close-on-exec, with extra `flags`.
fn open_dev(path: &Path, flags: libc::c_int) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {}", path.display())))?;
    // SAFETY: open on a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | flags) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EACCES) {
            " (needs root or access to the Xen devices)"
        } else {
            ""
        };
        return Err(Error::Backend(format!(
            "open {}: {e}{hint}",
            path.display()
        )));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An ioctl whose argument is `arg`; returns the non-negative result.
///
/// # Safety
/// `req` must be an ioctl of the device behind `fd` whose argument is a
/// pointer to a buffer laid out as the kernel expects, valid for reads and
/// writes of everything the kernel accesses, which `arg` must be.
unsafe fn ioctl_raw(
    fd: &OwnedFd,
    req: u32,
    arg: *mut libc::c_void,
) -> std::io::Result<libc::c_int> {
    loop {
        // SAFETY: per the caller's contract.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
        if r >= 0 {
            return Ok(r);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// [`ioctl_raw`] with the error as a backend error saying `what` failed.
///
/// # Safety
/// As for [`ioctl_raw`].
unsafe fn ioctl(fd: &OwnedFd, req: u32, arg: *mut libc::c_void, what: &str) -> Result<libc::c_int> {
    // SAFETY: per the caller's contract.
    unsafe { ioctl_raw(fd, req, arg) }.map_err(|e| Error::Backend(format!("{what}: {e}")))
}

/// Validates a peer's domain id.
fn domid(peer: u32) -> Result<DomId> {
    if peer >= abi::DOMID_FIRST_RESERVED {
        return Err(Error::Backend(format!("{peer} is not a Xen domain id")));
    }
    Ok(peer as DomId)
}

/// A buffer of at least `bytes` bytes, aligned for the ioctl structs (all
/// of which need at most 8-byte alignment).
fn ioctl_buf(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8)]
}

/// Maps `len` bytes of a grant device at `index`, shared and writable.
fn mmap_dev(fd: &OwnedFd, len: usize, index: u64, what: &str) -> Result<*mut u8> {
    let off = libc::off_t::try_from(index)
        .map_err(|_| Error::Backend(format!("{what}: offset {index:#x} out of range")))?;
    // The grant devices map their pages at mmap time already.
    super::mmap_shared(fd.as_raw_fd(), len, off)
        .map_err(|e| Error::Backend(format!("{what}: mmap: {e}")))
}

/// Allocates `count` pages granted (writable) to `peer`: the mmap offset
/// and the references.
fn gntalloc_alloc(fd: &OwnedFd, peer: DomId, count: usize) -> Result<(u64, Vec<GrantRef>)> {
    use abi::GntallocAllocGref as A;
    let refs_at = std::mem::offset_of!(A, gref_ids);
    let bytes = (refs_at + count * 4).max(std::mem::size_of::<A>());
    let mut buf = ioctl_buf(bytes);
    let p = buf.as_mut_ptr().cast::<A>();
    let head = A {
        domid: peer,
        flags: abi::GNTALLOC_FLAG_WRITABLE,
        count: count as u32,
        index: 0,
        gref_ids: [0],
    };
    // SAFETY: buf is 8-byte aligned and at least size_of::<A>() bytes long;
    // the kernel reads the fixed part and writes `index` and `count`
    // references, all within `bytes`.
    unsafe {
        p.write(head);
        ioctl_raw(fd, abi::IOCTL_GNTALLOC_ALLOC_GREF, p.cast()).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
                " (gntalloc's page limit for this domain is used up: \
                 /sys/module/xen_gntalloc/parameters/limit)"
            } else {
                ""
            };
            Error::Backend(format!(
                "gntalloc: grant {count} pages to domain {peer}: {e}{hint}"
            ))
        })?;
        let index = std::ptr::addr_of!((*p).index).read();
        let first = std::ptr::addr_of!((*p).gref_ids).cast::<u32>();
        let refs = (0..count).map(|i| first.add(i).read()).collect();
        Ok((index, refs))
    }
}

fn gntalloc_dealloc(fd: &OwnedFd, index: u64, count: usize) {
    let mut op = abi::GntallocDeallocGref {
        index,
        count: count as u32,
    };
    // SAFETY: the fixed-size argument of IOCTL_GNTALLOC_DEALLOC_GREF.
    let _ = unsafe {
        ioctl(
            fd,
            abi::IOCTL_GNTALLOC_DEALLOC_GREF,
            std::ptr::addr_of_mut!(op).cast(),
            "gntalloc dealloc",
        )
    };
}

/// Registers the grants `refs` of domain `peer`; returns the mmap offset.
fn gntdev_map(fd: &OwnedFd, peer: DomId, refs: &[GrantRef]) -> Result<u64> {
    use abi::GntdevGrantRef as G;
    use abi::GntdevMapGrantRef as M;
    let refs_at = std::mem::offset_of!(M, refs);
    let bytes = (refs_at + refs.len() * std::mem::size_of::<G>()).max(std::mem::size_of::<M>());
    let mut buf = ioctl_buf(bytes);
    let p = buf.as_mut_ptr().cast::<M>();
    // SAFETY: buf is 8-byte aligned and `bytes` long: the fixed part plus
    // refs.len() entries; the kernel reads those and writes `index`.
    unsafe {
        p.write(M {
            count: refs.len() as u32,
            pad: 0,
            index: 0,
            refs: [G::default()],
        });
        let first = std::ptr::addr_of_mut!((*p).refs).cast::<G>();
        for (i, &r) in refs.iter().enumerate() {
            first.add(i).write(G {
                domid: u32::from(peer),
                r#ref: r,
            });
        }
        ioctl(
            fd,
            abi::IOCTL_GNTDEV_MAP_GRANT_REF,
            p.cast(),
            &format!("gntdev: register {} grants of domain {peer}", refs.len()),
        )?;
        Ok(std::ptr::addr_of!((*p).index).read())
    }
}

fn gntdev_unmap(fd: &OwnedFd, index: u64, count: usize) {
    let mut op = abi::GntdevUnmapGrantRef {
        index,
        count: count as u32,
        pad: 0,
    };
    // SAFETY: the fixed-size argument of IOCTL_GNTDEV_UNMAP_GRANT_REF.
    let _ = unsafe {
        ioctl(
            fd,
            abi::IOCTL_GNTDEV_UNMAP_GRANT_REF,
            std::ptr::addr_of_mut!(op).cast(),
            "gntdev unmap",
        )
    };
}

/// The xen backend.
pub struct XenBackend {
    domid: DomId,
    root: Root,
    gntalloc: Arc<OwnedFd>,
    gntdev: Arc<OwnedFd>,
    grants: Arc<Grants>,
    domains: alive::Domains,
}

impl XenBackend {
    /// Opens the grant devices, checks the event-channel device and reads
    /// this domain's id from xenstore. The error names what is missing
    /// (device, kernel module, permission, xenstore).
    pub fn open() -> Result<Self> {
        Self::open_root(Root(PathBuf::from("/")))
    }

    fn open_root(root: Root) -> Result<Self> {
        root.check_devices()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page != XEN_PAGE_SIZE as libc::c_long {
            return Err(Error::Backend(format!(
                "the xen backend needs {XEN_PAGE_SIZE}-byte pages, this kernel uses {page}"
            )));
        }
        let gntalloc = open_dev(&root.path(GNTALLOC.path), 0)?;
        let gntdev = open_dev(&root.path(GNTDEV.path), 0)?;
        drop(open_dev(&root.path(EVTCHN.path), 0)?);
        let domid = root.read_domid()?;
        let xenbus = XENBUS.iter().map(|rel| root.path(rel)).collect();
        Ok(XenBackend {
            domid,
            domains: alive::Domains::new(xenbus, domid),
            root,
            gntalloc: Arc::new(gntalloc),
            gntdev: Arc::new(gntdev),
            grants: Arc::new(Grants::new(MAX_PEER_PAGES)),
        })
    }
}

/// Which device a region came from.
enum Origin {
    /// Pages this domain granted (gntalloc).
    Granted,
    /// A peer's pages mapped here (gntdev), with their claim in the registry.
    Mapped {
        grants: Arc<Grants>,
        peer: DomId,
        refs: Vec<GrantRef>,
    },
}

/// A region of the xen backend.
pub struct XenRegion {
    ptr: *mut u8,
    len: usize,
    fd: Arc<OwnedFd>,
    index: u64,
    pages: usize,
    origin: Origin,
    /// The descriptor of a region shared with a whole domain (a receive
    /// queue), which [`Region::offer`] gives to each process there.
    offer: Option<Vec<u8>>,
}

// SAFETY: the mapping is process-wide and stays valid until drop; the fd is
// only used for ioctls, which the kernel serialises.
unsafe impl Send for XenRegion {}
// SAFETY: as above; the region has no interior mutability of its own.
unsafe impl Sync for XenRegion {}

impl Region for XenRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    /// Nothing to do: a grant names one peer domain, no third domain can map
    /// it, and the grant must stay while the peer maps the pages.
    fn peer_attached(&self) {}
    /// Granted pages are allocated when granted (this side) and mapped
    /// whole when the region is mapped (the peer's).
    fn pages_up_front(&self) -> bool {
        true
    }
    /// The same references for every process of the domain: the grant
    /// names the domain, and each process proves its map by the nonce.
    fn offer(&self) -> Result<Vec<u8>> {
        self.offer.clone().ok_or_else(|| {
            Error::Backend("this region was shared with one peer, not with a domain".into())
        })
    }
}

impl Drop for XenRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len is the mapping made in share/map, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        match &self.origin {
            Origin::Granted => gntalloc_dealloc(&self.fd, self.index, self.pages),
            Origin::Mapped { grants, peer, refs } => {
                gntdev_unmap(&self.fd, self.index, self.pages);
                grants.release(*peer, refs);
            }
        }
    }
}

impl Hypervisor for XenBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Xen
    }

    fn domain_id(&self) -> u32 {
        u32::from(self.domid)
    }

    fn host_id(&self) -> [u8; 16] {
        XEN_HOST_ID
    }

    fn share(&self, peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
        let peer = domid(peer)?;
        let (region, refs) = self.grant(peer, len)?;
        Ok((
            Box::new(region),
            desc::encode_grants(self.domid, peer, &refs),
        ))
    }

    /// A receive queue's pages are granted once to the peer domain; every
    /// process there maps the same references (gntdev maps a grant as
    /// often as it is asked to; each process maps a queue once).
    fn share_domain(&self, peer: u32, len: usize) -> Result<Box<dyn Region>> {
        let peer = domid(peer)?;
        let (mut region, refs) = self.grant(peer, len)?;
        region.offer = Some(desc::encode_grants(self.domid, peer, &refs));
        Ok(Box::new(region))
    }

    fn shares_domains(&self) -> bool {
        true
    }

    fn map(&self, peer: u32, d: &[u8], len: usize) -> Result<Box<dyn Region>> {
        let peer = domid(peer)?;
        let refs = desc::parse_grants(d, peer, self.domid, len)?;
        let _ = self.domains.publish();
        let pages = refs.len();
        self.grants.claim(peer, &refs)?;
        let index = match gntdev_map(&self.gntdev, peer, &refs) {
            Ok(i) => i,
            Err(e) => {
                self.grants.release(peer, &refs);
                return Err(e);
            }
        };
        let ptr = match mmap_dev(
            &self.gntdev,
            len,
            index,
            &format!("gntdev: map {pages} grants of domain {peer}"),
        ) {
            Ok(p) => p,
            Err(e) => {
                gntdev_unmap(&self.gntdev, index, pages);
                self.grants.release(peer, &refs);
                return Err(e);
            }
        };
        Ok(Box::new(XenRegion {
            ptr,
            len,
            fd: Arc::clone(&self.gntdev),
            index,
            pages,
            origin: Origin::Mapped {
                grants: Arc::clone(&self.grants),
                peer,
                refs,
            },
            offer: None,
        }))
    }

    /// A pair's doorbell: the one doorbell of a group on a file of its own.
    fn bell_offer(&self, peer: u32, words: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
        self.evtchn_group(peer)?.offer(words)
    }

    fn bell_group(&self, peer: u32) -> Result<Option<Box<dyn BellGroup>>> {
        Ok(Some(Box::new(self.evtchn_group(peer)?)))
    }

    fn bell_accept(&self, peer: u32, d: &[u8], _words: BellWords) -> Result<Box<dyn Doorbell>> {
        let peer = domid(peer)?;
        let remote = desc::parse_bell(d, peer, self.domid)?;
        let file = self.evtchn_file()?;
        let mut op = abi::EvtchnBindInterdomain {
            remote_domain: libc::c_uint::from(peer),
            remote_port: remote,
        };
        let port = file.bind(
            abi::IOCTL_EVTCHN_BIND_INTERDOMAIN,
            &mut op,
            &format!("evtchn: bind to port {remote} of domain {peer}"),
        )?;
        Ok(Box::new(EvtchnBell { file, port }))
    }

    fn describe(&self) -> String {
        format!("xen:domain {}", self.domid)
    }

    fn max_share(&self) -> usize {
        self.root.gntalloc_limit().min(desc::MAX_PAGES) * XEN_PAGE_SIZE
    }

    fn check_peer(&self, peer: u32, silence: &dyn Fn() -> Duration) -> Result<()> {
        // dom0 goes only with the whole host; ids that are no domain were
        // refused when the ring was made.
        match domid(peer) {
            Ok(p) if p != 0 && p != self.domid => self.domains.check(p, silence),
            _ => Ok(()),
        }
    }
}

impl XenBackend {
    /// Grants `len` bytes of new pages to `peer` and maps them here.
    fn grant(&self, peer: DomId, len: usize) -> Result<(XenRegion, Vec<GrantRef>)> {
        let pages = desc::pages_for(len)?;
        let limit = self.root.gntalloc_limit();
        if pages > limit {
            return Err(Error::Backend(format!(
                "{pages} pages exceed gntalloc's limit of {limit} \
                 (/sys/module/xen_gntalloc/parameters/limit)"
            )));
        }
        // (once: the marker the peer watches; harmless when it fails)
        let _ = self.domains.publish();
        let (index, refs) = gntalloc_alloc(&self.gntalloc, peer, pages)?;
        let ptr = match mmap_dev(
            &self.gntalloc,
            len,
            index,
            &format!("gntalloc: {pages} pages for domain {peer}"),
        ) {
            Ok(p) => p,
            Err(e) => {
                gntalloc_dealloc(&self.gntalloc, index, pages);
                return Err(e);
            }
        };
        let region = XenRegion {
            ptr,
            len,
            fd: Arc::clone(&self.gntalloc),
            index,
            pages,
            origin: Origin::Granted,
            offer: None,
        };
        Ok((region, refs))
    }

    /// A `/dev/xen/evtchn` file for new doorbells.
    fn evtchn_file(&self) -> Result<Arc<EvtchnFile>> {
        let fd = open_dev(&self.root.path(EVTCHN.path), libc::O_NONBLOCK)?;
        Ok(Arc::new(EvtchnFile::new(fd)))
    }

    /// Doorbells for domain `peer` to bind to, on a new file.
    fn evtchn_group(&self, peer: u32) -> Result<EvtchnGroup> {
        let peer = domid(peer)?;
        Ok(EvtchnGroup {
            file: self.evtchn_file()?,
            domid: self.domid,
            peer,
        })
    }

    /// Publishes this domain's marker (see [`alive`]; for tools and tests:
    /// rings do it themselves).
    pub fn publish_marker(&self) -> Result<()> {
        self.domains.publish()
    }

    /// Asks about domain `peer` as a link whose peer has been silent for
    /// `silence` would; returns what is known of its marker (for tools and
    /// tests).
    pub fn ask_about(&self, peer: u32, silence: Duration) -> (Result<()>, alive::Marker) {
        let r = self.check_peer(peer, &|| silence);
        (r, self.domains.marker(domid(peer).unwrap_or(0)))
    }

    /// This domain's xenbus device (for tools).
    pub fn xenbus_paths(&self) -> Vec<PathBuf> {
        XENBUS.iter().map(|rel| self.root.path(rel)).collect()
    }
}

/// A `/dev/xen/evtchn` file (opened non-blocking) and the ports bound on
/// it: one for a pair's doorbell, one per producer for a receive queue's
/// ([`EvtchnGroup`]). Whoever waits on the file wakes when any of its
/// ports fires.
struct EvtchnFile {
    fd: OwnedFd,
    /// The ports bound on this file: only they are counted and unmasked.
    ports: Mutex<Vec<EvtchnPort>>,
    /// Times events were consumed by a wait: the doorbells' token.
    seen: AtomicU64,
}

impl EvtchnFile {
    fn new(fd: OwnedFd) -> Self {
        EvtchnFile {
            fd,
            ports: Mutex::new(Vec::new()),
            seen: AtomicU64::new(0),
        }
    }

    fn ports(&self) -> std::sync::MutexGuard<'_, Vec<EvtchnPort>> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a bind ioctl (`req`, argument `op`) on the file: the new port,
    /// counted from now.
    fn bind<T>(&self, req: u32, op: &mut T, what: &str) -> Result<EvtchnPort> {
        // SAFETY: the callers pass the fixed-size argument `req` takes.
        let port = unsafe { ioctl(&self.fd, req, (op as *mut T).cast(), what)? } as EvtchnPort;
        self.ports().push(port);
        Ok(port)
    }

    /// Allocates a port for `peer` to bind to.
    fn bind_unbound(&self, peer: DomId) -> Result<EvtchnPort> {
        let mut op = abi::EvtchnBindUnboundPort {
            remote_domain: libc::c_uint::from(peer),
        };
        self.bind(
            abi::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            &mut op,
            &format!("evtchn: allocate a port for domain {peer}"),
        )
    }

    /// Re-enables delivery of `port` after it fired.
    fn unmask(&self, port: EvtchnPort) -> Result<()> {
        let b = port.to_ne_bytes();
        // SAFETY: writes 4 bytes from a local array.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if r != b.len() as isize {
            return Err(Error::Backend(format!(
                "evtchn: unmask port {port}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Takes the fired ports out of the file and unmasks those bound on
    /// it; true if there was one.
    fn drain(&self) -> Result<bool> {
        let mut fired: Vec<EvtchnPort> = Vec::new();
        let done = loop {
            let mut ports = [0u32; 16];
            // SAFETY: reads into a local array of the given size.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    ports.as_mut_ptr().cast(),
                    std::mem::size_of_val(&ports),
                )
            };
            if r > 0 {
                let n = (r as usize / 4).min(ports.len());
                let ours = self.ports();
                for p in &ports[..n] {
                    if ours.contains(p) && !fired.contains(p) {
                        fired.push(*p);
                    }
                }
                continue;
            }
            if r == 0 {
                break Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => break Ok(()),
                Some(libc::EFBIG) => {
                    // The kernel's pending buffer overflowed: reset it, treat
                    // it as a notification, and unmask every port of the
                    // file (which fired is lost; unmasking one that did
                    // not is harmless). Since Linux 4.5 the driver sizes
                    // that buffer to the ports bound on the file, and a
                    // port enters it once until it is unmasked, which this
                    // file does only after draining: it cannot overflow
                    // there (so this path is not exercised by the tests);
                    // kept for older kernels.
                    // SAFETY: IOCTL_EVTCHN_RESET takes no argument.
                    unsafe {
                        ioctl(
                            &self.fd,
                            abi::IOCTL_EVTCHN_RESET,
                            std::ptr::null_mut(),
                            "evtchn reset",
                        )?
                    };
                    fired = self.ports().clone();
                    break Ok(());
                }
                _ => break Err(Error::Backend(format!("evtchn: read: {e}"))),
            }
        };
        // Unmasked even when the read failed after them: a masked port
        // would never wake the file again.
        for p in &fired {
            self.unmask(*p)?;
        }
        done.map(|()| !fired.is_empty())
    }

    fn wait(&self, token: u64, timeout: Duration) -> Result<()> {
        if self.seen.load(Ordering::Acquire) != token {
            // Another waiter consumed a notification after `token`.
            return Ok(());
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd and timespec for the duration of the call.
        let r = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::Backend(format!("evtchn: poll: {e}")));
        }
        if r == 0 {
            return Ok(());
        }
        if p.revents & libc::POLLNVAL != 0 {
            return Err(Error::Backend("evtchn: file descriptor invalid".into()));
        }
        if self.drain()? {
            self.seen.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn notify(&self, port: EvtchnPort) -> Result<()> {
        let mut op = abi::EvtchnNotify { port };
        // SAFETY: the fixed-size argument of IOCTL_EVTCHN_NOTIFY.
        unsafe {
            ioctl(
                &self.fd,
                abi::IOCTL_EVTCHN_NOTIFY,
                std::ptr::addr_of_mut!(op).cast(),
                "evtchn: notify",
            )?
        };
        Ok(())
    }

    fn unbind(&self, port: EvtchnPort) {
        self.ports().retain(|p| *p != port);
        let mut op = abi::EvtchnUnbind { port };
        // SAFETY: the fixed-size argument of IOCTL_EVTCHN_UNBIND; closing the
        // file would unbind too.
        let _ = unsafe {
            ioctl(
                &self.fd,
                abi::IOCTL_EVTCHN_UNBIND,
                std::ptr::addr_of_mut!(op).cast(),
                "evtchn: unbind",
            )
        };
    }
}

/// A doorbell made of one interdomain event channel: a port on a
/// `/dev/xen/evtchn` file of its own, or on the file of a receive queue's
/// [`EvtchnGroup`], where waiting on one doorbell wakes for any of them.
pub struct EvtchnBell {
    file: Arc<EvtchnFile>,
    port: EvtchnPort,
}

impl EvtchnBell {
    /// A doorbell on a file of its own, bound to `port` (the tests' stand-in
    /// for the device).
    #[cfg(test)]
    fn new(fd: OwnedFd, port: EvtchnPort) -> Self {
        let file = EvtchnFile::new(fd);
        file.ports().push(port);
        EvtchnBell {
            file: Arc::new(file),
            port,
        }
    }

    /// The local port.
    pub fn port(&self) -> EvtchnPort {
        self.port
    }
}

impl Doorbell for EvtchnBell {
    fn prepare(&self) -> u64 {
        self.file.seen.load(Ordering::Acquire)
    }

    fn wait(&self, token: u64, timeout: Duration) -> Result<()> {
        self.file.wait(token, timeout)
    }

    fn notify(&self) -> Result<()> {
        self.file.notify(self.port)
    }
}

impl Drop for EvtchnBell {
    fn drop(&mut self) {
        self.file.unbind(self.port);
    }
}

/// The doorbells of a receive queue: one unbound port per producer, all on
/// one `/dev/xen/evtchn` file, so that the consumer waiting on any of them
/// wakes when any producer rings.
pub struct EvtchnGroup {
    file: Arc<EvtchnFile>,
    domid: DomId,
    peer: DomId,
}

impl BellGroup for EvtchnGroup {
    fn offer(&self, _words: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
        let port = self.file.bind_unbound(self.peer)?;
        let bell = EvtchnBell {
            file: Arc::clone(&self.file),
            port,
        };
        Ok((
            Box::new(bell),
            desc::encode_bell(self.domid, self.peer, port),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    fn backend_err(r: Result<XenBackend>) -> String {
        match r {
            Err(Error::Backend(s)) => s,
            Err(e) => panic!("expected a backend error, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    /// A fake system root with the given files.
    fn fake_root(name: &str, files: &[(&str, &str)]) -> Root {
        let dir = std::env::temp_dir().join(format!(
            "ivcom-xen-{name}-{}-{}",
            std::process::id(),
            crate::hypervisor::random_u64()
        ));
        for (rel, content) in files {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }

    fn no_xen_here() -> bool {
        !Path::new("/dev/xen").exists()
            && !Path::new("/proc/xen").exists()
            && std::fs::read_to_string("/sys/hypervisor/type").map_or(true, |t| t.trim() != "xen")
    }

    #[test]
    fn not_a_xen_guest_here() {
        if !no_xen_here() {
            eprintln!("skipped: this machine runs under Xen");
            return;
        }
        assert!(!is_xen_guest());
        let e = backend_err(XenBackend::open());
        assert!(e.contains("not a Xen guest"), "{e}");
        assert!(e.contains("/dev/xen/gntalloc"), "{e}");
    }

    #[test]
    fn missing_modules_are_named() {
        let r = fake_root(
            "nomods",
            &[("sys/hypervisor/type", "xen\n"), ("dev/xen/evtchn", "")],
        );
        assert!(r.is_xen_guest());
        let e = backend_err(XenBackend::open_root(r.clone()));
        assert!(
            e.contains("xen-gntalloc kernel module not loaded:")
                && e.contains("dev/xen/gntalloc missing (modprobe xen-gntalloc)"),
            "{e}"
        );
        assert!(e.contains("modprobe xen-gntdev"), "{e}");
        assert!(!e.contains("xen-evtchn"), "{e}");
        std::fs::remove_dir_all(&r.0).unwrap();

        let r = fake_root(
            "caps",
            &[("proc/xen/capabilities", ""), ("dev/xen/gntdev", "")],
        );
        assert!(r.is_xen_guest());
        let e = backend_err(XenBackend::open_root(r.clone()));
        assert!(
            e.contains("modprobe xen-gntalloc") && e.contains("modprobe xen-evtchn"),
            "{e}"
        );
        assert!(!e.contains("xen-gntdev"), "{e}");
        std::fs::remove_dir_all(&r.0).unwrap();

        let r = fake_root("plain", &[("sys/hypervisor/type", "kvm\n")]);
        assert!(!r.is_xen_guest());
        assert!(backend_err(XenBackend::open_root(r.clone())).contains("not a Xen guest"));
        std::fs::remove_dir_all(&r.0).unwrap();
    }

    #[test]
    fn devices_present_but_no_xenstore() {
        let r = fake_root(
            "noxs",
            &[
                ("dev/xen/gntalloc", ""),
                ("dev/xen/gntdev", ""),
                ("dev/xen/evtchn", ""),
            ],
        );
        assert!(r.is_xen_guest());
        let e = backend_err(XenBackend::open_root(r.clone()));
        assert!(
            e.contains("cannot read this domain's id from xenstore"),
            "{e}"
        );
        assert!(e.contains("xenfs"), "{e}");
        std::fs::remove_dir_all(&r.0).unwrap();
    }

    #[test]
    fn gntalloc_limit_parameter() {
        let r = fake_root("nolimit", &[]);
        assert_eq!(r.gntalloc_limit(), DEFAULT_GNTALLOC_LIMIT);
        std::fs::remove_dir_all(&r.0).unwrap();
        let r = fake_root("limit", &[(GNTALLOC_LIMIT, "4096\n")]);
        assert_eq!(r.gntalloc_limit(), 4096);
        std::fs::remove_dir_all(&r.0).unwrap();
        let r = fake_root("neglimit", &[(GNTALLOC_LIMIT, "-5\n")]);
        assert_eq!(r.gntalloc_limit(), 0);
        std::fs::remove_dir_all(&r.0).unwrap();
    }

    #[test]
    fn peer_domids_are_checked() {
        assert_eq!(domid(0).unwrap(), 0);
        assert_eq!(domid(0x7FEF).unwrap(), 0x7FEF);
        assert!(domid(0x7FF0).is_err());
        assert!(domid(u32::MAX).is_err());
        assert!(domid(std::process::id().max(0x10000)).is_err());
    }

    #[test]
    fn a_grant_reference_maps_once_and_a_peer_is_bounded() {
        let g = Grants::new(8);
        g.claim(3, &[10, 11, 12]).unwrap();
        // the same reference of the same domain for a second link: refused
        let e = g.claim(3, &[12, 13]).unwrap_err().to_string();
        assert!(
            e.contains("grant reference 12 of domain 3 is already mapped"),
            "{e}"
        );
        // another domain's reference 12 is another page
        g.claim(4, &[12]).unwrap();
        // the bound counts every page of one peer
        let e = g
            .claim(3, &[20, 21, 22, 23, 24, 25])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 8 per peer domain"), "{e}");
        g.claim(3, &[20, 21, 22, 23, 24]).unwrap();
        g.release(3, &[10, 11, 12]);
        g.claim(3, &[12, 30, 31]).unwrap();
    }

    #[test]
    fn host_id_is_one_constant() {
        assert_eq!(XEN_HOST_ID.len(), 16);
        assert_ne!(XEN_HOST_ID, [0; 16]);
    }

    /// The wait/unmask protocol against a stand-in for /dev/xen/evtchn: the
    /// "kernel" end writes fired ports and reads the unmask writes.
    fn fake_bell(port: EvtchnPort) -> (EvtchnBell, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (EvtchnBell::new(OwnedFd::from(a), port), b)
    }

    #[test]
    fn wait_times_out_without_an_event() {
        let (bell, _kernel) = fake_bell(5);
        let t = bell.prepare();
        let start = Instant::now();
        bell.wait(t, Duration::from_millis(30)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert_eq!(bell.prepare(), t);
    }

    #[test]
    fn event_before_wait_is_latched_and_unmasked() {
        let (bell, mut kernel) = fake_bell(5);
        let t = bell.prepare();
        // The peer notifies between prepare and wait.
        kernel.write_all(&5u32.to_ne_bytes()).unwrap();
        let start = Instant::now();
        bell.wait(t, Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_ne!(bell.prepare(), t);
        // The port was written back to unmask it.
        let mut b = [0u8; 4];
        kernel.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 5);
        // A stale token returns at once.
        bell.wait(t, Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn event_during_wait_wakes() {
        let (bell, mut kernel) = fake_bell(9);
        let t = bell.prepare();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            kernel.write_all(&9u32.to_ne_bytes()).unwrap();
            kernel
        });
        let start = Instant::now();
        bell.wait(t, Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        let mut kernel = waker.join().unwrap();
        let mut b = [0u8; 4];
        kernel.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 9);
    }

    /// A receive queue's doorbells: ports 5 and 7 on one file.
    #[test]
    fn a_groups_doorbells_wake_for_any_of_its_ports() {
        let (a, mut kernel) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let file = Arc::new(EvtchnFile::new(OwnedFd::from(a)));
        file.ports().extend([5, 7]);
        let five = EvtchnBell {
            file: Arc::clone(&file),
            port: 5,
        };
        let seven = EvtchnBell {
            file: Arc::clone(&file),
            port: 7,
        };
        // Port 7 fires (and a port of no doorbell here): waiting on 5's
        // doorbell wakes, and only 7 is unmasked.
        let t = five.prepare();
        for p in [7u32, 3, 7] {
            kernel.write_all(&p.to_ne_bytes()).unwrap();
        }
        let start = Instant::now();
        five.wait(t, Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_ne!(five.prepare(), t);
        assert_eq!(seven.prepare(), five.prepare());
        kernel.set_nonblocking(true).unwrap();
        let mut b = [0u8; 8];
        let n = kernel.read(&mut b).unwrap();
        assert_eq!(n, 4, "one unmask for port 7, none for port 3");
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()), 7);
        // A doorbell that goes leaves the group: its port is no longer
        // counted, the other's still is.
        drop(seven);
        let t = five.prepare();
        kernel.write_all(&7u32.to_ne_bytes()).unwrap();
        five.wait(t, Duration::from_millis(200)).unwrap();
        assert_eq!(five.prepare(), t);
        kernel.write_all(&5u32.to_ne_bytes()).unwrap();
        five.wait(t, Duration::from_secs(10)).unwrap();
        assert_ne!(five.prepare(), t);
    }

    #[test]
    fn foreign_port_is_not_counted() {
        let (bell, mut kernel) = fake_bell(9);
        let t = bell.prepare();
        kernel.write_all(&3u32.to_ne_bytes()).unwrap();
        bell.wait(t, Duration::from_secs(1)).unwrap();
        assert_eq!(bell.prepare(), t);
    }
}
