//! The host backend: pages shared between processes of one kernel.
//!
//! A directory (the *hypervisor directory*, default `/dev/shm/ivcom-<uid>`,
//! or `$IVCOM_HOST_DIR`) stands for the hypervisor of one physical host:
//! every domain that sees the same directory may share pages with the
//! others. Emulated VMs (network namespaces) of one emulated host see the
//! same directory; those of another host see a different one. The
//! directory must belong to the user and be private (mode 0700, not a
//! symbolic link): anything else is refused with what to fix. Everything
//! in it is created, opened and removed relative to one descriptor of it.
//!
//! A shared region is a sealed memfd: its size is fixed by
//! `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so no process, the peer
//! included, can truncate it under a mapping (which would kill the mapper
//! with SIGBUS); the mapper checks the seals before it maps. Pages are not
//! populated up front: a ring's page comes into being when it is first
//! written (the producer's early wrap keeps a pair that the consumer keeps
//! up with in the first pages of its rings), so an idle or lightly used
//! pair costs little. A memfd lives on the kernel's internal tmpfs, not
//! `/dev/shm`, so a full `/dev/shm` cannot fail a later page; the sealed
//! size bounds what a ring can take (a peer cannot make it more), and what
//! can still refuse a page is the memory cgroup of the process that first
//! touches it, as for any memory it writes. The region reaches
//! the peer over a one-shot Unix socket in the directory (created mode
//! 0600 under the private directory, with an unguessable name): the
//! descriptor the handshake sends names the socket and a 128-bit token;
//! the sharer hands the memfd (`SCM_RIGHTS`) to the one connection of the
//! same user that presents the token, then removes the socket. A socket
//! left by a sharer killed in that window is swept later by any sharer.
//!
//! The backend can be given a limit of bytes it shares at once
//! ([`BackendOptions::share_limit`]); rings shrink to fit it, as they do
//! under Xen's gntalloc limit.
//!
//! Doorbells are futex words inside the shared control pages.

use super::{BackendKind, BackendOptions, BellWords, Doorbell, Hypervisor, Region};
use crate::error::{Error, Result};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Prefix of the default hypervisor directory (the user id follows).
pub const DEFAULT_DIR_PREFIX: &str = "/dev/shm/ivcom-";
/// Prefix of the hand-over sockets in the directory.
pub const PREFIX: &str = "ivcom-";
/// Suffix of the hand-over sockets.
pub const SUFFIX: &str = ".sock";
/// Sockets older than this that nobody serves are swept.
const SWEEP_AGE: Duration = Duration::from_secs(5);
/// How long a mapper waits for the sharer to hand the region over.
const HANDOVER: Duration = Duration::from_secs(10);
/// Seals every shared region carries.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// The default hypervisor directory of this user.
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    PathBuf::from(format!("{DEFAULT_DIR_PREFIX}{}", unsafe {
        libc::geteuid()
    }))
}

/// The host backend.
pub struct HostBackend {
    dir: PathBuf,
    dirfd: OwnedFd,
    host_id: [u8; 16],
    domain: u32,
    limit: usize,
    used: Arc<AtomicUsize>,
}

/// This process's domain for the host backend: its network namespace (an
/// emulated VM, a container), whose processes share receive queues, told
/// by the namespace's inode; the process id where `/proc` does not tell.
fn namespace_domain() -> u32 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or_else(|_| std::process::id())
}

