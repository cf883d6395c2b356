//! Messages over a receive queue: the sending end of one producer slot
//! ([`QueueTx`]) and the receiving end of a whole queue ([`QueueRx`]),
//! which reassembles each slot's messages apart.
//!
//! A queue (`crate::queue`) carries records; a message larger than a record
//! travels as a `FIRST` record and `MORE` records of one slot, as on a ring
//! ([`crate::frame::fragment`]), and records of other slots may come
//! between them. The receiving end keeps one [`Reassembly`] per admitted
//! slot and hands each complete message up with the slot it came from.
//!
//! Trust. A slot is one peer rank (a pair's link); a slot whose records
//! break the framing (a `MORE` with no `FIRST`, a total above the limit, a
//! fragment longer than announced) breaks that slot alone, with the named
//! error, and its later records are passed over: the other ranks of its
//! domain keep their traffic. A record that breaks the queue's own rules
//! (a header naming no slot of the queue, a bad type or length, padding
//! that does not run to the end) breaks the whole queue, as on a ring:
//! nothing read after it could be trusted to lie where it says. A record
//! of a slot that is not admitted (no handshake gave it to a rank) breaks
//! the queue as well (`BadSender`): only the job's ranks write there.
//!
//! Used by the queue path (`crate::node`, docs/design.md, "The queue
//! path").

use crate::error::{Error, Result, Violation};
use crate::frame::{fragment, Delivery, Reassembly};
use crate::payload::Payload;
use crate::queue::{Consumer, Producer, Record, Wake, BATCH_BYTES};
use crate::record::kind;

/// One slot's receiving state.
struct Slot {
    re: Reassembly,
    /// Why the slot broke, until the layer above takes it.
    error: Option<Error>,
    broken: bool,
}

/// The receiving end of a queue: every admitted slot's messages.
pub struct QueueRx {
    c: Consumer,
    slots: Vec<Option<Slot>>,
    /// Tags at or above this break the slot that sent them (the layer
    /// above indexes a table by the tag).
    tag_limit: u16,
    /// Slots whose error is not taken yet.
    unreported: usize,
}

impl QueueRx {
    /// The receiving end over a queue's consumer, for messages with tags
    /// below `tag_limit` (256: any); no slot admitted yet.
    pub fn new(c: Consumer, slots: usize, tag_limit: u16) -> QueueRx {
        QueueRx {
            c,
            slots: (0..slots.min(crate::queue::MAX_SLOTS))
                .map(|_| None)
                .collect(),
            tag_limit,
            unreported: 0,
        }
    }

    /// Admits `slot` (a rank the handshake gave it to), with messages of
    /// at most `max_message` bytes, and learns again which admitted
    /// producers may sleep ([`Consumer::learn_peers`]).
    pub fn admit(&mut self, slot: usize, max_message: usize) -> Result<()> {
        let Some(s) = self.slots.get_mut(slot) else {
            return Err(Error::Invalid(format!("no slot {slot} in this queue")));
        };
        *s = Some(Slot {
            re: Reassembly::new(max_message),
            error: None,
            broken: false,
        });
        let admitted: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        self.c.learn_peers(admitted);
        Ok(())
    }

    /// The error that broke `slot`, once (`None` while it is well).
    pub fn take_slot_error(&mut self, slot: usize) -> Option<Error> {
        let e = self.slots.get_mut(slot)?.as_mut()?.error.take()?;
        self.unreported -= 1;
        Some(e)
    }

    /// The consumer's index when the queue is at rest: every record taken
    /// released (nothing held) and no slot's error waiting to be taken;
    /// `None` otherwise. Whether a record waits there is for the caller to
    /// look ([`Consumer::watch`]); whether released space waits to be
    /// handed back, [`Consumer::unpublished`].
    pub fn at_rest(&self) -> Option<u64> {
        (self.unreported == 0 && !self.c.holds()).then(|| self.c.index())
    }

    /// Bytes released and not handed back yet.
    pub fn unpublished(&self) -> u64 {
        self.c.unpublished()
    }

