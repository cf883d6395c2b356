//! The host backend: pages shared between processes of one kernel.
//!
//! A directory (the *hypervisor directory*, default `/dev/shm/ivcom`, or
//! `$IVCOM_HOST_DIR`) stands for the hypervisor of one physical host: every
//! domain that sees the same directory may share pages with the others.
//! Emulated VMs (network namespaces) of one emulated host see the same
//! directory; those of another host see a different one.
//!
//! Sharing creates a file with an unguessable name (128 random bits), mode
//! 0600, `O_EXCL`, its space reserved with `fallocate` (so a full tmpfs fails
//! here, not with SIGBUS later). The descriptor sent to the peer is the name.
//! The peer opens it, checks owner, mode and size, maps it and unlinks it at
//! once; the creator unlinks it too when the peer proves its mapping, on
//! failure, and on drop. Until then the creator holds a shared `flock` on
//! it; any sharer sweeps files that nobody locks and that are older than a
//! few seconds (left by a creator killed in the short window between create
//! and the peer's map).
//!
//! Doorbells are futex words inside the shared control pages.

use super::{BackendKind, BackendOptions, BellWords, Doorbell, Hypervisor, Region};
use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Default hypervisor directory.
pub const DEFAULT_DIR: &str = "/dev/shm/ivcom";
/// Prefix of shared objects in the directory.
pub const PREFIX: &str = "ivcom-";
/// Unlocked objects older than this are swept.
const SWEEP_AGE: Duration = Duration::from_secs(5);

/// The host backend.
pub struct HostBackend {
    dir: PathBuf,
    host_id: [u8; 16],
}

fn os_err(what: &str, path: &Path) -> Error {
    let e = std::io::Error::last_os_error();
    Error::Backend(format!("{what} {}: {e}", path.display()))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
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

impl HostBackend {
    /// Opens (creating it if needed, mode 0700) the hypervisor directory.
    pub fn open(opts: &BackendOptions) -> Result<Self> {
        let dir = opts
            .host_dir
            .clone()
            .or_else(|| std::env::var_os("IVCOM_HOST_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Self::open_dir(&dir)
    }

    /// Opens the hypervisor directory `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::Backend(format!("create {}: {e}", dir.display())))?;
        }
        let md = std::fs::metadata(dir)
            .map_err(|e| Error::Backend(format!("stat {}: {e}", dir.display())))?;
        // The host identity: the kernel's boot id and the directory's inode.
        // Bind mounts of one directory (emulated VMs of one host) agree;
        // different directories (emulated hosts) or kernels differ.
        let boot = std::fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let host_id = fold(&[&boot, &md.dev().to_le_bytes(), &md.ino().to_le_bytes()]);
        Ok(HostBackend {
            dir: dir.to_path_buf(),
            host_id,
        })
    }

    /// The hypervisor directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes shared objects that no live creator holds and that are older
    /// than a few seconds. Returns how many were removed.
    pub fn sweep(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for ent in rd.flatten() {
            let name = ent.file_name();
            if !name.as_bytes().starts_with(PREFIX.as_bytes()) {
                continue;
            }
            let Ok(md) = ent.metadata() else { continue };
            let old = md
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > SWEEP_AGE);
            if !old {
                continue;
            }
            let path = ent.path();
            let c = cpath(&path);
            // SAFETY: plain syscalls on a NUL-terminated path and our own fd.
            unsafe {
                let fd = libc::open(
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                );
                if fd < 0 {
                    continue;
                }
                if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0
                    && libc::unlink(c.as_ptr()) == 0
                {
                    removed += 1;
                }
                libc::close(fd);
            }
        }
        removed
    }

    fn valid_name(desc: &[u8]) -> Option<&str> {
        let s = std::str::from_utf8(desc).ok()?;
        let hex = s.strip_prefix(PREFIX)?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
    }
}

/// A mapping of a shared object of the host backend.
pub struct HostRegion {
    ptr: *mut u8,
    len: usize,
    /// The creator's name for the object and its locked descriptor, until
    /// the object is unlinked.
    owned: Mutex<Option<(PathBuf, libc::c_int)>>,
}