/// FNV-1a, enough to fold identity facts into 16 bytes.
fn fold(parts: &[&[u8]]) -> [u8; 16] {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for p in parts {
        for &x in *p {
            a = (a ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ x as u64 ^ 0x5a).wrapping_mul(0x0000_0100_0000_01b3);
        }
        a = a.rotate_left(7);
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

/// What is wrong with a hypervisor directory of mode `mode`, owner `uid`,
/// for user `me` (`None`: nothing).
pub fn dir_problem(is_dir: bool, mode: u32, uid: u32, me: u32) -> Option<String> {
    if !is_dir {
        Some("is not a directory".into())
    } else if uid != me {
        Some(format!(
            "belongs to uid {uid}, not to this user (uid {me}); use a directory of your own"
        ))
    } else if mode & 0o077 != 0 {
        Some(format!(
            "has mode {:o}; other users could reach the rings (chmod 700)",
            mode & 0o7777
        ))
    } else {
        None
    }
}

impl HostBackend {
    /// Opens the hypervisor directory of `opts` (creating it, mode 0700, if
    /// it does not exist).
    pub fn open(opts: &BackendOptions) -> Result<Self> {
        let dir = opts
            .host_dir
            .clone()
            .or_else(|| std::env::var_os("IVCOM_HOST_DIR").map(PathBuf::from))
            .unwrap_or_else(default_dir);
        let mut hv = Self::open_dir(&dir)?;
        hv.limit = opts.share_limit.unwrap_or(usize::MAX);
        Ok(hv)
    }

    /// Opens the hypervisor directory `dir`, with no share limit.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let bad =
            |why: String| Error::Backend(format!("hypervisor directory {}: {why}", dir.display()));
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| bad(format!("create its parent: {e}")))?;
                }
                let c = CString::new(dir.as_os_str().as_bytes())
                    .map_err(|_| bad("path with a NUL byte".into()))?;
                // SAFETY: a NUL-terminated path; EEXIST (a racing creator)
                // is fine, the checks below judge what is there.
                if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::AlreadyExists
                {
                    return Err(bad(format!("create: {}", std::io::Error::last_os_error())));
                }
            }
            Err(e) => return Err(bad(e.to_string())),
            Ok(md) if md.file_type().is_symlink() => {
                return Err(bad(
                    "is a symbolic link; give the real directory (or remove the link)".into(),
                ))
            }
            Ok(_) => {}
        }
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| bad("path with a NUL byte".into()))?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            let why = if e.raw_os_error() == Some(libc::ELOOP) {
                "is a symbolic link; give the real directory (or remove the link)".to_string()
            } else {
                format!("open: {e}")
            };
            return Err(bad(why));
        }
        // SAFETY: a descriptor we just opened and own.
        let dirfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let md = std::fs::File::from(dirfd.try_clone().map_err(|e| bad(e.to_string()))?)
            .metadata()
            .map_err(|e| bad(format!("stat: {e}")))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if let Some(why) = dir_problem(md.is_dir(), md.mode(), md.uid(), me) {
            return Err(bad(why));
        }
        // The host identity: the kernel's boot id and the directory's inode.
        // Bind mounts of one directory (emulated VMs of one host) agree;
        // different directories (emulated hosts) or kernels differ.
        let boot = std::fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let host_id = fold(&[&boot, &md.dev().to_le_bytes(), &md.ino().to_le_bytes()]);
        Ok(HostBackend {
            dir: dir.to_path_buf(),
            dirfd,
            host_id,
            domain: namespace_domain(),
            limit: usize::MAX,
            used: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The hypervisor directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes this backend shares now (live regions it created).
    pub fn shared_bytes(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A path that reaches `name` in the directory through its descriptor
    /// (so a directory renamed or replaced meanwhile is never followed).
    fn at(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dirfd.as_raw_fd()))
    }

    fn unlink(&self, name: &str) -> bool {
        let c = CString::new(name).expect("names have no NUL");
        // SAFETY: a NUL-terminated name relative to our directory fd.
        unsafe { libc::unlinkat(self.dirfd.as_raw_fd(), c.as_ptr(), 0) == 0 }
    }

    /// Removes hand-over sockets that nobody serves any more (their sharer
    /// died between sharing and the peer's fetch) and that are older than a
    /// few seconds. Returns how many were removed.
    pub fn sweep(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(self.at("")) else {
            return 0;
        };
        let mut removed = 0;
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str().filter(|n| parse_socket_name(n).is_some()) else {
                continue;
            };
            let old = ent
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > SWEEP_AGE);
            if !old {
                continue;
            }
            let dead = match UnixStream::connect(self.at(name)) {
                Err(e) => e.raw_os_error() == Some(libc::ECONNREFUSED),
                Ok(_) => false,
            };
            if dead && self.unlink(name) {
                removed += 1;
            }
        }
        removed
    }
}

