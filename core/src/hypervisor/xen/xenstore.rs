//! Just enough of the xenstore wire protocol to read a key, ask whether a
//! domain exists and watch for domains going away: the request and reply
//! are a 16-byte header (`type`, `req_id`, `tx_id`, `len`, little endian
//! `u32`s) followed by `len` bytes of payload. A request's payload is its
//! arguments, each with a terminating NUL (a read: the path); relative
//! paths are resolved by xenstored under `/local/domain/<our domid>/`. The
//! reply has the request's type and id with the value (a read: no NUL), or
//! `XS_ERROR` with an errno name. A watch adds unsolicited `XS_WATCH_EVENT`
//! messages (request id 0): the path that changed and the watch's token.
//!
//! The guest kernel exposes the protocol on `/dev/xen/xenbus` (or
//! `/proc/xen/xenbus` with xenfs): write a whole request, read the reply.

use super::abi::DOMID_FIRST_RESERVED;
use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `XS_READ`.
pub const XS_READ: u32 = 2;
/// `XS_WATCH`: watch a path (arguments: path, token).
pub const XS_WATCH: u32 = 4;
/// `XS_WRITE`: payload path, NUL, value (no NUL).
pub const XS_WRITE: u32 = 11;
/// `XS_SET_PERMS`: path, then one permission per argument (the first names
/// the owner and what every other domain may do).
pub const XS_SET_PERMS: u32 = 14;
/// `XS_IS_DOMAIN_INTRODUCED`: `T` while xenstored serves the domain
/// (from its creation until its destruction), `F` after.
pub const XS_IS_DOMAIN_INTRODUCED: u32 = 17;
/// `XS_WATCH_EVENT`: a watched path changed.
pub const XS_WATCH_EVENT: u32 = 15;
/// `XS_ERROR`.
pub const XS_ERROR: u32 = 16;
/// The special path whose watch fires when any domain is released
/// (crashed, shut down or destroyed). Xen 4.17's xenstored sends its events
/// only to privileged connections and to domains given read permission on
/// it.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";
/// `XENSTORE_PAYLOAD_MAX`: the largest payload of a message.
pub const PAYLOAD_MAX: usize = 4096;
/// Bytes of the message header.
pub const HEADER: usize = 16;

/// The request id this module uses (echoed by the reply).
const REQ_ID: u32 = 0x6976_636f; // "ivco"

/// Encodes an `XS_READ` request for `path`.
pub fn encode_read(req_id: u32, path: &str) -> Result<Vec<u8>> {
    encode(XS_READ, req_id, &[path])
}

/// Encodes a request of type `ty` whose payload is `args`, each followed by
/// a NUL.
pub fn encode(ty: u32, req_id: u32, args: &[&str]) -> Result<Vec<u8>> {
    let len: usize = args.iter().map(|a| a.len() + 1).sum();
    if args.iter().any(|a| a.is_empty() || a.contains('\0')) || len > PAYLOAD_MAX {
        return Err(Error::Invalid(format!("xenstore arguments {args:?}")));
    }
    let mut v = Vec::with_capacity(HEADER + len);
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&req_id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    for a in args {
        v.extend_from_slice(a.as_bytes());
        v.push(0);
    }
    Ok(v)
}

/// A watch event's path and token (`<path>|<token>|`), or `None` for a
/// payload of another form.
pub fn parse_watch_event(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = payload.split(|&b| b == 0);
    let path = parts.next()?;
    let token = parts.next()?;
    if path.is_empty() {
        return None;
    }
    Some((path, token))
}

/// What xenstored answered to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The value (for a read, without a trailing NUL).
    Value(Vec<u8>),
    /// `XS_ERROR`: the errno name (`ENOENT`, `EACCES`, ...), printable
    /// characters only, at most 64.
    Error(String),
}

