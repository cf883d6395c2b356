//! The TCP path: the same record framing as the ring (8-byte header
//! `{len: u32, type: u8, tag: u8, 0: u16}` + payload, no padding) over a
//! non-blocking socket with TCP_NODELAY. Partial reads and writes are
//! handled; messages larger than a frame are fragmented like ring records.

use crate::error::{Error, Result, Violation};
use crate::frame::{fragment, poll_inbox, take_one, Delivery, Inbox, Reassembly, Stats};
use crate::payload::Payload;
use crate::record::{self, kind, HEADER as RECORD_HEADER};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Default largest frame payload (1 MiB).
pub const DEFAULT_FRAME: usize = 1 << 20;

/// Tag of the `CTRL` frame that announces a clean close.
pub const CTRL_BYE: u8 = 100;

/// Default bound of the send queue: bytes the socket did not take yet.
/// Past it, non-blocking sends report "full" like a full ring.
pub const DEFAULT_MAX_QUEUE: usize = 8 << 20;

/// Parses and validates a frame header.
pub fn parse_header(h: [u8; 8], max: usize) -> Result<(usize, u8, u8)> {
    record::parse(u64::from_le_bytes(h), max)
}

/// A message link over TCP.
pub struct TcpLink {
    sock: TcpStream,
    max_frame: usize,
    /// Bytes queued for sending (socket buffer full).
    out: Vec<u8>,
    out_off: usize,
    /// What was received and not parsed yet.
    rx: StreamParser,
    /// Counters.
    pub stats: Stats,
    closed: bool,
    /// Bound of the send queue for non-blocking sends.
    max_queue: usize,
}

/// What [`StreamParser::parse_next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete message `(tag, pointer, len)` in the parser's memory,
    /// valid until [`StreamParser::release`].
    Msg(u8, *const u8, usize),
    /// More bytes are needed.
    More,
}

/// The receive side of a TCP link without the socket: bytes go in
/// ([`StreamParser::space`], [`StreamParser::filled`]), checked frames and
/// reassembled messages come out. Every header is validated before its
/// length is used; nothing is reserved for a length the peer announced.
pub struct StreamParser {
    /// Unparsed bytes are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
    reasm: Reassembly,
    /// Tags at or above this are protocol violations.
    tag_limit: u16,
    bye_seen: bool,
    /// Frame bytes of a message handed out in place, not yet released.
    pending: usize,
    /// First violation seen; the parser stays broken.
    broken: Option<Violation>,
    /// Counters of delivered messages.
    pub rx_msgs: u64,
    /// Payload bytes delivered.
    pub rx_bytes: u64,
}

impl StreamParser {
    /// A parser of frames of at most `max_frame` payload bytes, and of
    /// messages of at most `max_message`.
    pub fn new(max_frame: usize, max_message: usize) -> Self {
        StreamParser {
            buf: vec![0; (max_frame + RECORD_HEADER).max(256 << 10)],
            start: 0,
            end: 0,
            max_frame,
            reasm: Reassembly::new(max_message),
            tag_limit: 256,
            bye_seen: false,
            pending: 0,
            broken: None,
            rx_msgs: 0,
            rx_bytes: 0,
        }
    }

    fn fail(&mut self, v: Violation) -> Error {
        self.broken.get_or_insert(v);
        Error::Broken(v)
    }