/// Checks a hand-over socket name: `ivcom-<32 hex>.sock`.
pub fn parse_socket_name(s: &str) -> Option<&str> {
    let hex = s.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(s)
}

/// Parses a region descriptor: `<socket name>:<32 hex token>`.
pub fn parse_desc(desc: &[u8]) -> Option<(&str, [u8; 16])> {
    let s = std::str::from_utf8(desc).ok()?;
    let (name, token) = s.split_once(':')?;
    let name = parse_socket_name(name)?;
    if token.len() != 32
        || !token
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut t = [0u8; 16];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&token[2 * i..2 * i + 2], 16).ok()?;
    }
    Some((name, t))
}

/// The hand-over of a region not fetched yet.
struct Handover {
    listener: UnixListener,
    name: String,
    token: [u8; 16],
    memfd: OwnedFd,
    /// The directory, to remove the socket from.
    dirfd: OwnedFd,
}

impl Handover {
    fn remove(&self) {
        let c = CString::new(self.name.as_str()).expect("names have no NUL");
        // SAFETY: a NUL-terminated name relative to the directory fd;
        // ENOENT (swept) is fine.
        unsafe { libc::unlinkat(self.dirfd.as_raw_fd(), c.as_ptr(), 0) };
    }
}

/// A mapping of a region of the host backend.
pub struct HostRegion {
    ptr: *mut u8,
    len: usize,
    /// The sharer's hand-over, until the peer fetched the region.
    handover: Mutex<Option<Handover>>,
    /// The sharer's budget, given back on drop.
    budget: Option<Arc<AtomicUsize>>,
    /// A region shared with every process of a domain (a receive queue):
    /// what [`Region::offer`] needs to hand it over to each process.
    again: Option<Again>,
}

/// What a region shared with a whole domain keeps to be offered again: its
/// memfd and the directory its hand-over sockets go in.
struct Again {
    memfd: OwnedFd,
    dir: PathBuf,
    dirfd: OwnedFd,
}

/// A new hand-over of `memfd`: a socket of a random name in `dir`, and the
/// descriptor (`<socket>:<token>`) a mapper connects with.
fn new_handover(dir: &Path, dirfd: &OwnedFd, memfd: OwnedFd) -> Result<(Handover, Vec<u8>)> {
    let sock = format!("{PREFIX}{}{SUFFIX}", hex(&super::random_bytes::<16>()));
    let listener = UnixListener::bind(dir.join(&sock))
        .map_err(|err| Error::Backend(format!("hand-over socket in {}: {err}", dir.display())))?;
    let token = super::random_bytes::<16>();
    let desc = format!("{sock}:{}", hex(&token)).into_bytes();
    let h = Handover {
        listener,
        name: sock,
        token,
        memfd,
        dirfd: dirfd.try_clone()?,
    };
    Ok((h, desc))
}

// SAFETY: the mapping is process-wide and valid until drop; the mutex guards
// the hand-over.
unsafe impl Send for HostRegion {}
// SAFETY: as above.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    fn drop_handover(&self) {
        if let Some(h) = self
            .handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.remove();
        }
    }
}

/// The uid of the process at the other end of a Unix socket.
fn peer_uid(fd: RawFd) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// A message header for one byte of data (`iov`) and one descriptor's
/// control message (`ctl`, at least `CMSG_SPACE(sizeof fd)` bytes).
fn fd_msghdr(iov: &mut libc::iovec, ctl: &mut [u64]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(ctl) as _;
    msg
}

/// Room for one descriptor's control message, in u64s (aligned).
fn fd_ctl() -> Vec<u64> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    vec![0u64; space.div_ceil(8)]
}