/// Interprets a reply to a request of type `ty` with id `req_id`.
pub fn reply(h: &Header, payload: &[u8], ty: u32, req_id: u32) -> Result<Reply> {
    if h.req_id != req_id {
        return Err(Error::Backend(format!(
            "xenstore reply for request {:#x}, expected {req_id:#x}",
            h.req_id
        )));
    }
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    match h.ty {
        XS_ERROR => Ok(Reply::Error(
            String::from_utf8_lossy(&body[..body.len().min(64)])
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect(),
        )),
        t if t == ty => Ok(Reply::Value(body.to_vec())),
        t => Err(Error::Backend(format!(
            "xenstore replied with message type {t} to a request of type {ty}"
        ))),
    }
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

/// Reads one message (header and payload) before `deadline`.
pub fn read_message(fd: BorrowedFd<'_>, deadline: Instant) -> Result<(Header, Vec<u8>)> {
    let mut h = [0u8; HEADER];
    read_exact(fd, &mut h, deadline)?;
    let h = parse_header(&h)?;
    let mut payload = vec![0u8; h.len];
    read_exact(fd, &mut payload, deadline)?;
    Ok((h, payload))
}

/// Sends a request of type `ty` with `args` through an open, non-blocking
/// xenbus file and returns the reply. Watch events that arrive first are
/// handed to `events` (path, token).
pub fn request_fd(
    fd: BorrowedFd<'_>,
    ty: u32,
    args: &[&str],
    timeout: Duration,
    events: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<Reply> {
    send_and_wait(fd, &encode(ty, REQ_ID, args)?, ty, timeout, events)
}

/// [`request_fd`] with a payload given as is (e.g. a write: path, NUL,
/// value); watch events before the reply are dropped.
pub fn request_raw(
    fd: BorrowedFd<'_>,
    ty: u32,
    payload: &[u8],
    timeout: Duration,
) -> Result<Reply> {
    if payload.len() > PAYLOAD_MAX {
        return Err(Error::Invalid("xenstore payload too long".into()));
    }
    let mut req = Vec::with_capacity(HEADER + payload.len());
    req.extend_from_slice(&ty.to_le_bytes());
    req.extend_from_slice(&REQ_ID.to_le_bytes());
    req.extend_from_slice(&0u32.to_le_bytes());
    req.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    req.extend_from_slice(payload);
    send_and_wait(fd, &req, ty, timeout, &mut |_, _| {})
}

fn send_and_wait(
    fd: BorrowedFd<'_>,
    req: &[u8],
    ty: u32,
    timeout: Duration,
    events: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<Reply> {
    let deadline = Instant::now() + timeout;
    write_all(fd, req, deadline)?;
    loop {
        let (h, payload) = read_message(fd, deadline)?;
        if h.ty == XS_WATCH_EVENT {
            if let Some((p, t)) = parse_watch_event(&payload) {
                events(p, t);
            }
            continue;
        }
        return reply(&h, &payload, ty, REQ_ID);
    }
}

/// Whole messages already waiting on a non-blocking xenbus file, without
/// waiting for more: `Ok(None)` when nothing is there.
pub fn try_read_message(fd: BorrowedFd<'_>) -> Result<Option<(Header, Vec<u8>)>> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; no waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r <= 0 {
        return Ok(None);
    }
    if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
        && p.revents & libc::POLLIN == 0
    {
        return Err(Error::Backend("xenstore connection broken".into()));
    }
    // The kernel hands out whole messages: once one started, the rest is
    // there (the deadline only guards against a broken device).
    read_message(fd, Instant::now() + Duration::from_secs(1)).map(Some)
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
    fn requests_with_several_arguments() {
        let r = encode(XS_WATCH, 9, &[RELEASE_DOMAIN, "tok"]).unwrap();
        assert_eq!(&r[0..4], &4u32.to_le_bytes());
        assert_eq!(&r[4..8], &9u32.to_le_bytes());
        assert_eq!(&r[12..16], &19u32.to_le_bytes());
        assert_eq!(&r[16..], b"@releaseDomain\0tok\0");
        assert_eq!(
            encode_read(3, "domid").unwrap(),
            encode(XS_READ, 3, &["domid"]).unwrap()
        );
        assert!(encode(XS_WATCH, 1, &["a", ""]).is_err());
        assert!(encode(XS_WATCH, 1, &["a", &"x".repeat(PAYLOAD_MAX - 2)]).is_err());
    }

    #[test]
    fn watch_events_and_replies() {
        assert_eq!(
            parse_watch_event(b"@releaseDomain\0ivcom\0"),
            Some((&b"@releaseDomain"[..], &b"ivcom"[..]))
        );
        assert_eq!(parse_watch_event(b"x\0"), Some((&b"x"[..], &b""[..])));
        assert_eq!(parse_watch_event(b"no-nul"), None);
        assert_eq!(parse_watch_event(b"\0tok\0"), None);
        let h = parse_header(&header(XS_IS_DOMAIN_INTRODUCED, 4, 2)).unwrap();
        assert_eq!(
            reply(&h, b"F\0", XS_IS_DOMAIN_INTRODUCED, 4).unwrap(),
            Reply::Value(b"F".to_vec())
        );
        assert!(reply(&h, b"F\0", XS_READ, 4).is_err());
        assert!(reply(&h, b"F\0", XS_IS_DOMAIN_INTRODUCED, 5).is_err());
        let e = parse_header(&header(XS_ERROR, 4, 7)).unwrap();
        assert_eq!(
            reply(&e, b"EACCES\0", XS_IS_DOMAIN_INTRODUCED, 4).unwrap(),
            Reply::Error("EACCES".into())
        );
    }

    /// Watch events before the reply are handed over, not taken for it.
    #[test]
    fn request_skips_watch_events() {
        let (ours, theirs) = socketpair();
        let server = std::thread::spawn(move || {
            let mut s = std::os::unix::net::UnixStream::from(theirs);
            s.set_nonblocking(false).unwrap();
            use std::io::{Read, Write};
            let mut req = [0u8; HEADER + 2];
            s.read_exact(&mut req).unwrap();
            assert_eq!(&req[0..4], &XS_IS_DOMAIN_INTRODUCED.to_le_bytes());
            assert_eq!(&req[HEADER..], b"7\0");
            let req_id = u32::from_le_bytes(req[4..8].try_into().unwrap());
            let mut out = header(XS_WATCH_EVENT, 0, 21).to_vec();
            out.extend_from_slice(b"@releaseDomain\0ivcom\0");
            out.extend_from_slice(&header(XS_IS_DOMAIN_INTRODUCED, req_id, 2));
            out.extend_from_slice(b"F\0");
            s.write_all(&out).unwrap();
            // (kept open: a closed socket would read as end of file below)
            s
        });
        let mut seen = Vec::new();
        let r = request_fd(
            ours.as_fd(),
            XS_IS_DOMAIN_INTRODUCED,
            &["7"],
            Duration::from_secs(5),
            &mut |p, t| seen.push((p.to_vec(), t.to_vec())),
        )
        .unwrap();
        let _theirs = server.join().unwrap();
        assert_eq!(r, Reply::Value(b"F".to_vec()));
        assert_eq!(seen, vec![(b"@releaseDomain".to_vec(), b"ivcom".to_vec())]);
        assert!(try_read_message(ours.as_fd()).unwrap().is_none());
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
