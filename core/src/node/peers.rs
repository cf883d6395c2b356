//! The peer table: the cards this node was given, the state of the link to
//! each peer, and the bounds that keep it small whatever peers do.
//!
//! Only authenticated job members ever get an entry: an unknown or failed
//! connection leaves nothing behind but a log line. Failed entries (kept so
//! that a waiting caller learns why) are evicted after a while.

use super::link::Link;
use crate::card::Card;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Failed entries older than this are dropped.
const FAILED_TTL: Duration = Duration::from_secs(60);
/// At most this many failed entries are kept (the newest).
const MAX_FAILED: usize = 256;

/// The state of the link to one peer.
pub(super) enum State {
    /// A handshake is in progress (started by the peer, or by this side).
    Connecting { by_acceptor: bool },
    /// The peer established a link that the owner has not taken yet.
    Ready(Box<Link>),
    /// The owner holds the link.
    Taken,
    /// The last attempt failed, and why.
    Failed { why: String, at: Instant },
}

#[derive(Default)]
pub(super) struct Peers {
    states: HashMap<u64, State>,
    admitted: HashMap<u64, Card>,
    ready: usize,
    failed: usize,
}

impl Peers {
    /// Records the full card of a peer. A second card for the same id must
    /// describe the same node with the same key. Returns whether the card
    /// is new.
    pub fn admit(&mut self, card: &Card) -> Result<bool> {
        if card.key.is_none() {
            return Err(Error::Invalid(format!(
                "the card of {} has no key: only full cards admit a peer",
                card.label()
            )));
        }
        match self.admitted.get(&card.id) {
            Some(c) if c.same_node(card) && c.key == card.key => Ok(false),
            Some(c) => Err(Error::Invalid(format!(
                "a different card for {} was admitted before",
                c.label()
            ))),
            None => {
                self.admitted.insert(card.id, card.clone());
                Ok(true)
            }
        }
    }

    /// The admitted card of node `id`.
    pub fn admitted(&self, id: u64) -> Option<&Card> {
        self.admitted.get(&id)
    }

    /// How many admitted peers may share this host's memory with `me`
    /// (co-resident: same host, any domain).
    pub fn coresident(&self, me: &Card) -> usize {
        self.admitted
            .values()
            .filter(|c| me.ring_candidate(c))
            .count()
    }

    /// Who draws on one pool of `me`'s domain (e.g. Xen's gntalloc pages
    /// of the domain), each at least 1: the pairs its processes may offer
    /// rings for (every process of the domain, `me` and the admitted peers
    /// in it, to every admitted co-resident peer in another domain), and
    /// the receive queues they may create (one per process of the domain
    /// and co-resident peer domain).
    pub fn pool_users(&self, me: &Card) -> (usize, usize) {
        let (mut local, mut across) = (1usize, 0usize);
        let mut domains = std::collections::HashSet::new();
        for c in self.admitted.values().filter(|c| me.ring_candidate(c)) {
            if c.domain == me.domain {
                local += 1;
            } else {
                across += 1;
                domains.insert(c.domain);
            }
        }
        (
            local.saturating_mul(across).max(1),
            local.saturating_mul(domains.len()).max(1),
        )
    }

    pub fn get(&self, id: u64) -> Option<&State> {
        self.states.get(&id)
    }

    /// Sets the state of `id`, keeping the counters; returns the old one.
    pub fn set(&mut self, id: u64, s: State) -> Option<State> {
        if matches!(s, State::Failed { .. }) {
            self.evict_failed();
        }
        self.count(&s, 1);
        let old = self.states.insert(id, s);
        if let Some(o) = &old {
            self.count(o, -1);
        }
        old
    }

    fn count(&mut self, s: &State, d: isize) {
        match s {
            State::Ready(_) => self.ready = self.ready.wrapping_add_signed(d),
            State::Failed { .. } => self.failed = self.failed.wrapping_add_signed(d),
            _ => {}
        }
    }