/// Sends `fd` over `sock` with one byte of data.
fn send_fd(sock: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    let mut byte = [1u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl = fd_ctl();
    let msg = fd_msghdr(&mut iov, &mut ctl);
    // SAFETY: the control buffer holds one cmsg with room for one fd.
    unsafe {
        let cm = libc::CMSG_FIRSTHDR(&msg);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<RawFd>(), fd);
    }
    // SAFETY: a valid msghdr over live buffers.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`].
fn recv_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl = fd_ctl();
    let mut msg = fd_msghdr(&mut iov, &mut ctl);
    // SAFETY: a valid msghdr over live buffers; MSG_CMSG_CLOEXEC marks any
    // received descriptor close-on-exec.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        let mut got: Option<OwnedFd> = None;
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cm);
                let n = ((*cm).cmsg_len as usize - (data as usize - cm as usize))
                    / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // Keep the first, close any extra a peer pushed on us.
                    let owned = OwnedFd::from_raw_fd(fd);
                    if got.is_none() {
                        got = Some(owned);
                    }
                }
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(std::io::Error::other("descriptor list truncated"));
        }
        got.ok_or_else(|| std::io::Error::other("no descriptor came"))
    }
}

impl Region for HostRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn peer_attached(&self) {
        self.drop_handover();
    }
    /// A memfd (shmem): a hole punched through either mapping frees the
    /// pages for both.
    fn gives_pages_back(&self) -> bool {
        true
    }
    /// Processes, containers and emulated VMs of one kernel.
    fn shares_cpus(&self) -> bool {
        true
    }

    /// A new socket and token for the memfd of a region shared with a
    /// domain, replacing a hand-over nobody fetched.
    fn offer(&self) -> Result<Vec<u8>> {
        let Some(a) = &self.again else {
            return Err(Error::Backend(
                "this region was shared with one peer, not with a domain".into(),
            ));
        };
        let (h, desc) = new_handover(&a.dir, &a.dirfd, a.memfd.try_clone()?)?;
        let old = self
            .handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(h);
        if let Some(old) = old {
            old.remove();
        }
        Ok(desc)
    }

    /// Hands the region to the one connection that presents the token,
    /// until `deadline` or until `abort` (the handshake connection) turns
    /// readable: the peer answered without fetching it.
    fn serve(&self, deadline: Instant, abort: RawFd) -> Result<()> {
        let guard = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = guard.as_ref() else {
            return Ok(());
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            let mut fds = [
                libc::pollfd {
                    fd: h.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: abort,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: two valid pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if fds[1].revents != 0 && fds[0].revents == 0 {
                return Ok(());
            }
            if fds[0].revents == 0 {
                continue;
            }
            let Ok((conn, _)) = h.listener.accept() else {
                continue;
            };
            // Only this user's processes; the one that knows the token.
            // SAFETY: geteuid has no preconditions.
            if peer_uid(conn.as_raw_fd()).ok() != Some(unsafe { libc::geteuid() }) {
                continue;
            }
            // The mapper has until the handshake's deadline to send its
            // token: a process that ran slowly between its connect and its
            // token (a loaded host; a rank under valgrind took over 10 s)
            // still gets the region, where a bound of 2 s sent its pair to
            // TCP. Only this user's processes get this far, and they are
            // inside the host backend's boundary (docs/SECURITY.md).
            let _ = conn.set_read_timeout(Some(left));
            let mut token = [0u8; 16];
            if (&conn).read_exact(&mut token).is_err() {
                continue;
            }
            let same = token
                .iter()
                .zip(h.token.iter())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
            if !same {
                continue;
            }
            send_fd(&conn, h.memfd.as_raw_fd())?;
            drop(guard);
            self.drop_handover();
            return Ok(());
        }
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        self.drop_handover();
        // SAFETY: ptr/len are the mapping made in share/map, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        if let Some(b) = &self.budget {
            b.fetch_sub(self.len, Ordering::AcqRel);
        }
    }
}

fn map_fd(fd: RawFd, len: usize) -> Result<*mut u8> {
    super::mmap_shared(fd, len, 0).map_err(|e| Error::Backend(format!("mmap: {e}")))
}

