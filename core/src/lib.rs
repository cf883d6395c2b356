#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
pub mod hypervisor;
#[doc(hidden)]
pub mod protocol;
pub mod ring;

pub use error::{Error, Result, Violation};