    /// Links established by peers and not taken yet.
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Every peer whose link is ready to be taken.
    pub fn ready_ids(&self) -> Vec<u64> {
        self.states
            .iter()
            .filter(|(_, s)| matches!(s, State::Ready(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Some peer whose link is ready to be taken.
    pub fn any_ready(&self) -> Option<u64> {
        self.states
            .iter()
            .find(|(_, s)| matches!(s, State::Ready(_)))
            .map(|(id, _)| *id)
    }

    /// Takes the ready link of `id`.
    pub fn take(&mut self, id: u64) -> Option<Link> {
        if !matches!(self.states.get(&id), Some(State::Ready(_))) {
            return None;
        }
        match self.set(id, State::Taken) {
            Some(State::Ready(l)) => Some(*l),
            _ => unreachable!("checked above"),
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(o) = self.states.remove(&id) {
            self.count(&o, -1);
        }
    }

    /// Drops failed entries that are old, and the oldest beyond the bound.
    fn evict_failed(&mut self) {
        let now = Instant::now();
        let stale: Vec<u64> = self
            .states
            .iter()
            .filter_map(|(id, s)| match s {
                State::Failed { at, .. } if now.duration_since(*at) > FAILED_TTL => Some(*id),
                _ => None,
            })
            .collect();
        for id in stale {
            self.remove(id);
        }
        while self.failed >= MAX_FAILED {
            let oldest = self
                .states
                .iter()
                .filter_map(|(id, s)| match s {
                    State::Failed { at, .. } => Some((*at, *id)),
                    _ => None,
                })
                .min();
            match oldest {
                Some((_, id)) => self.remove(id),
                None => break,
            }
        }
    }

    /// Number of entries (for the bound tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.states.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Key;

    fn card(id: u64) -> Card {
        Card {
            id,
            name: 0,
            backend: None,
            host_id: [0; 16],
            domain: 0,
            addr: "127.0.0.1:1".parse().unwrap(),
            key: Some(Key::random()),
        }
    }

    #[test]
    fn a_card_admits_once_and_conflicting_cards_are_refused() {
        let mut p = Peers::default();
        let c = card(5);
        p.admit(&c).unwrap();
        p.admit(&c).unwrap();
        let mut other = c.clone();
        other.key = Some(Key::random());
        assert!(p.admit(&other).is_err());
        assert!(p.admit(&c.public()).is_err());
        assert_eq!(p.admitted(5), Some(&c));
    }

    #[test]
    fn pool_users_count_this_domain_times_the_others() {
        use crate::hypervisor::BackendKind;
        let at = |id, domain, host| Card {
            backend: Some(BackendKind::Xen),
            host_id: [host; 16],
            domain,
            ..card(id)
        };
        let me = at(1, 1, 7);
        let mut p = Peers::default();
        assert_eq!(p.pool_users(&me), (1, 1));
        // 3 domUs x 2 ranks on host 7, one rank on another host
        for (id, dom, host) in [
            (2, 1, 7),
            (3, 2, 7),
            (4, 2, 7),
            (5, 3, 7),
            (6, 3, 7),
            (9, 4, 8),
        ] {
            p.admit(&at(id, dom, host)).unwrap();
        }
        assert_eq!(p.pool_users(&me), (2 * 4, 2 * 2));
        // a peer with another backend is no ring candidate
        p.admit(&Card {
            backend: Some(BackendKind::Host),
            ..at(10, 5, 7)
        })
        .unwrap();
        assert_eq!(p.pool_users(&me), (2 * 4, 2 * 2));
    }

    #[test]
    fn failed_entries_are_bounded() {
        let mut p = Peers::default();
        for id in 0..(3 * MAX_FAILED as u64) {
            p.set(
                id,
                State::Failed {
                    why: "x".into(),
                    at: Instant::now(),
                },
            );
        }
        assert!(p.len() <= MAX_FAILED, "{}", p.len());
        assert!(p.failed <= MAX_FAILED);
        // the newest survive
        assert!(p.get(3 * MAX_FAILED as u64 - 1).is_some());
    }
}