/// Reserves `len` bytes of the budget `used` under `limit`.
fn take_budget(used: &AtomicUsize, len: usize, limit: usize) -> Result<()> {
    let mut cur = used.load(Ordering::Acquire);
    loop {
        let next = cur
            .checked_add(len)
            .filter(|&n| n <= limit)
            .ok_or_else(|| {
                Error::Backend(format!(
                    "no room for {len} bytes: {cur} of the share limit of {limit} in use"
                ))
            })?;
        match used.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(c) => cur = c,
        }
    }
}

impl Hypervisor for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn domain_id(&self) -> u32 {
        self.domain
    }

    fn host_id(&self) -> [u8; 16] {
        self.host_id
    }

    fn share(&self, _peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
        let (region, desc) = self.share_budgeted(len, false)?;
        Ok((
            region,
            desc.expect("a region for one peer has its hand-over"),
        ))
    }

    fn shares_domains(&self) -> bool {
        true
    }

    fn share_domain(&self, _peer: u32, len: usize) -> Result<Box<dyn Region>> {
        Ok(self.share_budgeted(len, true)?.0)
    }

    fn map(&self, _peer: u32, desc: &[u8], len: usize) -> Result<Box<dyn Region>> {
        let (name, token) = parse_desc(desc)
            .ok_or_else(|| Error::Backend("malformed shared region descriptor".into()))?;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Backend(format!("{what} {}/{name}: {e}", self.dir.display()))
        };
        let conn = UnixStream::connect(self.at(name)).map_err(|e| fail("connect", &e))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        match peer_uid(conn.as_raw_fd()) {
            Ok(uid) if uid == me => {}
            Ok(uid) => return Err(fail("refusing", &format!("served by uid {uid}"))),
            Err(e) => return Err(fail("credentials of", &e)),
        }
        conn.set_read_timeout(Some(HANDOVER))
            .and_then(|_| conn.set_write_timeout(Some(HANDOVER)))
            .map_err(|e| fail("socket", &e))?;
        (&conn)
            .write_all(&token)
            .map_err(|e| fail("send token to", &e))?;
        let fd = recv_fd(&conn).map_err(|e| fail("receive the region from", &e))?;
        let why = check_region(fd.as_raw_fd(), len);
        if let Some(why) = why {
            return Err(fail("refusing the region of", &why));
        }
        let ptr = map_fd(fd.as_raw_fd(), len)?;
        Ok(Box::new(HostRegion {
            ptr,
            len,
            handover: Mutex::new(None),
            budget: None,
            again: None,
        }))
    }

    fn bell_offer(&self, _peer: u32, words: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
        Ok((Box::new(FutexBell { words }), Vec::new()))
    }

    fn bell_accept(&self, _peer: u32, _desc: &[u8], words: BellWords) -> Result<Box<dyn Doorbell>> {
        Ok(Box::new(FutexBell { words }))
    }

    fn describe(&self) -> String {
        format!("host:{}", self.dir.display())
    }

    fn max_share(&self) -> usize {
        self.limit
    }
}

/// Why a received region must not be mapped (`None`: it may).
fn check_region(fd: RawFd, len: usize) -> Option<String> {
    // SAFETY: fstat into a zeroed stat of our own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Some(std::io::Error::last_os_error().to_string());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Some("not a regular file".into());
    }
    if st.st_size as u64 != len as u64 {
        return Some(format!("size {} instead of {len}", st.st_size));
    }
    // SAFETY: F_GET_SEALS on our descriptor.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Some(
            "not sealed against shrinking (the peer could cut it under the mapping)".into(),
        );
    }
    None
}

/// A region shared, and the descriptor of its hand-over (`None` for a
/// region shared with a domain: each [`Region::offer`] makes one).
type Shared = (Box<dyn Region>, Option<Vec<u8>>);

impl HostBackend {
    /// [`HostBackend::share_sealed`] within the share limit.
    fn share_budgeted(&self, len: usize, again: bool) -> Result<Shared> {
        take_budget(&self.used, len, self.limit)?;
        let r = self.share_sealed(len, again);
        if r.is_err() {
            self.used.fetch_sub(len, Ordering::AcqRel);
        }
        r
    }

