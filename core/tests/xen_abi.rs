//! Checks the xen backend's ioctl structs, flags and ioctl numbers against
//! the kernel's UAPI headers (`/usr/include/xen/{gntalloc,gntdev,evtchn}.h`,
//! Debian package `linux-libc-dev`): a small C program prints every size,
//! field offset and constant; the values must equal the Rust side's
//! (`memoffset::offset_of!`, `size_of`, the constants of `abi`).
//!
//! Skips, saying so, only when the headers are not installed (install them
//! with `scripts/deps core`). A missing C compiler is a failure.

use ivcom_core::hypervisor::xen::abi::*;
use memoffset::offset_of;
use std::collections::BTreeMap;
use std::mem::size_of;
use std::path::Path;
use std::process::Command;

const HEADERS: [&str; 3] = [
    "/usr/include/xen/gntalloc.h",
    "/usr/include/xen/gntdev.h",
    "/usr/include/xen/evtchn.h",
];

/// Every checked value: its name (a C expression) and the Rust value.
fn rust_values() -> Vec<(&'static str, u64)> {
    macro_rules! size {
        ($c:literal, $t:ty) => {
            (concat!("sizeof(struct ", $c, ")"), size_of::<$t>() as u64)
        };
    }
    macro_rules! off {
        ($c:literal, $t:ty, $f:ident, $cf:literal) => {
            (
                concat!("offsetof(struct ", $c, ", ", $cf, ")"),
                offset_of!($t, $f) as u64,
            )
        };
        ($c:literal, $t:ty, $f:ident) => {
            (
                concat!("offsetof(struct ", $c, ", ", stringify!($f), ")"),
                offset_of!($t, $f) as u64,
            )
        };
    }
    macro_rules! val {
        ($c:ident) => {
            (stringify!($c), $c as u64)
        };
    }
    vec![
        size!("ioctl_gntalloc_alloc_gref", GntallocAllocGref),
        off!("ioctl_gntalloc_alloc_gref", GntallocAllocGref, domid),
        off!("ioctl_gntalloc_alloc_gref", GntallocAllocGref, flags),
        off!("ioctl_gntalloc_alloc_gref", GntallocAllocGref, count),
        off!("ioctl_gntalloc_alloc_gref", GntallocAllocGref, index),
        off!("ioctl_gntalloc_alloc_gref", GntallocAllocGref, gref_ids),
        (
            "sizeof(((struct ioctl_gntalloc_alloc_gref *)0)->gref_ids[0])",
            size_of::<GrantRef>() as u64,
        ),
        size!("ioctl_gntalloc_dealloc_gref", GntallocDeallocGref),
        off!("ioctl_gntalloc_dealloc_gref", GntallocDeallocGref, index),
        off!("ioctl_gntalloc_dealloc_gref", GntallocDeallocGref, count),
        size!("ioctl_gntalloc_unmap_notify", UnmapNotify),
        off!("ioctl_gntalloc_unmap_notify", UnmapNotify, index),
        off!("ioctl_gntalloc_unmap_notify", UnmapNotify, action),
        off!(
            "ioctl_gntalloc_unmap_notify",
            UnmapNotify,
            event_channel_port
        ),
        size!("ioctl_gntdev_unmap_notify", UnmapNotify),
        off!("ioctl_gntdev_unmap_notify", UnmapNotify, index),
        off!("ioctl_gntdev_unmap_notify", UnmapNotify, action),
        off!("ioctl_gntdev_unmap_notify", UnmapNotify, event_channel_port),
        size!("ioctl_gntdev_grant_ref", GntdevGrantRef),
        off!("ioctl_gntdev_grant_ref", GntdevGrantRef, domid),
        off!("ioctl_gntdev_grant_ref", GntdevGrantRef, r#ref, "ref"),
        size!("ioctl_gntdev_map_grant_ref", GntdevMapGrantRef),
        off!("ioctl_gntdev_map_grant_ref", GntdevMapGrantRef, count),
        off!("ioctl_gntdev_map_grant_ref", GntdevMapGrantRef, pad),
        off!("ioctl_gntdev_map_grant_ref", GntdevMapGrantRef, index),
        off!("ioctl_gntdev_map_grant_ref", GntdevMapGrantRef, refs),
        size!("ioctl_gntdev_unmap_grant_ref", GntdevUnmapGrantRef),
        off!("ioctl_gntdev_unmap_grant_ref", GntdevUnmapGrantRef, index),
        off!("ioctl_gntdev_unmap_grant_ref", GntdevUnmapGrantRef, count),
        off!("ioctl_gntdev_unmap_grant_ref", GntdevUnmapGrantRef, pad),
        size!("ioctl_evtchn_bind_interdomain", EvtchnBindInterdomain),
        off!(
            "ioctl_evtchn_bind_interdomain",
            EvtchnBindInterdomain,
            remote_domain
        ),
        off!(
            "ioctl_evtchn_bind_interdomain",
            EvtchnBindInterdomain,
            remote_port
        ),
        size!("ioctl_evtchn_bind_unbound_port", EvtchnBindUnboundPort),
        off!(
            "ioctl_evtchn_bind_unbound_port",
            EvtchnBindUnboundPort,
            remote_domain
        ),
        size!("ioctl_evtchn_unbind", EvtchnUnbind),
        off!("ioctl_evtchn_unbind", EvtchnUnbind, port),
        size!("ioctl_evtchn_notify", EvtchnNotify),
        off!("ioctl_evtchn_notify", EvtchnNotify, port),
        // The Xen types (the headers use them; the test program defines them
        // as Xen's public headers do).
        ("sizeof(domid_t)", size_of::<DomId>() as u64),
        ("sizeof(grant_ref_t)", size_of::<GrantRef>() as u64),
        ("sizeof(evtchn_port_t)", size_of::<EvtchnPort>() as u64),
        val!(GNTALLOC_FLAG_WRITABLE),
        val!(UNMAP_NOTIFY_CLEAR_BYTE),
        val!(UNMAP_NOTIFY_SEND_EVENT),
        val!(IOCTL_GNTALLOC_ALLOC_GREF),
        val!(IOCTL_GNTALLOC_DEALLOC_GREF),
        val!(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY),
        val!(IOCTL_GNTDEV_MAP_GRANT_REF),
        val!(IOCTL_GNTDEV_UNMAP_GRANT_REF),
        val!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY),
        val!(IOCTL_EVTCHN_BIND_INTERDOMAIN),
        val!(IOCTL_EVTCHN_BIND_UNBOUND_PORT),
        val!(IOCTL_EVTCHN_UNBIND),
        val!(IOCTL_EVTCHN_NOTIFY),
        val!(IOCTL_EVTCHN_RESET),
    ]
}

