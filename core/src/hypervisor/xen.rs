//! The xen backend (grant tables and event channels through /dev/xen).
//! Placeholder until the backend lands: reports that Xen is not supported.

use super::{BackendKind, BellWords, Doorbell, Hypervisor, Region};
use crate::error::{Error, Result};

/// True when this kernel runs as a Xen guest with the grant and event
/// channel devices.
pub fn is_xen_guest() -> bool {
    false
}

/// The xen backend.
pub struct XenBackend;

impl XenBackend {
    /// Opens /dev/xen.
    pub fn open() -> Result<Self> {
        Err(Error::Backend("xen backend not built".into()))
    }
}

impl Hypervisor for XenBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Xen
    }
    fn domain_id(&self) -> u32 {
        0
    }
    fn host_id(&self) -> [u8; 16] {
        [0; 16]
    }
    fn share(&self, _: u32, _: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
        Err(Error::Backend("xen backend not built".into()))
    }
    fn map(&self, _: u32, _: &[u8], _: usize) -> Result<Box<dyn Region>> {
        Err(Error::Backend("xen backend not built".into()))
    }
    fn bell_offer(&self, _: u32, _: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
        Err(Error::Backend("xen backend not built".into()))
    }
    fn bell_accept(&self, _: u32, _: &[u8], _: BellWords) -> Result<Box<dyn Doorbell>> {
        Err(Error::Backend("xen backend not built".into()))
    }
    fn describe(&self) -> String {
        "xen".into()
    }
}