    /// A sealed memfd of `len` bytes, mapped, with its hand-over socket
    /// and descriptor; `again`: a region for a domain, which keeps what
    /// each of its offers takes instead ([`Region::offer`]).
    fn share_sealed(&self, len: usize, again: bool) -> Result<Shared> {
        self.sweep();
        let e = |what: &str| Error::Backend(format!("{what}: {}", std::io::Error::last_os_error()));
        let name = CString::new("ivcom-ring").expect("no NUL");
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(e("memfd_create"));
        }
        // SAFETY: a descriptor we just created and own.
        let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on our own descriptor.
        unsafe {
            if libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(e(&format!("size a region of {len} bytes")));
            }
            if libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) != 0 {
                return Err(e("seal the region"));
            }
        }
        let kept = || -> Result<Option<Again>> {
            Ok(match again {
                false => None,
                true => Some(Again {
                    memfd: memfd.try_clone()?,
                    dir: self.dir.clone(),
                    dirfd: self.dirfd.try_clone()?,
                }),
            })
        };
        let again = kept()?;
        let ptr = map_fd(memfd.as_raw_fd(), len)?;
        let (handover, desc) = match again {
            Some(_) => (None, None),
            None => match new_handover(&self.dir, &self.dirfd, memfd) {
                Ok((h, d)) => (Some(h), Some(d)),
                Err(err) => {
                    // SAFETY: ptr/len is the mapping just made, unused.
                    unsafe { libc::munmap(ptr.cast(), len) };
                    return Err(err);
                }
            },
        };
        let region = HostRegion {
            ptr,
            len,
            handover: Mutex::new(handover),
            budget: Some(Arc::clone(&self.used)),
            again,
        };
        Ok((Box::new(region), desc))
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A doorbell made of two futex words in shared memory.
struct FutexBell {
    words: BellWords,
}

impl Doorbell for FutexBell {
    fn prepare(&self) -> u64 {
        // SAFETY: the word lives in the mapped control page (BellWords).
        unsafe { (*self.words.wait).load(Ordering::Acquire) as u64 }
    }

