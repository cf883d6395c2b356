//! Typed errors of the transport core.

use std::fmt;
use std::io;

/// Why a ring was declared broken. Every variant is something the peer wrote
/// into the shared pages (or failed to write); none is a local bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The control page does not carry the ring magic.
    BadMagic,
    /// The control page carries a wire-format version we do not speak.
    BadVersion,
    /// The geometry in the control page differs from the one agreed.
    BadGeometry,
    /// The peer's index moved backwards or further than the ring size.
    BadIndex,
    /// A record header names a length beyond the largest record or beyond the
    /// data that was published.
    BadLength,
    /// A record header names an unknown record type.
    BadType,
    /// A padding record does not end exactly at the end of the ring.
    BadPadding,
    /// A record sequence (fragments of one message) is out of order.
    BadSequence,
    /// A record carries a tag at or above the limit of the layer above.
    BadTag,
    /// A record of a receive queue names no producer slot of the queue.
    BadSender,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Violation::BadMagic => "bad ring magic",
            Violation::BadVersion => "unsupported ring or queue version",
            Violation::BadGeometry => "ring geometry changed",
            Violation::BadIndex => "peer index out of range",
            Violation::BadLength => "record length out of range",
            Violation::BadType => "unknown record type",
            Violation::BadPadding => "malformed padding record",
            Violation::BadSequence => "fragments out of sequence",
            Violation::BadTag => "tag out of range",
            Violation::BadSender => "record names no producer of the queue",
        };
        f.write_str(s)
    }
}

/// Errors of the transport core.
#[derive(Debug)]
pub enum Error {
    /// The peer violated the ring protocol; the link is broken for good.
    Broken(Violation),
    /// The peer closed the link cleanly.
    Closed,
    /// The peer is gone (connection reset, end of file, process died).
    PeerGone(String),
    /// A blocking call ran out of time.
    Timeout,
    /// A message or record is larger than the path allows.
    TooLarge { len: usize, max: usize },
    /// A bad argument or configuration value.
    Invalid(String),
    /// The hypervisor backend could not do what was asked.
    Backend(String),
    /// The peer sent something unexpected on the control connection.
    Protocol(String),
    /// An operating-system error.
    Io(io::Error),
    /// Authentication failed, or the peer refused this node.
    Auth(String),
    /// An error on the link to a named peer.
    AtPeer(String, Box<Error>),
}

impl Error {
    /// A stable small integer for the C ABI (negative values).
    pub fn code(&self) -> i32 {
        match self {
            Error::Broken(_) => -2,
            Error::Closed => -3,
            Error::PeerGone(_) => -4,
            Error::Timeout => -5,
            Error::TooLarge { .. } => -6,
            Error::Invalid(_) => -7,
            Error::Backend(_) => -8,
            Error::Protocol(_) => -9,
            Error::Io(_) => -10,
            Error::Auth(_) => -11,
            Error::AtPeer(_, e) => e.code(),
        }
    }

    /// True when the link can never carry another message.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::AtPeer(_, e) => e.is_fatal(),
            e => !matches!(
                e,
                Error::Timeout | Error::TooLarge { .. } | Error::Invalid(_)
            ),
        }
    }

    /// The error without the peer it was reported for.
    pub fn inner(&self) -> &Error {
        match self {
            Error::AtPeer(_, e) => e.inner(),
            e => e,
        }
    }

    /// The error, naming `peer` (once).
    pub fn at_peer(self, peer: impl FnOnce() -> String) -> Error {
        match self {
            e @ Error::AtPeer(..) => e,
            e => Error::AtPeer(peer(), Box::new(e)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Broken(v) => write!(f, "link broken: {v}"),
            Error::Closed => f.write_str("link closed by peer"),
            Error::PeerGone(s) => write!(f, "peer gone: {s}"),
            Error::Timeout => f.write_str("timed out"),
            Error::TooLarge { len, max } => write!(f, "message of {len} bytes exceeds {max}"),
            Error::Invalid(s) => write!(f, "invalid: {s}"),
            Error::Backend(s) => write!(f, "backend: {s}"),
            Error::Protocol(s) => write!(f, "protocol: {s}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Auth(s) => write!(f, "authentication: {s}"),
            Error::AtPeer(p, e) => write!(f, "peer {p}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Error::PeerGone(e.to_string()),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout,
            _ => Error::Io(e),
        }
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::Broken(v)
    }
}

/// Result alias of the core.
pub type Result<T> = std::result::Result<T, Error>;