    /// Where the next received bytes go (empty when a whole frame is
    /// buffered and must be parsed first).
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.start == self.end || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written into [`StreamParser::space`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The peer said goodbye and everything before it was parsed.
    pub fn bye(&self) -> bool {
        self.bye_seen
    }

    /// The next complete message, or [`Parsed::More`]. After the peer's
    /// goodbye: [`Error::Closed`] once everything before it was delivered.
    pub fn parse_next(&mut self) -> Result<Parsed> {
        if self.pending > 0 {
            return Err(Error::Invalid("peek_msg before release_msg".into()));
        }
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        loop {
            let avail = self.end - self.start;
            if avail >= RECORD_HEADER {
                let h: [u8; 8] = self.buf[self.start..self.start + 8]
                    .try_into()
                    .expect("8 bytes");
                let (len, k, tag) = match parse_header(h, self.max_frame) {
                    Ok(x) => x,
                    Err(Error::Broken(v)) => return Err(self.fail(v)),
                    Err(e) => return Err(e),
                };
                if k != kind::CTRL && tag as u16 >= self.tag_limit {
                    return Err(self.fail(Violation::BadTag));
                }
                if avail >= RECORD_HEADER + len {
                    let a = self.start + RECORD_HEADER;
                    if k == kind::CTRL {
                        if tag == CTRL_BYE {
                            self.bye_seen = true;
                        }
                        self.start = a + len;
                        continue;
                    }
                    if self.bye_seen {
                        return Err(Error::Protocol("data after the goodbye".into()));
                    }
                    if k == kind::MSG && !self.reasm.active() {
                        self.pending = RECORD_HEADER + len;
                        self.rx_msgs += 1;
                        self.rx_bytes += len as u64;
                        return Ok(Parsed::Msg(tag, self.buf[a..].as_ptr(), len));
                    }
                    let data = Payload::private(&self.buf[a..a + len]);
                    let got = match self.reasm.feed(k, tag, data) {
                        Ok(Delivery::Message(t, m)) => Some((t, m.as_ptr(), m.len())),
                        Ok(Delivery::Partial) => None,
                        Err(Error::Broken(v)) => return Err(self.fail(v)),
                        Err(e) => return Err(e),
                    };
                    self.start = a + len;
                    if let Some((t, p, l)) = got {
                        self.rx_msgs += 1;
                        self.rx_bytes += l as u64;
                        return Ok(Parsed::Msg(t, p, l));
                    }
                    continue;
                }
            }
            if self.bye_seen {
                return if avail == 0 {
                    Err(Error::Closed)
                } else {
                    Err(Error::PeerGone("closed mid-frame".into()))
                };
            }
            return Ok(Parsed::More);
        }
    }

    /// Consumes the message returned by [`StreamParser::parse_next`].
    pub fn release(&mut self) {
        self.start += self.pending;
        self.pending = 0;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

impl TcpLink {
    /// Wraps a connected socket (made non-blocking, TCP_NODELAY).
    pub fn new(sock: TcpStream, max_frame: usize) -> Result<Self> {
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        Ok(TcpLink {
            sock,
            max_frame,
            out: Vec::new(),
            out_off: 0,
            rx: StreamParser::new(max_frame, crate::DEFAULT_MAX_MESSAGE),
            stats: Stats::default(),
            closed: false,
            max_queue: DEFAULT_MAX_QUEUE.max(2 * (max_frame + RECORD_HEADER)),
        })
    }

    /// Sets the tag limit (as [`crate::channel::Channel::set_tag_limit`]).
    pub fn set_tag_limit(&mut self, limit: u16) {
        self.rx.tag_limit = limit;
    }

    /// Sets the bound of the send queue (at least two frames).
    pub fn set_max_queue(&mut self, max: usize) {
        self.max_queue = max.max(2 * (self.max_frame + RECORD_HEADER));
    }

    /// Largest frame payload.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Sets the largest message accepted from the peer.
    pub fn set_max_message(&mut self, max: usize) {
        self.rx.reasm.max_message = max;
    }

    /// The socket's file descriptor (for a poller).
    pub fn fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// Bytes waiting in the send queue.
    pub fn queued(&self) -> usize {
        self.out.len() - self.out_off
    }

    fn write_frame(&mut self, k: u8, tag: u8, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let hdr = record::encode_bytes(len, k, tag);
        let mut skip = 0usize;
        if self.queued() == 0 {
            let mut iov = Vec::with_capacity(parts.len() + 1);
            iov.push(IoSlice::new(&hdr));
            iov.extend(parts.iter().map(|p| IoSlice::new(p)));
            match self.sock.write_vectored(&iov) {
                Ok(n) => skip = n,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(sock_err(e)),
            }
        }
        // Queue whatever the socket did not take.
        let total = RECORD_HEADER + len;
        if skip < total {
            if self.out_off == self.out.len() {
                self.out.clear();
                self.out_off = 0;
            }
            let mut pos = 0usize;
            for piece in std::iter::once(&hdr[..]).chain(parts.iter().copied()) {
                let end = pos + piece.len();
                if end > skip {
                    let from = skip.saturating_sub(pos);
                    self.out.extend_from_slice(&piece[from..]);
                }
                pos = end;
            }
        }
        Ok(())
    }

    /// True when [`TcpLink::try_send`] of `len` bytes would accept now.
    pub fn has_room(&mut self, len: usize) -> Result<bool> {
        if self.queued() > 0 {
            self.flush()?;
        }
        Ok(self.queued() == 0 || self.queued() + len <= self.max_queue)
    }

    /// Sends a message without blocking, if the send queue has room:
    /// writes what the socket takes now and queues the rest, which
    /// [`TcpLink::flush`] or [`TcpLink::poll`] push later. `Ok(false)`, with
    /// nothing sent, while the queue holds more than its bound (the caller
    /// retries, as on a full ring).
    pub fn try_send(&mut self, tag: u8, parts: &[&[u8]]) -> Result<bool> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !self.has_room(len)? {
            return Ok(false);
        }
        self.send_nb(tag, parts)?;
        Ok(true)
    }

    /// Queues `msg` for sending and writes as much as the socket takes now.
    /// Never blocks, never refuses: callers bound the queue themselves
    /// ([`TcpLink::try_send`] or a flush before the next message).
    pub fn send_nb(&mut self, tag: u8, parts: &[&[u8]]) -> Result<()> {
        if let Some(v) = self.rx.broken {
            return Err(Error::Broken(v));
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= self.max_frame {
            self.write_frame(kind::MSG, tag, parts)?;
        } else {
            let msg = parts.concat();
            let max = self.max_frame;
            let mut sent = 0;
            fragment(tag, &msg, max, &mut sent, |k, t, p| {
                self.write_frame(k, t, p).map(|_| true)
            })?;
        }
        self.stats.tx_msgs += 1;
        self.stats.tx_bytes += len as u64;
        Ok(())
    }

    /// Writes queued bytes. Returns `true` when the queue is empty.
    pub fn flush(&mut self) -> Result<bool> {
        while self.out_off < self.out.len() {
            match self.sock.write(&self.out[self.out_off..]) {
                Ok(0) => return Err(Error::PeerGone("socket closed".into())),
                Ok(n) => self.out_off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(sock_err(e)),
            }
        }
        self.out.clear();
        self.out_off = 0;
        Ok(true)
    }

    /// Sends `msg`, blocking until it has left this process; between waits
    /// it checks the peer ([`check_alive`] with `timeout`).
    pub fn send(
        &mut self,
        tag: u8,
        msg: &[u8],
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.send_nb(tag, &[msg])?;
        while !self.flush()? {
            // In slices, asking `alive` between them: a peer that vanished
            // never opens its window again.
            let slice = Instant::now() + Duration::from_millis(100);
            let d = Some(deadline.map_or(slice, |d| d.min(slice)));
            match wait_fd(self.fd(), libc::POLLOUT, d) {
                Err(Error::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => {
                    check_alive(&self.sock, timeout)?
                }
                r => r?,
            }
        }
        Ok(())
    }

    /// The socket (for liveness checks).
    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }

    /// The next complete message, without blocking: `(tag, pointer, len)`
    /// into the receive buffer (or the reassembly buffer), valid until
    /// [`TcpLink::release_msg`], which must be called before the next
    /// `peek_msg`. Sending on this link meanwhile is allowed. Also pushes
    /// queued output.
    pub fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        if self.queued() > 0 {
            self.flush()?;
        }
        loop {
            match self.rx.parse_next()? {
                Parsed::Msg(tag, p, len) => {
                    self.stats.rx_msgs = self.rx.rx_msgs;
                    self.stats.rx_bytes = self.rx.rx_bytes;
                    return Ok(Some((tag, p, len)));
                }
                Parsed::More => {
                    if !self.fill()? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Consumes the message returned by `peek_msg`.
    pub fn release_msg(&mut self) {
        self.rx.release();
    }

    /// Delivers up to `max` complete messages to `f(tag, bytes)` without
    /// blocking. Returns how many were delivered.
    pub fn poll(&mut self, max: usize, f: &mut dyn FnMut(u8, Payload<'_>)) -> Result<usize> {
        poll_inbox(self, max, f)
    }

    /// Reads more bytes; `Ok(false)` when none are available now.
    fn fill(&mut self) -> Result<bool> {
        let space = self.rx.space();
        if space.is_empty() {
            return Ok(false);
        }
        loop {
            match self.sock.read(space) {
                Ok(0) => {
                    return Err(Error::PeerGone("connection closed without goodbye".into()));
                }
                Ok(k) => {
                    self.rx.filled(k);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(sock_err(e)),
            }
        }
    }

    /// Receives one message into `out`, blocking; between waits it checks
    /// the peer ([`check_alive`] with `timeout`). Returns its tag.
    pub fn recv(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<u8> {
        loop {
            if let Some(tag) = take_one(out, |max, f| self.poll(max, f))? {
                return Ok(tag);
            }
            let ev = if self.queued() > 0 {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            };
            let d = Some(match deadline {
                Some(d) => d.min(Instant::now() + Duration::from_millis(100)),
                None => Instant::now() + Duration::from_millis(100),
            });
            match wait_fd(self.fd(), ev, d) {
                Err(Error::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => {
                    check_alive(&self.sock, timeout)?
                }
                r => r?,
            }
        }
    }

    /// Sends the goodbye frame and flushes (bounded by a short time).
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.write_frame(kind::CTRL, CTRL_BYE, &[]).is_ok() {
            let deadline = Some(Instant::now() + Duration::from_secs(2));
            while let Ok(false) = self.flush() {
                if wait_fd(self.fd(), libc::POLLOUT, deadline).is_err() {
                    break;
                }
            }
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

impl Inbox for TcpLink {
    // (messages are copied out of the socket into this link's buffers)
    const PEER_WRITABLE: bool = false;
    #[inline]
    fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        TcpLink::peek_msg(self)
    }
    #[inline]
    fn release_msg(&mut self) -> Result<()> {
        TcpLink::release_msg(self);
        Ok(())
    }
    #[inline]
    fn end_batch(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// Waits for `events` on `fd` until `deadline`.
pub fn wait_fd(fd: i32, events: i16, deadline: Option<Instant>) -> Result<()> {
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(Error::Timeout);
                }
                ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
            }
        };
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Default silence after which a peer is declared gone (see [`watch`]).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(4);

fn setsockopt_int(fd: i32, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> Result<()> {
    // SAFETY: an int option of the given size on our socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            std::ptr::addr_of!(v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Makes the kernel watch the peer of `sock`: keepalive probes every
/// second once the connection has been idle for a second, so that a live
/// peer's kernel answers at least every two seconds even when nothing else
/// flows, and [`check_alive`] can tell silence from quiet. With `abort`
/// (connections that carry no data after the handshake: the ring's control
/// connection), the kernel also gives up by itself after `timeout` without
/// an acknowledgement (TCP_USER_TIMEOUT). Not on data connections: there it
/// would also abort a live peer whose receive window stayed shut that long
/// (a rank busy outside MPI); [`check_alive`] watches those instead.
pub fn watch(sock: &TcpStream, timeout: Duration, abort: bool) -> Result<()> {
    let fd = sock.as_raw_fd();
    let secs = timeout.as_secs().clamp(1, 3600) as libc::c_int;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    // The kernel's own verdict comes a little after ours.
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, secs + 2)?;
    if abort {
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    }
    Ok(())
}

/// Milliseconds since the peer's kernel last acknowledged anything on
/// `sock` (data, a keepalive probe, a window probe).
pub fn silence_ms(sock: &TcpStream) -> Result<u32> {
    // SAFETY: tcp_info is plain data, filled by the kernel up to `len`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO into a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(info.tcpi_last_ack_recv)
}

/// The next byte waiting on `sock`, left there (`MSG_PEEK`), without
/// blocking: `Ok(None)` at end of file, `Err` (`WouldBlock` when nothing
/// waits) otherwise.
pub(crate) fn peek_byte(sock: &TcpStream) -> std::io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    // SAFETY: recv into a 1-byte buffer with MSG_PEEK|MSG_DONTWAIT.
    let r = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match r {
        0 => Ok(None),
        r if r < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(Some(b[0])),
    }
}

/// Checks a connection for a peer that went away, without consuming data:
/// `Ok(())` while the connection is open and, with a `timeout`, while the
/// peer's kernel acknowledged something within it (the connection must be
/// [`watch`]ed, so that an idle one is probed). A peer that is only slow
/// (its process stopped or busy, its VM paused for less than the timeout)
/// still answers, or answers again in time.
pub fn check_alive(sock: &TcpStream, timeout: Option<Duration>) -> Result<()> {
    let r = peek_byte(sock);
    if let Ok(None) = r {
        return Err(Error::PeerGone("connection closed".into()));
    }
    if let Err(e) = r {
        if e.raw_os_error() == Some(libc::ETIMEDOUT) {
            // The kernel gave up first (TCP_USER_TIMEOUT or keepalive on a
            // watched connection): the same silence, told the same way.
            let ms = silence_ms(sock).unwrap_or(0);
            let ms = ms.max(timeout.map_or(0, |t| t.as_millis().min(u128::from(u32::MAX)) as u32));
            return Err(silent(ms));
        }
        if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
            return Err(Error::PeerGone(format!("connection: {e}")));
        }
    }
    if let Some(t) = timeout {
        let ms = silence_ms(sock)?;
        if u128::from(ms) > t.as_millis() {
            return Err(silent(ms));
        }
    }
    Ok(())
}

/// A socket call's error: the kernel's own verdict on a silent peer
/// (ETIMEDOUT from keepalive or TCP_USER_TIMEOUT) is the peer gone, not a
/// timeout to retry.
fn sock_err(e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        return Error::PeerGone("no sign of life (the kernel gave up on the connection: nothing acknowledged; its host or VM may be gone)".into());
    }
    e.into()
}

/// The error for a peer whose kernel acknowledged nothing for `ms`.
fn silent(ms: u32) -> Error {
    Error::PeerGone(format!(
        "no sign of life for {:.1} s (nothing acknowledged; its host or VM may be gone)",
        f64::from(ms) / 1000.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn an_idle_watched_connection_hears_from_a_live_peer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let t = Duration::from_secs(2);
        watch(&a, t, true).unwrap();
        watch(&b, t, false).unwrap();
        // Idle for longer than the timeout: the keepalive probes (every
        // second after a second) keep the silence short on both ends.
        std::thread::sleep(Duration::from_millis(3500));
        for s in [&a, &b] {
            let ms = silence_ms(s).unwrap();
            assert!(ms < 2000, "{ms} ms without an acknowledgement");
            check_alive(s, Some(t)).unwrap();
        }
        drop(b);
        std::thread::sleep(Duration::from_millis(50));
        let e = check_alive(&a, Some(t)).unwrap_err();
        assert!(matches!(e, Error::PeerGone(_)), "{e}");
    }
}
