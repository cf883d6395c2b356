#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod card;
pub mod channel;
pub mod error;
pub mod frame;
pub mod hypervisor;
pub mod netif;
pub mod node;
pub mod payload;
#[doc(hidden)]
pub mod protocol;
pub mod queue;
pub mod queue_path;
pub mod record;
pub mod ring;
pub mod tcp;

pub use card::{Card, Key};
pub use error::{Error, Result, Violation};
pub use hypervisor::{BackendChoice, BackendKind};
pub use node::{Config, Link, Node, PathKind};
pub use payload::Payload;

/// Largest message accepted from a peer unless configured otherwise (1 GiB).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 30;