// SAFETY: the mapping is process-wide and valid until drop; the mutex guards
// the name.
unsafe impl Send for HostRegion {}
// SAFETY: as above.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    fn unlink(&self) {
        if let Some((path, fd)) = self.owned.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let c = cpath(&path);
            // SAFETY: plain syscalls; ENOENT (the peer unlinked first) is fine.
            unsafe {
                libc::unlink(c.as_ptr());
                libc::close(fd);
            }
        }
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
        self.unlink();
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: ptr/len are the mapping made in share/map, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn map_fd(fd: libc::c_int, len: usize, path: &Path) -> Result<*mut u8> {
    super::mmap_shared(fd, len, 0, true)
        .map_err(|e| Error::Backend(format!("mmap {}: {e}", path.display())))
}

impl Hypervisor for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn domain_id(&self) -> u32 {
        std::process::id()
    }

    fn host_id(&self) -> [u8; 16] {
        self.host_id
    }

    fn share(&self, _peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
        self.sweep();
        let rnd = super::random_bytes::<16>();
        let name = format!("{PREFIX}{}", hex(&rnd));
        let path = self.dir.join(&name);
        let c = cpath(&path);
        // SAFETY: plain syscalls; every result is checked and the fd closed
        // on every error path.
        unsafe {
            let fd = libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o600,
            );
            if fd < 0 {
                return Err(os_err("create", &path));
            }
            let fail = |what: &str| {
                let e = os_err(what, &path);
                libc::unlink(c.as_ptr());
                libc::close(fd);
                e
            };
            if libc::flock(fd, libc::LOCK_SH) != 0 {
                return Err(fail("lock"));
            }
            // fchmod in case the umask widened nothing but a filesystem did.
            if libc::fchmod(fd, 0o600) != 0 {
                return Err(fail("chmod"));
            }
            let r = libc::posix_fallocate(fd, 0, len as libc::off_t);
            if r != 0 {
                let e = std::io::Error::from_raw_os_error(r);
                libc::unlink(c.as_ptr());
                libc::close(fd);
                return Err(Error::Backend(format!(
                    "reserve {len} bytes in {}: {e}",
                    self.dir.display()
                )));
            }
            let ptr = match map_fd(fd, len, &path) {
                Ok(p) => p,
                Err(_) => return Err(fail("mmap")),
            };
            let region = HostRegion {
                ptr,
                len,
                owned: Mutex::new(Some((path, fd))),
            };
            Ok((Box::new(region), name.into_bytes()))
        }
    }

    fn map(&self, _peer: u32, desc: &[u8], len: usize) -> Result<Box<dyn Region>> {
        let name = Self::valid_name(desc)
            .ok_or_else(|| Error::Backend("malformed shared object name".into()))?;
        let path = self.dir.join(name);
        let c = cpath(&path);
        // SAFETY: plain syscalls; results checked; fd closed on every path.
        unsafe {
            let fd = libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            );
            if fd < 0 {
                return Err(os_err("open", &path));
            }
            // Unlink at once: from here on no third process can find it.
            libc::unlink(c.as_ptr());
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                let e = os_err("stat", &path);
                libc::close(fd);
                return Err(e);
            }
            let why = if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                Some("not a regular file".to_string())
            } else if st.st_mode & 0o077 != 0 {
                Some(format!("mode {:o} is not private", st.st_mode & 0o777))
            } else if st.st_uid != libc::geteuid() {
                Some(format!("owned by uid {}", st.st_uid))
            } else if st.st_size as u64 != len as u64 {
                Some(format!("size {} instead of {len}", st.st_size))
            } else {
                None
            };
            if let Some(why) = why {
                libc::close(fd);
                return Err(Error::Backend(format!(
                    "refusing {}: {why}",
                    path.display()
                )));
            }
            let r = map_fd(fd, len, &path);
            libc::close(fd);
            Ok(Box::new(HostRegion {
                ptr: r?,
                len,
                owned: Mutex::new(None),
            }))
        }
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
