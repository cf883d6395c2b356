//! The record header, the one framing word of every path: ring records,
//! TCP frames and handshake messages all start with it.
//!
//! Little-endian u64: bits 0-31 payload length, 32-39 record kind, 40-47
//! tag of the layer above, 48-63 reserved (zero). On a ring the header is
//! followed by the payload padded to 8 bytes; on TCP by the payload alone.

use crate::error::{Result, Violation};

/// Size of a record header.
pub const HEADER: usize = 8;

/// Record kinds.
pub mod kind {
    /// A whole message.
    pub const MSG: u8 = 1;
    /// First fragment of a message larger than a record: payload starts with
    /// the message length as a little-endian u64.
    pub const FIRST: u8 = 2;
    /// A further fragment.
    pub const MORE: u8 = 3;
    /// Control record (handshake messages, close).
    pub const CTRL: u8 = 4;
    /// Space a producer of a receive queue reserved and gave back unused
    /// (a send that was cancelled, or the tail of one that came out
    /// shorter than reserved): passed by the consumer, never surfaces.
    /// Queues only (docs/queue-format.md); a ring or a stream that carries
    /// it is broken (`BadType`).
    pub const SKIP: u8 = 0x7e;
    /// Padding to the end of a ring's data area; never surfaces.
    pub const PAD: u8 = 0x7f;

    /// Kinds that may surface from a ring or a stream (not padding, not
    /// a queue's skipped space).
    #[inline]
    pub fn valid(k: u8) -> bool {
        matches!(k, MSG | FIRST | MORE | CTRL)
    }
}

/// The header word of a record.
#[inline(always)]
pub const fn encode(len: u32, kind: u8, tag: u8) -> u64 {
    len as u64 | (kind as u64) << 32 | (tag as u64) << 40
}

/// The header of a record as bytes (TCP, handshake).
#[inline]
pub fn encode_bytes(len: usize, kind: u8, tag: u8) -> [u8; HEADER] {
    debug_assert!(len <= u32::MAX as usize);
    encode(len as u32, kind, tag).to_le_bytes()
}

/// Splits a header word into `(len, kind, tag)`; the reserved bits are
/// returned as the last element for the caller to check.
#[inline(always)]
pub const fn decode(word: u64) -> (usize, u8, u8, u16) {
    (
        len_of(word) as usize,
        (word >> 32) as u8,
        (word >> 40) as u8,
        (word >> 48) as u16,
    )
}

/// The payload length of a header word (`decode`'s first field), as a u64.
#[inline(always)]
pub const fn len_of(word: u64) -> u64 {
    word & 0xffff_ffff
}

/// Kind and tag of a header word as one number, kind * 256 + tag: a
/// record of kind `k` with a tag below `limit` is exactly a value from
/// `k * 256` to `k * 256 + limit - 1`, so one compare checks both (the
/// ring's batch of whole messages, `Consumer::peek_msgs_with`). The tag is
/// its low byte.
#[inline(always)]
pub const fn kind_tag(word: u64) -> u16 {
    ((word >> 32) as u16).rotate_left(8)
}

/// Parses and validates the header of a stream frame: a known kind other
/// than padding, reserved bits zero, and a length of at most `max`.
pub fn parse(word: u64, max: usize) -> Result<(usize, u8, u8)> {
    let (len, k, tag, reserved) = decode(word);
    if !kind::valid(k) {
        return Err(Violation::BadType.into());
    }
    if len > max || reserved != 0 {
        return Err(Violation::BadLength.into());
    }
    Ok((len, k, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        for (len, k, tag) in [(0, kind::MSG, 0), (u32::MAX, kind::CTRL, 255), (77, 3, 9)] {
            let w = encode(len, k, tag);
            assert_eq!(decode(w), (len as usize, k, tag, 0));
            assert_eq!(u64::from_le_bytes(encode_bytes(len as usize, k, tag)), w);
        }
    }

    #[test]
    fn len_of_and_kind_tag_read_decodes_fields() {
        for (len, k, tag) in [(0, kind::MSG, 0), (u32::MAX, kind::CTRL, 255), (77, 3, 9)] {
            let w = encode(len, k, tag) | 0xbeef << 48;
            assert_eq!(len_of(w), u64::from(len));
            assert_eq!(kind_tag(w), u16::from(k) << 8 | u16::from(tag));
            assert_eq!(kind_tag(w) as u8, tag);
        }
    }

    #[test]
    fn parse_rejects_what_a_stream_may_not_carry() {
        assert_eq!(
            parse(encode(10, kind::MSG, 1), 10).unwrap(),
            (10, kind::MSG, 1)
        );
        assert!(parse(encode(11, kind::MSG, 1), 10).is_err());
        assert!(parse(encode(1, kind::PAD, 1), 10).is_err());
        assert!(parse(encode(1, kind::SKIP, 1), 10).is_err());
        assert!(parse(encode(1, 0, 1), 10).is_err());
        assert!(parse(encode(1, kind::MSG, 1) | 1 << 63, 10).is_err());
    }
}
