//! Just enough of the xenstore wire protocol to read one key: the request
//! and reply are a 16-byte header (`type`, `req_id`, `tx_id`, `len`, little
//! endian `u32`s) followed by `len` bytes of payload. A read request's
//! payload is the path with a terminating NUL; relative paths are resolved
//! by xenstored under `/local/domain/<our domid>/`. The reply is either
//! `XS_READ` with the value (no NUL) or `XS_ERROR` with an errno name.
//!
//! The guest kernel exposes the protocol on `/dev/xen/xenbus` (or
//! `/proc/xen/xenbus` with xenfs): write a whole request, read the reply.

use super::abi::DOMID_FIRST_RESERVED;
use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `XS_READ`.
pub const XS_READ: u32 = 2;
/// `XS_ERROR`.
pub const XS_ERROR: u32 = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload of a message.
pub const PAYLOAD_MAX: usize = 4096;
/// Bytes of the message header.
pub const HEADER: usize = 16;

/// The request id this module uses (echoed by the reply).
const REQ_ID: u32 = 0x6976_636f; // "ivco"

/// Encodes an `XS_READ` request for `path`.
pub fn encode_read(req_id: u32, path: &str) -> Result<Vec<u8>> {
    if path.is_empty() || path.len() + 1 > PAYLOAD_MAX || path.contains('\0') {
        return Err(Error::Invalid(format!("xenstore path {path:?}")));
    }
    let mut v = Vec::with_capacity(HEADER + path.len() + 1);
    v.extend_from_slice(&XS_READ.to_le_bytes());
    v.extend_from_slice(&req_id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&(path.len() as u32 + 1).to_le_bytes());
    v.extend_from_slice(path.as_bytes());
    v.push(0);
    Ok(v)
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `XS_*` type.
    pub ty: u32,
    /// Request id.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Payload length (checked against [`PAYLOAD_MAX`]).
    pub len: usize,
}

/// Decodes a reply header; rejects payloads beyond [`PAYLOAD_MAX`].
pub fn parse_header(h: &[u8; HEADER]) -> Result<Header> {
    let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = w(12) as usize;
    if len > PAYLOAD_MAX {
        return Err(Error::Backend(format!(
            "xenstore reply of {len} bytes exceeds {PAYLOAD_MAX}"
        )));
    }
    Ok(Header {
        ty: w(0),
        req_id: w(4),
        tx_id: w(8),
        len,
    })
}

/// Interprets the reply to a read of `path`: the value, or the error.
pub fn read_value(h: &Header, payload: &[u8], req_id: u32, path: &str) -> Result<Vec<u8>> {
    if h.req_id != req_id {
        return Err(Error::Backend(format!(
            "xenstore reply for request {:#x}, expected {req_id:#x}",
            h.req_id
        )));
    }
    match h.ty {
        XS_READ => {
            let v = payload.strip_suffix(&[0]).unwrap_or(payload);
            Ok(v.to_vec())
        }
        XS_ERROR => {
            let e = payload.strip_suffix(&[0]).unwrap_or(payload);
            let e: String = String::from_utf8_lossy(&e[..e.len().min(64)])
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect();
            Err(Error::Backend(format!("xenstore read of {path}: {e}")))
        }
        t => Err(Error::Backend(format!(
            "xenstore replied with message type {t} to a read of {path}"
        ))),
    }
}

/// Parses a domain id as xenstore stores it (decimal ASCII).
pub fn parse_domid(v: &[u8]) -> Result<u16> {
    let bad = || {
        Error::Backend(format!(
            "xenstore domid {:?} is not a domain id",
            String::from_utf8_lossy(&v[..v.len().min(16)])
        ))
    };
    let s = std::str::from_utf8(v)
        .map_err(|_| bad())?
        .trim_end_matches(['\n', '\0']);
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u32 = s.parse().map_err(|_| bad())?;
    if n >= DOMID_FIRST_RESERVED {
        return Err(bad());
    }
    Ok(n as u16)
}

fn wait_io(fd: BorrowedFd<'_>, events: libc::c_short, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Backend("xenstore did not answer in time".into()));
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Backend(format!("poll xenstore: {e}")));
            }
        }
    }
}

/// Writes all of `buf` to `fd` (non-blocking) before `deadline`.
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8], deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes from a valid slice.
        let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if r > 0 {
            buf = &buf[(r as usize).min(buf.len())..];
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => wait_io(fd, libc::POLLOUT, deadline)?,
            _ if r == 0 => return Err(Error::Backend("xenstore: write returned 0".into())),
            _ => return Err(Error::Backend(format!("write to xenstore: {e}"))),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from `fd` (non-blocking) before `deadline`.
fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: reads into a valid mutable slice of rest.len() bytes.
        let r = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if r > 0 {
            got += (r as usize).min(rest.len());
            continue;
        }
        if r == 0 {
            return Err(Error::Backend("xenstore closed the connection".into()));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => wait_io(fd, libc::POLLIN, deadline)?,
            _ => return Err(Error::Backend(format!("read from xenstore: {e}"))),
        }
    }
    Ok(())
}