fn c_program(names: &[&str]) -> String {
    let mut s = String::from(
        "#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n\
         #include <sys/ioctl.h>\n#include <linux/types.h>\n\
         /* Xen's public types, which the UAPI headers use without defining. */\n\
         typedef uint16_t domid_t;\ntypedef uint32_t grant_ref_t;\n\
         typedef uint32_t evtchn_port_t;\n\
         #include <xen/gntalloc.h>\n#include <xen/gntdev.h>\n#include <xen/evtchn.h>\n\
         int main(void) {\n",
    );
    for n in names {
        s.push_str(&format!(
            "  printf(\"%s=%llu\\n\", \"{}\", (unsigned long long)({}));\n",
            n.replace('"', "\\\""),
            n
        ));
    }
    s.push_str("  return 0;\n}\n");
    s
}

#[test]
fn ioctl_abi_matches_kernel_headers() {
    let missing: Vec<&str> = HEADERS
        .iter()
        .copied()
        .filter(|h| !Path::new(h).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED xen ABI check: kernel UAPI headers missing ({}); \
             install linux-libc-dev (scripts/deps core)",
            missing.join(", ")
        );
        return;
    }
    let values = rust_values();
    let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("xen-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(&src, c_program(&names)).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler '{cc}': {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let c: BTreeMap<String, u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    let mut bad = Vec::new();
    for (name, rust) in &values {
        match c.get(*name) {
            Some(cv) if cv == rust => {}
            Some(cv) => bad.push(format!("{name}: C {cv:#x}, Rust {rust:#x}")),
            None => bad.push(format!("{name}: not printed by the C program")),
        }
    }
    assert!(bad.is_empty(), "ABI mismatches:\n  {}", bad.join("\n  "));
    eprintln!(
        "xen ABI: {} sizes, offsets and constants match the kernel headers",
        values.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The flexible arrays: a request for n elements is the fixed part plus n
/// elements, but never less than the C struct (which holds one element and,
/// for gntalloc, 4 bytes of tail padding that the kernel copies in and out).
#[test]
fn flexible_array_requests() {
    assert_eq!(offset_of!(GntallocAllocGref, gref_ids), 16);
    assert_eq!(size_of::<GntallocAllocGref>(), 24);
    assert_eq!(offset_of!(GntdevMapGrantRef, refs), 16);
    assert_eq!(
        offset_of!(GntdevMapGrantRef, refs) + size_of::<GntdevGrantRef>(),
        size_of::<GntdevMapGrantRef>()
    );
}

/// `struct xsd_sockmsg` is not in the kernel headers: four `u32`s.
#[test]
fn xenstore_header_layout() {
    assert_eq!(size_of::<XsdSockmsg>(), 16);
    assert_eq!(offset_of!(XsdSockmsg, r#type), 0);
    assert_eq!(offset_of!(XsdSockmsg, req_id), 4);
    assert_eq!(offset_of!(XsdSockmsg, tx_id), 8);
    assert_eq!(offset_of!(XsdSockmsg, len), 12);
}

// ---------------------------------------------------------------------------
// On real Xen only (skipped elsewhere): the backend end to end.

mod on_xen {
    use ivcom_core::hypervisor::xen::{is_xen_guest, XenBackend};
    use ivcom_core::hypervisor::{BellWords, Doorbell, Hypervisor, Region};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::ptr;
    use std::time::{Duration, Instant};

    const PORT: u16 = 7411;
    const PAGES: usize = 16;
    const LEN: usize = PAGES * 4096;

    fn words() -> BellWords {
        // The xen doorbell ignores the memory words.
        BellWords {
            wait: ptr::null(),
            ring: ptr::null(),
        }
    }

    fn pat_a(i: usize) -> u8 {
        (i * 7 + 3) as u8
    }
    fn pat_b(i: usize) -> u8 {
        (i * 13 + 1) as u8
    }

    fn get(r: &dyn Region, i: usize) -> u8 {
        assert!(i < r.len());
        // SAFETY: i is inside the live mapping.
        unsafe { ptr::read_volatile(r.as_ptr().add(i)) }
    }
    fn put(r: &dyn Region, i: usize, v: u8) {
        assert!(i < r.len());
        // SAFETY: i is inside the live mapping.
        unsafe { ptr::write_volatile(r.as_ptr().add(i), v) }
    }

    /// Waits on `bell` until `ready()`; fails if a wait that should have been
    /// cut short by the peer's notification ran into its time-out.
    fn await_bell(bell: &dyn Doorbell, ready: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let t = bell.prepare();
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if ready() {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: never became ready");
            let start = Instant::now();
            bell.wait(t, Duration::from_secs(20)).unwrap();
            assert!(
                ready() || start.elapsed() < Duration::from_secs(19),
                "{what}: the peer's notification did not wake the wait"
            );
        }
    }

    fn send_blob(s: &mut TcpStream, b: &[u8]) {
        s.write_all(&(b.len() as u32).to_le_bytes()).unwrap();
        s.write_all(b).unwrap();
    }
    fn recv_blob(s: &mut TcpStream) -> Vec<u8> {
        let mut n = [0u8; 4];
        s.read_exact(&mut n).unwrap();
        let n = u32::from_le_bytes(n) as usize;
        assert!(n <= 1 << 20);
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }
    fn sync(s: &mut TcpStream, tag: u8) {
        s.write_all(&[tag]).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], tag, "out of step with the peer");
    }

    fn env(k: &str) -> Option<String> {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    }

    /// Two domUs of scripts/xen-lab (`LAB_ROLE` a or b, `LAB_PEER_DOMID`,
    /// `LAB_PEER_IP`, `LAB_SELF_DOMID`): `a` shares a region and offers a
    /// doorbell, `b` maps and binds; data and notifications go both ways.
    #[test]
    fn xen_lab_pair() {
        let (Some(role), Some(peer), Some(peer_ip)) =
            (env("LAB_ROLE"), env("LAB_PEER_DOMID"), env("LAB_PEER_IP"))
        else {
            eprintln!("SKIPPED xen_lab_pair: not inside scripts/xen-lab (LAB_ROLE unset)");
            return;
        };
        let peer: u32 = peer.parse().unwrap();
        let hv = XenBackend::open().unwrap();
        eprintln!(
            "{}: domain {} ({}), max_share {}",
            role,
            hv.domain_id(),
            hv.describe(),
            hv.max_share()
        );
        if let Some(own) = env("LAB_SELF_DOMID") {
            assert_eq!(hv.domain_id().to_string(), own, "domain id from xenstore");
        }
        assert!(hv.max_share() >= LEN);
        if role == "a" {
            let l = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
            let (region, grant) = hv.share(peer, LEN).unwrap();
            for i in 0..LEN / 2 {
                put(&*region, i, pat_a(i));
            }
            let (bell, bell_desc) = hv.bell_offer(peer, words()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            send_blob(&mut s, &grant);
            send_blob(&mut s, &bell_desc);
            sync(&mut s, b'M'); // b mapped and checked the first half
            region.peer_attached();
            await_bell(&*bell, || get(&*region, LEN - 1) == pat_b(LEN - 1), "a");
            for i in LEN / 2..LEN {
                assert_eq!(get(&*region, i), pat_b(i), "a: byte {i} written by b");
            }
            put(&*region, 0, 0xAA);
            bell.notify().unwrap();
            sync(&mut s, b'D'); // b is done and has dropped its mapping
            drop(bell);
            drop(region);
            eprintln!("xen_lab_pair a: OK");
        } else {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut s = loop {
                match TcpStream::connect((peer_ip.as_str(), PORT)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => panic!("connect to {peer_ip}:{PORT}: {e}"),
                }
            };
            let grant = recv_blob(&mut s);
            let bell_desc = recv_blob(&mut s);
            let region = hv.map(peer, &grant, LEN).unwrap();
            for i in 0..LEN / 2 {
                assert_eq!(get(&*region, i), pat_a(i), "b: byte {i} written by a");
            }
            let bell = hv.bell_accept(peer, &bell_desc, words()).unwrap();
            sync(&mut s, b'M');
            // Let a go to sleep first, so that the notification must wake it.
            std::thread::sleep(Duration::from_millis(500));
            for i in LEN / 2..LEN {
                put(&*region, i, pat_b(i));
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            bell.notify().unwrap();
            await_bell(&*bell, || get(&*region, 0) == 0xAA, "b");
            drop(bell);
            drop(region);
            sync(&mut s, b'D');
            eprintln!("xen_lab_pair b: OK");
        }
    }

    /// One domain with itself: share, map, doorbell both ways. Tells whether
    /// this Xen lets a domain map its own grants (two ranks in one domU).
    #[test]
    fn xen_self_loop() {
        if !is_xen_guest() {
            eprintln!("SKIPPED xen_self_loop: not a Xen guest");
            return;
        }
        let hv = match XenBackend::open() {
            Ok(hv) => hv,
            Err(e) => {
                eprintln!("SKIPPED xen_self_loop: {e}");
                return;
            }
        };
        let me = hv.domain_id();
        let (region, grant) = hv.share(me, LEN).unwrap();
        put(&*region, 5, 0x5A);
        let (bell_a, bell_desc) = hv.bell_offer(me, words()).unwrap();
        match hv.map(me, &grant, LEN) {
            Ok(m) => {
                assert_eq!(get(&*m, 5), 0x5A);
                put(&*m, LEN - 1, 0xA5);
                assert_eq!(get(&*region, LEN - 1), 0xA5);
                eprintln!("xen_self_loop: domain {me} can map its own grants");
            }
            Err(e) => eprintln!("xen_self_loop: domain {me} cannot map its own grants: {e}"),
        }
        let bell_b = hv.bell_accept(me, &bell_desc, words()).unwrap();
        for (from, to) in [(&bell_a, &bell_b), (&bell_b, &bell_a)] {
            let t = to.prepare();
            from.notify().unwrap();
            let start = Instant::now();
            to.wait(t, Duration::from_secs(10)).unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(9),
                "notification lost"
            );
        }
        eprintln!("xen_self_loop: event channel loopback OK");
    }
}