    /// Whether `slot` is admitted and broken.
    pub fn slot_broken(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Some(s)) if s.broken)
    }

    /// The queue's consumer (its doorbell, its sleep, `blocked`).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.c
    }

    /// The queue's next records while they are whole messages of `slot`
    /// (admitted, not in the middle of a message in fragments) with a tag
    /// below the limit: up to `max`, each handed to `put` (its index in
    /// the run, from 0, and the record: its payload in the shared pages,
    /// to be handed up in place), and records after the first only while
    /// the run holds less than [`BATCH_BYTES`]. Returns how many. They stay taken until
    /// [`QueueRx::release_taken`], and nothing else may read the queue
    /// meanwhile. `Ok(0)` when the next record is anything else or there
    /// is none ([`QueueRx::poll`] takes those, and hands space back); a
    /// record past the first that breaks the queue ends the run, and the
    /// next poll reports it.
    #[inline(always)]
    pub fn take_own(
        &mut self,
        slot: usize,
        max: usize,
        put: impl FnMut(usize, &Record),
    ) -> Result<usize> {
        if max == 0 || !matches!(self.slots.get(slot), Some(Some(s)) if !s.broken && !s.re.active())
        {
            return Ok(0);
        }
        // Up to BATCH_BYTES of records (the first whatever its size):
        // their space goes back only with the whole run, and producers
        // waiting for it would wait for every message of a long one.
        self.c.peek_run(slot, self.tag_limit, max, BATCH_BYTES, put)
    }

    /// Releases the records [`QueueRx::take_own`] handed out; hands the
    /// space back once [`BATCH_BYTES`] wait and more records follow (a
    /// stream, whose producers may wait for room), or a quarter of the
    /// queue waits; otherwise (nothing after them: a ping-pong, whose
    /// answer this process is about to send) the next look at the idle
    /// queue does, off the answer's path (clearing a large record's space
    /// waits for every line of it). Returns the producers to ring.
    #[inline]
    pub fn release_taken(&mut self) -> Wake {
        self.c.release_last_quiet();
        let due = self.c.unpublished();
        if due >= BATCH_BYTES && (due >= self.c.data_size() / 4 || self.c.more_waiting()) {
            self.c.flush()
        } else {
            Wake::default()
        }
    }

    /// Delivers up to `max` complete messages to `f(slot, tag, bytes)`
    /// without blocking (each view valid during its call), in the order the
    /// queue holds them, and hands the space back in batches: after
    /// [`BATCH_BYTES`] and whenever the queue has nothing more. Returns the
    /// messages delivered and the producers to ring (those that sleep for
    /// room). `Err`: the queue is broken for good.
    pub fn poll(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(usize, u8, Payload<'_>),
    ) -> Result<(usize, Wake)> {
        let mut wake: Wake = Default::default();
        let mut or = |w: Wake| {
            for (a, b) in wake.iter_mut().zip(w) {
                *a |= b;
            }
        };
        let mut n = 0;
        let mut flushed = false;
        while n < max {
            let Some(r) = self.c.peek()? else {
                // Nothing now: hand back what was taken, which may also be
                // what kept the consumer from reading on (a whole data area
                // taken quietly), then look once more.
                if flushed || self.c.unpublished() == 0 {
                    break;
                }
                or(self.c.flush());
                flushed = true;
                continue;
            };
            let Some(Some(slot)) = self.slots.get_mut(r.slot) else {
                return Err(self.c.poison(Violation::BadSender));
            };
            if !slot.broken {
                // SAFETY: the record's payload lies in the queue's data
                // area until it is released below; the view ends with the
                // call (`feed` copies fragments out, `f` whole messages).
                let data = unsafe { Payload::shared(r.ptr, r.len) };
                match slot.re.feed(r.kind, r.tag, data) {
                    Ok(Delivery::Message(tag, m)) if u16::from(tag) < self.tag_limit => {
                        f(r.slot, tag, m);
                        n += 1;
                    }
                    Ok(Delivery::Message(..)) => {
                        slot.error = Some(Error::Broken(Violation::BadTag));
                        slot.broken = true;
                        self.unreported += 1;
                    }
                    Ok(Delivery::Partial) => {}
                    Err(e) => {
                        slot.error = Some(e);
                        slot.broken = true;
                        self.unreported += 1;
                    }
                }
            }
            self.c.release_quiet(&r);
            if self.c.unpublished() >= BATCH_BYTES {
                or(self.c.flush());
            }
        }
        Ok((n, wake))
    }
}

/// The sending end of one slot of a peer's queue.
pub struct QueueTx {
    p: Producer,
    max_record: usize,
}

impl QueueTx {
    /// The sending end over a producer whose queue takes records of at
    /// most `max_record` payload bytes (more than 8).
    pub fn new(p: Producer, max_record: usize) -> Result<QueueTx> {
        if max_record <= 8 {
            return Err(Error::Invalid(format!(
                "queue records of {max_record} bytes cannot carry fragments"
            )));
        }
        Ok(QueueTx { p, max_record })
    }

    /// The producer (its doorbell, its sleep).
    pub fn producer(&mut self) -> &mut Producer {
        &mut self.p
    }

    /// Sends `msg` as one record or in fragments, without blocking:
    /// `sent` counts the bytes already sent (start at 0; come back with
    /// the same counter after `Ok(false)`, the queue full for now). Returns
    /// `Ok(true)` once all of it is in the queue, and sets `*ring` when
    /// the consumer sleeps and must be rung.
    pub fn try_send(
        &mut self,
        tag: u8,
        msg: &[u8],
        sent: &mut usize,
        ring: &mut bool,
    ) -> Result<bool> {
        let p = &mut self.p;
        fragment(tag, msg, self.max_record, sent, |k, t, parts| {
            debug_assert!(k != kind::PAD);
            match p.push(k, t, parts)? {
                Some(r) => {
                    *ring |= r;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }
}
