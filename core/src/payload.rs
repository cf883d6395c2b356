//! A received message's bytes as a view that never lends a reference to
//! memory the peer can still write.
//!
//! A message that travelled in one ring record is delivered in place: its
//! bytes lie in the shared pages, where a hostile peer may rewrite them at
//! any moment. A Rust reference (`&[u8]`) over them would promise the
//! compiler that they do not change while it lives, so [`Payload`] hands
//! out none: the bytes are copied out through a raw pointer, and whatever
//! a copy reads is the message (read once, never re-read). Messages that
//! arrived over TCP or were reassembled from fragments lie in private
//! memory and are viewed the same way, so callers need one code path.

use std::marker::PhantomData;
use std::ptr;

/// The bytes of one received message, valid during the receive callback
/// (or until the message is released).
#[derive(Clone, Copy)]
pub struct Payload<'a> {
    ptr: *const u8,
    len: usize,
    shared: bool,
    _life: PhantomData<&'a [u8]>,
}

impl<'a> Payload<'a> {
    /// A view of `len` bytes at `ptr` in memory a peer may write.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable for `'a`.
    pub unsafe fn shared(ptr: *const u8, len: usize) -> Self {
        Payload {
            ptr,
            len,
            shared: true,
            _life: PhantomData,
        }
    }

    /// A view of private memory.
    pub fn private(b: &'a [u8]) -> Self {
        Payload {
            ptr: b.as_ptr(),
            len: b.len(),
            shared: false,
            _life: PhantomData,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the bytes lie in memory the peer can still write.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Start of the bytes (for a C caller that copies what it parses).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The bytes as a slice when they are private memory.
    pub fn as_private(&self) -> Option<&'a [u8]> {
        // SAFETY: private memory borrowed for 'a (see `private`).
        (!self.shared).then(|| unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// Copies `dst.len()` bytes from offset `off` into `dst`.
    ///
    /// # Panics
    /// When `off + dst.len()` exceeds the message.
    pub fn read_at(&self, off: usize, dst: &mut [u8]) {
        let end = off.checked_add(dst.len()).expect("offset overflow");
        assert!(end <= self.len, "read of {end} bytes from {}", self.len);
        if dst.is_empty() {
            return;
        }
        // SAFETY: in bounds of the view (checked above); a raw copy forms no
        // reference to the source, which may change under us: each byte is
        // read once, into private memory.
        unsafe { ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
    }

    /// Copies all bytes into `dst`, which must have the same length.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "copy_to needs a buffer of the same size"
        );
        self.read_at(0, dst);
    }

    /// Appends all bytes to `v`.
    pub fn append_to(&self, v: &mut Vec<u8>) {
        let at = v.len();
        v.resize(at + self.len, 0);
        self.read_at(0, &mut v[at..]);
    }

    /// The bytes in a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        self.append_to(&mut v);
        v
    }

    /// The view of `len` bytes from `off`.
    ///
    /// # Panics
    /// When the range exceeds the message.
    pub fn slice(&self, off: usize, len: usize) -> Payload<'a> {
        let end = off.checked_add(len).expect("offset overflow");
        assert!(end <= self.len, "slice to {end} of {}", self.len);
        Payload {
            // SAFETY: in bounds (checked above).
            ptr: unsafe { self.ptr.add(off) },
            len,
            shared: self.shared,
            _life: PhantomData,
        }
    }
}

impl std::fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payload")
            .field("len", &self.len)
            .field("shared", &self.shared)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_slices() {
        let b: Vec<u8> = (0..100).collect();
        let p = Payload::private(&b);
        assert_eq!(p.to_vec(), b);
        assert_eq!(p.as_private(), Some(&b[..]));
        let mut d = [0u8; 10];
        p.read_at(5, &mut d);
        assert_eq!(d, *b"\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e");
        assert_eq!(p.slice(90, 10).to_vec(), &b[90..]);
        // SAFETY: b outlives the view.
        let s = unsafe { Payload::shared(b.as_ptr(), b.len()) };
        assert!(s.as_private().is_none() && s.is_shared());
        let mut v = vec![9];
        s.append_to(&mut v);
        assert_eq!(v.len(), 101);
    }

    #[test]
    #[should_panic]
    fn reads_past_the_end_panic() {
        let b = [0u8; 4];
        Payload::private(&b).read_at(2, &mut [0; 3]);
    }
}
