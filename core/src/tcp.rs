//! The TCP path: the same record framing as the ring (8-byte header
//! `{len: u32, type: u8, tag: u8, 0: u16}` + payload, no padding) over a
//! non-blocking socket with TCP_NODELAY. Partial reads and writes are
//! handled; messages larger than a frame are fragmented like ring records.

use crate::channel::Alive;
use crate::error::{Error, Result, Violation};
use crate::frame::{fragment, take_one, Delivery, Reassembly, Stats};
use crate::ring::{kind, RECORD_HEADER};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Default largest frame payload (1 MiB).
pub const DEFAULT_FRAME: usize = 1 << 20;

/// Tag of the `CTRL` frame that announces a clean close.
pub const CTRL_BYE: u8 = 10;

fn header(len: usize, k: u8, tag: u8) -> [u8; 8] {
    (len as u64 | (k as u64) << 32 | (tag as u64) << 40).to_le_bytes()
}

/// Parses and validates a frame header.
pub fn parse_header(h: [u8; 8], max: usize) -> Result<(usize, u8, u8)> {
    let v = u64::from_le_bytes(h);
    let len = (v & 0xffff_ffff) as usize;
    let k = (v >> 32) as u8;
    let tag = (v >> 40) as u8;
    if !matches!(k, kind::MSG | kind::FIRST | kind::MORE | kind::CTRL) {
        return Err(Violation::BadType.into());
    }
    if len > max || v >> 48 != 0 {
        return Err(Violation::BadLength.into());
    }
    Ok((len, k, tag))
}

/// A message link over TCP.
pub struct TcpLink {
    sock: TcpStream,
    max_frame: usize,
    /// Bytes queued for sending (socket buffer full).
    out: Vec<u8>,
    out_off: usize,
    /// Receive buffer: unparsed bytes are `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    reasm: Reassembly,
    /// Counters.
    pub stats: Stats,
    closed: bool,
    bye_seen: bool,
    /// Frame bytes of a message handed out in place, not yet released.
    pending: usize,
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
            inbuf: vec![0; (max_frame + RECORD_HEADER).max(256 << 10)],
            in_start: 0,
            in_end: 0,
            reasm: Reassembly::new(crate::DEFAULT_MAX_MESSAGE),
            stats: Stats::default(),
            closed: false,
            bye_seen: false,
            pending: 0,
        })
    }

    /// Largest frame payload.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Sets the largest message accepted from the peer.
    pub fn set_max_message(&mut self, max: usize) {
        self.reasm.max_message = max;
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
        let hdr = header(len, k, tag);
        let mut skip = 0usize;
        if self.queued() == 0 {
            let mut iov = Vec::with_capacity(parts.len() + 1);
            iov.push(IoSlice::new(&hdr));
            iov.extend(parts.iter().map(|p| IoSlice::new(p)));
            match self.sock.write_vectored(&iov) {
                Ok(n) => skip = n,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
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

    /// Queues `msg` for sending and writes as much as the socket takes now.
    /// Never blocks; [`TcpLink::flush`] or [`TcpLink::poll`] push the rest.
    pub fn send_nb(&mut self, tag: u8, parts: &[&[u8]]) -> Result<()> {
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
                Err(e) => return Err(e.into()),
            }
        }
        self.out.clear();
        self.out_off = 0;
        Ok(true)
    }

    /// Sends `msg`, blocking until it has left this process.
    pub fn send(&mut self, tag: u8, msg: &[u8], deadline: Option<Instant>) -> Result<()> {
        self.send_nb(tag, &[msg])?;
        while !self.flush()? {
            wait_fd(self.fd(), libc::POLLOUT, deadline)?;
        }
        Ok(())
    }

    /// The next complete message, without blocking: `(tag, pointer, len)`
    /// into the receive buffer (or the reassembly buffer), valid until
    /// [`TcpLink::release_msg`], which must be called before the next
    /// `peek_msg`. Sending on this link meanwhile is allowed. Also pushes
    /// queued output.
    pub fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>> {
        if self.pending > 0 {
            return Err(Error::Invalid("peek_msg before release_msg".into()));
        }
        if self.queued() > 0 {
            self.flush()?;
        }
        loop {
            let avail = self.in_end - self.in_start;
            if avail >= RECORD_HEADER {
                let h: [u8; 8] = self.inbuf[self.in_start..self.in_start + 8]
                    .try_into()
                    .expect("8 bytes");
                let (len, k, tag) = parse_header(h, self.max_frame)?;
                if avail >= RECORD_HEADER + len {
                    let a = self.in_start + RECORD_HEADER;
                    if k == kind::CTRL {
                        if tag == CTRL_BYE {
                            self.bye_seen = true;
                        }
                        self.in_start = a + len;
                        continue;
                    }
                    if k == kind::MSG && !self.reasm.active() {
                        self.pending = RECORD_HEADER + len;
                        self.stats.rx_msgs += 1;
                        self.stats.rx_bytes += len as u64;
                        return Ok(Some((tag, self.inbuf[a..].as_ptr(), len)));
                    }
                    let got = match self.reasm.feed(k, tag, &self.inbuf[a..a + len])? {
                        Delivery::Message(t, m) => Some((t, m.as_ptr(), m.len())),
                        Delivery::Partial => None,
                    };
                    self.in_start = a + len;
                    if let Some((t, p, l)) = got {
                        self.stats.rx_msgs += 1;
                        self.stats.rx_bytes += l as u64;
                        return Ok(Some((t, p, l)));
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
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Consumes the message returned by `peek_msg`.
    pub fn release_msg(&mut self) {
        self.in_start += self.pending;
        self.pending = 0;
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// Delivers up to `max` complete messages to `f(tag, bytes)` without
    /// blocking. Returns how many were delivered.
    pub fn poll(&mut self, max: usize, f: &mut dyn FnMut(u8, &[u8])) -> Result<usize> {
        let mut n = 0;
        while n < max {
            let Some((tag, p, len)) = self.peek_msg()? else {
                break;
            };
            // SAFETY: p/len describe the message until release_msg.
            f(tag, unsafe { std::slice::from_raw_parts(p, len) });
            self.release_msg();
            n += 1;
        }
        Ok(n)
    }

    /// Reads more bytes; `Ok(false)` when none are available now.
    fn fill(&mut self) -> Result<bool> {
        if self.in_start > 0 && (self.in_start == self.in_end || self.in_end == self.inbuf.len()) {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.in_end == self.inbuf.len() {
            return Ok(false);
        }
        loop {
            match self.sock.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => {
                    return Err(Error::PeerGone("connection closed without goodbye".into()));
                }
                Ok(k) => {
                    self.in_end += k;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one message into `out`, blocking. Returns its tag.
    pub fn recv(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
        alive: Alive,
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
                Err(Error::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => alive()?,
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

/// Checks a socket for a peer that went away, without consuming data.
/// `Ok(())` while the connection is open.
pub fn check_alive(sock: &TcpStream) -> Result<()> {
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
    if r == 0 {
        return Err(Error::PeerGone("control connection closed".into()));
    }
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
            return Err(Error::PeerGone(format!("control connection: {e}")));
        }
    }
    Ok(())
}