    fn wait(&self, token: u64, timeout: Duration) -> Result<()> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT (shared) on a mapped, aligned 32-bit word; the
        // kernel returns at once if the word no longer equals `token`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.words.wait,
                libc::FUTEX_WAIT,
                token as u32,
                &ts as *const libc::timespec,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => {}
                _ => return Err(Error::Io(e)),
            }
        }
        Ok(())
    }

    fn notify(&self) -> Result<()> {
        // SAFETY: as in prepare; FUTEX_WAKE on a mapped word.
        unsafe {
            (*self.words.ring).fetch_add(1, Ordering::Release);
            libc::syscall(libc::SYS_futex, self.words.ring, libc::FUTEX_WAKE, 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "ivcom-host-{tag}-{}",
            hex(&super::super::random_bytes::<6>())
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn a_created_directory_is_private_and_a_lax_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("mode");
        let hv = HostBackend::open_dir(&d).unwrap();
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        drop(hv);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = HostBackend::open_dir(&d).err().unwrap().to_string();
        assert!(e.contains("mode 755") && e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        // a symbolic link to it is refused, and says so
        let link = tmp("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = HostBackend::open_dir(&link).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_users_directory_is_refused() {
        assert!(dir_problem(true, 0o40700, 1000, 1000).is_none());
        assert!(dir_problem(true, 0o40700, 0, 1000)
            .unwrap()
            .contains("belongs to uid 0"));
        assert!(dir_problem(false, 0o100600, 1000, 1000).is_some());
        assert!(dir_problem(true, 0o40770, 1000, 1000).is_some());
    }

    #[test]
    fn descriptors_parse_strictly() {
        let name = format!("ivcom-{}.sock", "a".repeat(32));
        let good = format!("{name}:{}", "0f".repeat(16));
        assert_eq!(parse_desc(good.as_bytes()).unwrap().0, name);
        for bad in [
            "".to_string(),
            name.clone(),
            format!("{name}:{}", "0F".repeat(16)),
            format!("{name}:{}", "0f".repeat(15)),
            format!("../{name}:{}", "0f".repeat(16)),
            format!("ivcom-{}.sock:{}", "a".repeat(31), "0f".repeat(16)),
            format!("ivcom-{}.sock/x:{}", "a".repeat(32), "0f".repeat(16)),
        ] {
            assert!(parse_desc(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_region_is_sealed_and_handed_over_once() {
        let d = tmp("seal");
        let hv = HostBackend::open_dir(&d).unwrap();
        let (region, desc) = hv.share(0, 8192).unwrap();
        // The sharer serves while the mapper maps.
        let (mapped, _) = std::thread::scope(|s| {
            let (a, b) = UnixStream::pair().unwrap();
            let r = &region;
            let h =
                s.spawn(move || r.serve(Instant::now() + Duration::from_secs(5), a.as_raw_fd()));
            let m = hv.map(0, &desc, 8192).unwrap();
            drop(b);
            (m, h.join().unwrap())
        });
        // the same memory
        // SAFETY: both mappings are 8192 bytes long and alive.
        unsafe {
            *region.as_ptr().add(100) = 42;
            assert_eq!(*mapped.as_ptr().add(100), 42);
        }
        // the socket is gone, and the fd cannot be shrunk by anyone
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        assert!(hv.map(0, &desc, 8192).is_err());
        drop(region);
        drop(mapped);
        assert_eq!(hv.shared_bytes(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_mapper_slow_to_send_its_token_still_gets_the_region() {
        let d = tmp("slow");
        let hv = HostBackend::open_dir(&d).unwrap();
        let (region, desc) = hv.share(0, 4096).unwrap();
        let (name, token) = parse_desc(&desc).unwrap();
        let fd = std::thread::scope(|s| {
            let (a, b) = UnixStream::pair().unwrap();
            let r = &region;
            let h =
                s.spawn(move || r.serve(Instant::now() + Duration::from_secs(8), a.as_raw_fd()));
            // connected, then 3 s before the token
            let conn = UnixStream::connect(hv.at(name)).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            (&conn).write_all(&token).unwrap();
            let fd = recv_fd(&conn);
            drop(b);
            h.join().unwrap().unwrap();
            fd
        });
        let fd = fd.expect("the region after a slow token");
        assert_eq!(check_region(fd.as_raw_fd(), 4096), None);
        drop(region);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_wrong_token_gets_nothing() {
        let d = tmp("token");
        let hv = HostBackend::open_dir(&d).unwrap();
        let (region, desc) = hv.share(0, 4096).unwrap();
        let mut forged = desc.clone();
        let n = forged.len();
        forged[n - 1] = if forged[n - 1] == b'0' { b'1' } else { b'0' };
        std::thread::scope(|s| {
            let (a, b) = UnixStream::pair().unwrap();
            let r = &region;
            let h =
                s.spawn(move || r.serve(Instant::now() + Duration::from_secs(3), a.as_raw_fd()));
            let e = hv.map(0, &forged, 4096).err().unwrap();
            assert!(e.to_string().contains("receive the region"), "{e}");
            drop(b); // the handshake "answered": serve returns
            h.join().unwrap().unwrap();
        });
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_share_limit_is_a_budget() {
        let d = tmp("budget");
        let mut hv = HostBackend::open_dir(&d).unwrap();
        hv.limit = 3 * 4096;
        let a = hv.share(0, 8192).unwrap();
        let e = hv.share(0, 8192).err().unwrap().to_string();
        assert!(e.contains("no room"), "{e}");
        let b = hv.share(0, 4096).unwrap();
        drop(a);
        let c = hv.share(0, 8192).unwrap();
        drop((b, c));
        assert_eq!(hv.shared_bytes(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unsealed_file_is_refused() {
        let f = tmp("unsealed");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let file = std::fs::File::open(&f).unwrap();
        let why = check_region(file.as_raw_fd(), 4096).unwrap();
        assert!(why.contains("not sealed"), "{why}");
        assert!(check_region(file.as_raw_fd(), 8192)
            .unwrap()
            .contains("size"));
        std::fs::remove_file(&f).unwrap();
    }
}