/// Reads `path` through an open, non-blocking xenbus file.
pub fn read_fd(fd: BorrowedFd<'_>, path: &str, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let req = encode_read(REQ_ID, path)?;
    write_all(fd, &req, deadline)?;
    let mut h = [0u8; HEADER];
    read_exact(fd, &mut h, deadline)?;
    let h = parse_header(&h)?;
    let mut payload = vec![0u8; h.len];
    read_exact(fd, &mut payload, deadline)?;
    read_value(&h, &payload, REQ_ID, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn header(ty: u32, req: u32, len: u32) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[4..8].copy_from_slice(&req.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn read_request_layout() {
        let r = encode_read(7, "domid").unwrap();
        assert_eq!(&r[0..4], &2u32.to_le_bytes());
        assert_eq!(&r[4..8], &7u32.to_le_bytes());
        assert_eq!(&r[8..12], &0u32.to_le_bytes());
        assert_eq!(&r[12..16], &6u32.to_le_bytes());
        assert_eq!(&r[16..], b"domid\0");
        assert!(encode_read(1, "").is_err());
        assert!(encode_read(1, "a\0b").is_err());
        assert!(encode_read(1, &"x".repeat(PAYLOAD_MAX)).is_err());
    }

    #[test]
    fn reply_parsing() {
        let h = parse_header(&header(XS_READ, 5, 2)).unwrap();
        assert_eq!(h.len, 2);
        assert_eq!(read_value(&h, b"12", 5, "domid").unwrap(), b"12");
        assert_eq!(read_value(&h, b"1\0", 5, "domid").unwrap(), b"1");
        assert!(read_value(&h, b"12", 6, "domid").is_err());
        let e = parse_header(&header(XS_ERROR, 5, 7)).unwrap();
        match read_value(&e, b"ENOENT\0", 5, "domid") {
            Err(Error::Backend(s)) => assert!(s.contains("ENOENT"), "{s}"),
            other => panic!("{other:?}"),
        }
        let w = parse_header(&header(15, 5, 0)).unwrap();
        assert!(read_value(&w, b"", 5, "domid").is_err());
        assert!(parse_header(&header(XS_READ, 5, PAYLOAD_MAX as u32 + 1)).is_err());
        assert!(parse_header(&header(XS_READ, 5, u32::MAX)).is_err());
    }

    #[test]
    fn domid_parsing() {
        assert_eq!(parse_domid(b"0").unwrap(), 0);
        assert_eq!(parse_domid(b"3").unwrap(), 3);
        assert_eq!(parse_domid(b"3\0").unwrap(), 3);
        assert_eq!(parse_domid(b"32751").unwrap(), 0x7FEF);
        for bad in [
            &b""[..],
            b"32752",
            b"65535",
            b"99999999",
            b"-1",
            b"+3",
            b" 3",
            b"3a",
            b"\xff",
        ] {
            assert!(parse_domid(bad).is_err(), "{bad:?}");
        }
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fds that we then own.
        unsafe {
            assert_eq!(
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr()
                ),
                0
            );
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    /// A fake xenstored on the other end of a socket: checks the request and
    /// answers in small pieces.
    #[test]
    fn read_through_a_fake_xenstored() {
        let (ours, theirs) = socketpair();
        let server = std::thread::spawn(move || {
            let mut s = std::os::unix::net::UnixStream::from(theirs);
            s.set_nonblocking(false).unwrap();
            use std::io::{Read, Write};
            let mut req = [0u8; HEADER + 6];
            s.read_exact(&mut req).unwrap();
            assert_eq!(&req[HEADER..], b"domid\0");
            let req_id = u32::from_le_bytes(req[4..8].try_into().unwrap());
            let mut reply = header(XS_READ, req_id, 2).to_vec();
            reply.extend_from_slice(b"17");
            for b in reply.chunks(3) {
                s.write_all(b).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let v = read_fd(ours.as_fd(), "domid", Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert_eq!(parse_domid(&v).unwrap(), 17);
    }

    #[test]
    fn silent_xenstored_times_out() {
        let (ours, _theirs) = socketpair();
        let t = Instant::now();
        assert!(read_fd(ours.as_fd(), "domid", Duration::from_millis(50)).is_err());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
