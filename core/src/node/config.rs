//! The configuration of a node.

use crate::card::{Card, Key};
use crate::channel::WaitPolicy;
use crate::error::{Error, Result};
use crate::hypervisor::BackendChoice;
use crate::netif::IfSpec;
use crate::ring::Geometry;
use crate::tcp;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A sink for verbose messages.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Looks up the full card (with its key) that the job published for a
/// node name, or `None` when the name is not a member of the job. Called
/// from the node's handshake threads, only for a peer that already proved
/// that it knows this node's key.
pub type Resolver = Arc<dyn Fn(u64) -> Option<Card> + Send + Sync>;

/// Configuration of a node. `Default` works without tuning.
#[derive(Clone)]
pub struct Config {
    /// Backend choice (`auto`: xen on a Xen guest, host otherwise).
    pub backend: BackendChoice,
    /// Hypervisor directory of the host backend.
    pub host_dir: Option<PathBuf>,
    /// Data bytes of each ring direction (power of two).
    pub ring_size: usize,
    /// Largest record payload (default: a quarter of the ring).
    pub max_record: Option<usize>,
    /// Smallest largest-record a pair's rings may be shrunk to when the
    /// backend cannot share the configured ones (Xen's gntalloc page limit,
    /// a share limit), and the smallest an offered ring must have to be
    /// accepted. `None`: the configured largest record (rings shrink only
    /// while they still hold it) and no check on offers. A caller that
    /// sends at most `n` bytes per [`crate::Link::try_send`] /
    /// [`crate::Link::reserve`] may set `n` here: links then stay on a
    /// (smaller) ring instead of falling back to TCP.
    pub min_record: Option<usize>,
    /// Bytes of rings the host backend may share at once (`None`: no
    /// limit); a pair's rings shrink to fit, as under Xen's gntalloc limit.
    pub share_limit: Option<usize>,
    /// Bytes of ring data this node's producers share (`None`: each ring
    /// whole): each ring's records stay within `budget / rings` of it, at
    /// least two of its largest records, so a process with many peers
    /// touches few pages of each ring however much is in flight
    /// ([`crate::ring::Budget`]).
    pub ring_budget: Option<usize>,
    /// The queue path (docs/design.md, "The queue path"): `Some(n)`, a
    /// co-resident pair talks through receive queues, one per process and
    /// peer domain of `n` data bytes (a power of two, 4 KiB to 1 GiB),
    /// shared by all that domain's processes, instead of a pair of rings
    /// of its own; `None` (the default), through rings, except on Xen where
    /// a pair's fair share of gntalloc's page pool holds no rings at the
    /// record floor: such pairs take queues that fit the pool
    /// (docs/design.md, "A crowded pool").
    pub queue_size: Option<usize>,
    /// Xen: whether pairs whose fair share of gntalloc's pool holds no
    /// rings at the record floor take receive queues that fit the pool
    /// (`true`, the default; docs/design.md, "A crowded pool"), or offer
    /// rings while the pool holds them and then use TCP (`false`). No
    /// effect where `queue_size` is set, nor on other backends.
    pub crowded_queues: bool,
    /// Interfaces or subnets to publish an address from.
    pub if_include: Vec<IfSpec>,
    /// Interfaces or subnets never to publish.
    pub if_exclude: Vec<IfSpec>,
    /// Explicit address to listen on (overrides the interface lists).
    pub listen: Option<IpAddr>,
    /// TCP port to listen on (0: any free port).
    pub port: u16,
    /// Time allowed for connecting and the whole handshake.
    pub connect_timeout: Duration,
    /// Silence after which a peer is declared gone: its kernel acknowledged
    /// nothing (data, keepalive probe) for this long, as when its host or
    /// VM is destroyed or cut off. A peer that is only slow (a process
    /// stopped, a VM paused for less) is not. `None`: only a closed
    /// connection counts.
    pub peer_timeout: Option<Duration>,
    /// Largest TCP frame payload.
    pub tcp_frame: usize,
    /// Bound of a TCP link's send queue (bytes not yet taken by the
    /// socket); non-blocking sends report "full" past it.
    pub tcp_queue: usize,
    /// Largest message accepted from a peer (larger ones break the link).
    pub max_message: usize,
    /// Tags at or above this break the link (256: every tag is valid).
    pub tag_limit: u16,
    /// Wait policy of blocking calls.
    pub wait: WaitPolicy,
    /// Where verbose messages go (none: silent).
    pub log: Option<LogFn>,
    /// The owner's name for this node, published in its card (Open MPI:
    /// the process name); peers' resolvers look it up.
    pub name: u64,
    /// A secret shared by every node of the job: nodes that know it are
    /// peers of each other without exchanging cards (each node's key is
    /// derived from it and the node's id), and [`crate::Node::connect`]
    /// by address works. `None`: only admitted or resolved cards.
    pub psk: Option<Key>,
    /// Looks up the card of a peer that connects before it was admitted.
    pub resolve: Option<Resolver>,
    /// Connections that have not authenticated yet, at most; a new one
    /// beyond this closes the oldest.
    pub max_preauth: usize,
    /// Authenticated handshakes (ring set-up) in progress at once, at most;
    /// further peers are told to retry.
    pub max_handshakes: usize,
    /// Links peers established that the owner has not taken yet, at most;
    /// further peers are told to retry.
    pub max_unclaimed: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendChoice::Auto,
            host_dir: None,
            ring_size: 1 << 20,
            max_record: None,
            min_record: None,
            share_limit: None,
            ring_budget: None,
            queue_size: None,
            crowded_queues: true,
            if_include: Vec::new(),
            if_exclude: Vec::new(),
            listen: None,
            port: 0,
            connect_timeout: Duration::from_secs(30),
            peer_timeout: Some(tcp::DEFAULT_PEER_TIMEOUT),
            tcp_frame: tcp::DEFAULT_FRAME,
            tcp_queue: tcp::DEFAULT_MAX_QUEUE,
            max_message: crate::DEFAULT_MAX_MESSAGE,
            tag_limit: 256,
            wait: WaitPolicy::default(),
            log: None,
            name: 0,
            psk: None,
            resolve: None,
            max_preauth: 64,
            max_handshakes: 64,
            max_unclaimed: 4096,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("host_dir", &self.host_dir)
            .field("ring_size", &self.ring_size)
            .field("max_record", &self.max_record)
            .field("min_record", &self.min_record)
            .field("queue_size", &self.queue_size)
            .field("crowded_queues", &self.crowded_queues)
            .field("listen", &self.listen)
            .field("name", &self.name)
            .field("psk", &self.psk.as_ref().map(|_| "(set)"))
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The ring geometry this configuration asks for (an error names the
    /// parameter that is out of range).
    pub fn geometry(&self) -> Result<Geometry> {
        let geo = match self.max_record {
            Some(m) => Geometry::with_max_record(self.ring_size, m)?,
            None => Geometry::new(self.ring_size)?,
        };
        if let Some(m) = self.min_record {
            if m > geo.max_record as usize {
                return Err(Error::Invalid(format!(
                    "smallest record {m} exceeds the largest record {}",
                    geo.max_record
                )));
            }
        }
        Ok(geo)
    }

    /// Checks everything a node needs before it starts.
    pub fn check(&self) -> Result<()> {
        self.geometry()?;
        self.queue_geometry()?;
        if self.tcp_frame < 64 || self.tcp_frame > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "TCP frame of {} bytes (64 to 4 GiB)",
                self.tcp_frame
            )));
        }
        if self.max_preauth == 0 || self.max_handshakes == 0 || self.max_unclaimed == 0 {
            return Err(Error::Invalid(
                "connection limits must be at least 1".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::Invalid("connect timeout of zero".into()));
        }
        if self
            .peer_timeout
            .is_some_and(|t| t < Duration::from_secs(1))
        {
            return Err(Error::Invalid(
                "peer timeout below 1 s (a live peer is probed once a second)".into(),
            ));
        }
        Ok(())
    }

    /// The geometry of this node's receive queues (`None`: no queue path):
    /// records as large as the rings' up to half the data area.
    pub fn queue_geometry(&self) -> Result<Option<crate::queue::Geometry>> {
        let Some(size) = self.queue_size else {
            return Ok(None);
        };
        let geo =
            crate::queue::Geometry::with_records_up_to(size, self.geometry()?.max_record as usize)
                .map_err(|e| Error::Invalid(format!("queue size {size}: {e}")))?;
        let max_record = geo.max_record;
        if let Some(m) = self.min_record.filter(|&m| m > max_record) {
            return Err(Error::Invalid(format!(
                "queues of {size} bytes carry records of at most {max_record} bytes, below the smallest record {m}"
            )));
        }
        Ok(Some(geo))
    }

    /// The smallest largest-record rings may shrink to.
    pub(super) fn record_floor(&self, geo: Geometry) -> usize {
        self.min_record.unwrap_or(geo.max_record as usize)
    }

    /// How long a connection may take to authenticate.
    pub(super) fn preauth_timeout(&self) -> Duration {
        self.connect_timeout.min(Duration::from_secs(10))
    }
}
