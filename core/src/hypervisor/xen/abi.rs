//! The Linux UAPI of `/dev/xen/gntalloc`, `/dev/xen/gntdev` and
//! `/dev/xen/evtchn` (kernel headers `xen/gntalloc.h`, `xen/gntdev.h`,
//! `xen/evtchn.h`), and the header of the xenstore wire protocol.
//!
//! Written from the headers: every struct is `#[repr(C)]` with the same
//! fields, in the same order, as the kernel's; `tests/xen_abi.rs` compiles a
//! C program against the installed headers and compares every size, field
//! offset, flag and ioctl number with the values here.
//!
//! The Xen public types (`domid_t`, `grant_ref_t`, `evtchn_port_t`) are
//! defined here too rather than taken from the `xen-sys` crate: `xen-sys`
//! (0.0.0-pre2, the current release) is a `no_std` crate for kernels and
//! unikernels that offers `domid_t` and `evtchn_port_t` but neither
//! `grant_ref_t` nor any of these ioctl structs, and it exports
//! `#[no_mangle]` hypercall functions that reference an external
//! `HYPERCALL_PAGE` symbol: linked into a shared object (the Open MPI
//! component), that symbol stays undefined and the object fails to load. The
//! three aliases below match Xen's public headers (`xen.h`,
//! `grant_table.h`, `event_channel.h`).
//!
//! Two structs end in a flexible array (`gref_ids[1]`, `refs[1]`): the C
//! size, which the ioctl number encodes, includes one element; a request for
//! `n` elements is a buffer of `offset_of(array) + n * size_of(element)`
//! bytes (at least the struct size), built by the callers in `xen.rs`.

/// Xen's `domid_t`.
pub type DomId = u16;
/// Xen's `grant_ref_t`.
pub type GrantRef = u32;
/// Xen's `evtchn_port_t`.
pub type EvtchnPort = u32;

/// First domain id Xen reserves for special meanings (`DOMID_FIRST_RESERVED`);
/// every real domain has a smaller id.
pub const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

/// Grant references below this are reserved for the toolstack
/// (`GNTTAB_NR_RESERVED_ENTRIES`: console and xenstore rings); the kernel
/// never hands them out through gntalloc.
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;

/// Xen's page size, the unit of a grant.
pub const XEN_PAGE_SIZE: usize = 4096;

/// `struct ioctl_gntalloc_alloc_gref`: allocates `count` zeroed pages and
/// grants them to `domid`; returns the mmap offset and one grant reference
/// per page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocAllocGref {
    /// IN: the domain given access.
    pub domid: u16,
    /// IN: `GNTALLOC_FLAG_WRITABLE` or 0.
    pub flags: u16,
    /// IN: number of pages.
    pub count: u32,
    /// OUT: offset for `mmap`.
    pub index: u64,
    /// OUT: the grant references (flexible array of `count`).
    pub gref_ids: [u32; 1],
}

/// `GNTALLOC_FLAG_WRITABLE`: the peer may write the pages.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_dealloc_gref`: removes the grants from the file;
/// the pages go when the last mapping (local or remote) goes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocDeallocGref {
    /// IN: offset returned by the allocation.
    pub index: u64,
    /// IN: number of references.
    pub count: u32,
}

/// `struct ioctl_gntalloc_unmap_notify` (same layout as
/// `struct ioctl_gntdev_unmap_notify`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UnmapNotify {
    /// IN: offset of a byte within the page (as for mmap).
    pub index: u64,
    /// IN: `UNMAP_NOTIFY_*` actions.
    pub action: u32,
    /// IN: event channel to notify.
    pub event_channel_port: u32,
}

/// `UNMAP_NOTIFY_CLEAR_BYTE`: clear the byte at `index` on unmap.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`: notify the event channel on unmap.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `struct ioctl_gntdev_grant_ref`: one grant to map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GntdevGrantRef {
    /// The granting domain (a `__u32` here, unlike gntalloc's `__u16`).
    pub domid: u32,
    /// The grant reference.
    pub r#ref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref`: registers `count` grants; the
/// mapping happens at `mmap` with offset `index`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevMapGrantRef {
    /// IN: number of grants.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// OUT: offset for `mmap`.
    pub index: u64,
    /// IN: the grants (flexible array of `count`).
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`: forgets grants registered at
/// `index` (after `munmap`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevUnmapGrantRef {
    /// IN: offset returned by the map request.
    pub index: u64,
    /// IN: number of pages.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindInterdomain {
    /// The remote domain.
    pub remote_domain: libc::c_uint,
    /// The port the remote domain allocated for us.
    pub remote_port: libc::c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindUnboundPort {
    /// The domain that may bind the port.
    pub remote_domain: libc::c_uint,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnUnbind {
    /// A port bound on this file.
    pub port: libc::c_uint,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnNotify {
    /// A port bound on this file.
    pub port: libc::c_uint,
}

/// `struct xsd_sockmsg`, the header of every xenstore message (Xen's
/// `io/xs_wire.h`; not part of the kernel UAPI headers). Little endian on
/// every architecture Xen runs on; encoded explicitly in `xenstore.rs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsdSockmsg {
    /// `XS_*` message type.
    pub r#type: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id, 0 outside transactions.
    pub tx_id: u32,
    /// Length of the payload that follows.
    pub len: u32,
}

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod layout {
    pub const NONE: u32 = 1;
    pub const DIRSHIFT: u32 = 29;
    pub const SIZEBITS: u32 = 13;
}
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod layout {
    pub const NONE: u32 = 0;
    pub const DIRSHIFT: u32 = 30;
    pub const SIZEBITS: u32 = 14;
}

/// The kernel's `_IOC(_IOC_NONE, ty, nr, size)`.
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << layout::SIZEBITS));
    (layout::NONE << layout::DIRSHIFT) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

const fn size<T>() -> usize {
    std::mem::size_of::<T>()
}

/// `IOCTL_GNTALLOC_ALLOC_GREF`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_none(b'G', 5, size::<GntallocAllocGref>());
/// `IOCTL_GNTALLOC_DEALLOC_GREF`.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_none(b'G', 6, size::<GntallocDeallocGref>());
/// `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc_none(b'G', 7, size::<UnmapNotify>());
/// `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none(b'G', 0, size::<GntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none(b'G', 1, size::<GntdevUnmapGrantRef>());
/// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_none(b'G', 7, size::<UnmapNotify>());
/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc_none(b'E', 1, size::<EvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 = ioc_none(b'E', 2, size::<EvtchnBindUnboundPort>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(b'E', 3, size::<EvtchnUnbind>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(b'E', 4, size::<EvtchnNotify>());
/// `IOCTL_EVTCHN_RESET`: clears the pending-port buffer and its overflow.
pub const IOCTL_EVTCHN_RESET: u32 = ioc_none(b'E', 5, 0);
