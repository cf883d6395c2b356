//! Rings that fit: a pair's rings shrink (and then their records) until
//! the backend can share them, down to a floor; where one pool serves a
//! whole domain (Xen's gntalloc), each pair offers at most its fair share.

use crate::channel::{region_bytes, Channel, Offer};
use crate::error::Result;
use crate::hypervisor::Hypervisor;
use crate::ring::Geometry;

/// Offers a channel with geometry `geo`, or with smaller rings when the
/// backend cannot share that much: its fixed limit (`max_share`, e.g.
/// gntalloc's page limit per domain) is respected up front, and a failed
/// share (no room left now, e.g. pages held by other links) is retried with
/// half the rings while that remains a valid geometry whose largest record
/// is at least `min_record` ([`Geometry::halved`]). Returns the offer (or
/// the last error) and, when the rings were shrunk, why.
pub(super) fn offer_fitted(
    hv: &dyn Hypervisor,
    peer: u32,
    asked: Geometry,
    min_record: usize,
    nonce: u64,
) -> (Result<Offer>, Option<String>) {
    let mut geo = halve_to_fit(asked, hv.max_share(), min_record);
    let mut why = (geo != asked).then(|| {
        format!(
            "{} bytes exceed what {} can share ({})",
            region_bytes(asked),
            hv.describe(),
            hv.max_share()
        )
    });
    loop {
        match Channel::offer(hv, peer, geo, nonce) {
            Ok(o) => return (Ok(o), why),
            Err(e) => match geo.halved(min_record) {
                Some(g) => {
                    why = Some(e.to_string());
                    geo = g;
                }
                None => return (Err(e), why),
            },
        }
    }
}

/// `geo`, halved (rings, then records, not below `min_record`) until one
/// pair's region fits `pool / pairs`: the share of a pool (e.g. gntalloc's
/// page limit of a domain, which all of the domain's processes draw on)
/// that leaves room for `pairs` pairs, so the last pair to connect finds as
/// much as the first. Returns the geometry and, when it was shrunk, why.
/// (Below the floor the pair offers the floor and relies on
/// [`offer_fitted`]'s retry.)
pub(super) fn fair_geometry(
    asked: Geometry,
    pool: usize,
    pairs: usize,
    min_record: usize,
    what: &str,
) -> (Geometry, Option<String>) {
    let geo = halve_to_fit(asked, pool / pairs.max(1), min_record);
    let why = (geo != asked)
        .then(|| format!("a fair share of {what}'s pool: {pool} bytes over {pairs} pairs"));
    (geo, why)
}

/// Where a pool serves a whole domain (Xen's gntalloc) and a pair's fair
/// share of it holds no rings at the record floor (`share`, the rings'
/// region at the floor), a receive queue per process and peer domain
/// instead: `queues` of them (every process of the domain, for every peer
/// domain) share the pool. Returns the queue geometry of the largest
/// power-of-two data area up to `largest` whose region fits that share,
/// with records as large as `record` (the rings') and at least
/// `min_record`; `None` when rings fit their share, or when no queue does.
pub(super) fn crowded_queue(
    pool: usize,
    ring_share: usize,
    ring_region: usize,
    queues: usize,
    record: usize,
    min_record: usize,
    largest: usize,
) -> Option<crate::queue::Geometry> {
    use crate::queue::{Geometry as Q, CTRL_BYTES, MIN_DATA};
    if ring_region <= ring_share {
        return None;
    }
    let share = pool / queues.max(1);
    let mut size = largest.next_power_of_two();
    while size >= MIN_DATA {
        if CTRL_BYTES + size <= share {
            return Q::with_records_up_to(size, record)
                .ok()
                .filter(|q| q.max_record >= min_record);
        }
        size /= 2;
    }
    None
}

/// `geo`, halved ([`Geometry::halved`]: rings, then records, not below
/// `min_record`) while its region is larger than `limit`, or as far as it
/// goes.
fn halve_to_fit(mut geo: Geometry, limit: usize, min_record: usize) -> Geometry {
    while region_bytes(geo) > limit {
        match geo.halved(min_record) {
            Some(g) => geo = g,
            None => break,
        }
    }
    geo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::hypervisor::host::HostBackend;
    use crate::hypervisor::{BackendKind, BellWords, Doorbell, Region};

    /// The host backend with a fixed share limit (`max_share`, like Xen's
    /// gntalloc limit) and a smaller room left at share time, in a
    /// directory of its own that goes with it.
    struct Limited {
        inner: HostBackend,
        max_share: usize,
        room: usize,
        dir: std::path::PathBuf,
    }

    impl Drop for Limited {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Hypervisor for Limited {
        fn kind(&self) -> BackendKind {
            self.inner.kind()
        }
        fn domain_id(&self) -> u32 {
            self.inner.domain_id()
        }
        fn host_id(&self) -> [u8; 16] {
            self.inner.host_id()
        }
        fn share(&self, peer: u32, len: usize) -> Result<(Box<dyn Region>, Vec<u8>)> {
            if len > self.room {
                return Err(Error::Backend(format!("no room for {len} bytes")));
            }
            self.inner.share(peer, len)
        }
        fn map(&self, peer: u32, desc: &[u8], len: usize) -> Result<Box<dyn Region>> {
            self.inner.map(peer, desc, len)
        }
        fn bell_offer(&self, peer: u32, w: BellWords) -> Result<(Box<dyn Doorbell>, Vec<u8>)> {
            self.inner.bell_offer(peer, w)
        }
        fn bell_accept(&self, peer: u32, d: &[u8], w: BellWords) -> Result<Box<dyn Doorbell>> {
            self.inner.bell_accept(peer, d, w)
        }
        fn describe(&self) -> String {
            "limited".into()
        }
        fn max_share(&self) -> usize {
            self.max_share
        }
    }

    #[test]
    fn a_fair_share_leaves_room_for_every_pair() {
        const MIB: usize = 1 << 20;
        let geo = Geometry::new(2 * MIB).unwrap();
        // one pair alone: the whole pool (4 MiB: rings of 2 MiB do not fit
        // with their control pages, rings of 1 MiB do)
        let (g, why) = fair_geometry(geo, 4 * MIB, 1, 4096, "xen:domain 1");
        assert_eq!(g.data_size as usize, MIB);
        assert!(why.unwrap().contains("4194304 bytes over 1 pairs"));
        // 2 processes x 4 peers in other domains: 8 regions fit the pool
        let (g, _) = fair_geometry(geo, 4 * MIB, 8, 4096, "xen:domain 1");
        assert!(8 * region_bytes(g) <= 4 * MIB, "{g:?}");
        assert_eq!(g.data_size as usize, 128 << 10);
        // far too many pairs: the floor, never less
        let (g, _) = fair_geometry(geo, 4 * MIB, 100_000, 4096, "xen:domain 1");
        assert!(g.max_record as usize >= 4096);
        assert!(g.halved(4096).is_none());
        // a pool big enough: unchanged
        let (g, why) = fair_geometry(geo, 1 << 40, 8, 4096, "x");
        assert_eq!(g, geo);
        assert!(why.is_none());
    }

    /// 8 domUs of 8 ranks on gntalloc's default pool of 1,024 pages: a
    /// pair's share holds no rings at the default floor (records of 8 KiB
    /// + 128 B), and 56 queues of 64 KiB (17 pages each) fit.
    #[test]
    fn a_crowded_pool_takes_queues_that_fit() {
        let pool = 1024 * 4096;
        let floor = 8192 + 128;
        let geo = Geometry::new(MIB).unwrap();
        let pairs = 8 * 56;
        let (ring, _) = fair_geometry(geo, pool, pairs, floor, "xen:domain 1");
        let ring_region = region_bytes(ring);
        assert!(ring_region > pool / pairs, "{ring:?}");
        let q = crowded_queue(pool, pool / pairs, ring_region, 8 * 7, 32 << 10, floor, MIB)
            .expect("a queue fits");
        assert_eq!(q.data_size, 64 << 10);
        // half the area less a header, in whole cells
        assert_eq!(q.max_record, 32752);
        assert!(56 * q.region_bytes() <= pool);
        // records no larger than the rings': 8 KiB + 128 B
        let q = crowded_queue(pool, pool / pairs, ring_region, 56, floor, floor, MIB).unwrap();
        assert_eq!(q.max_record, floor);
        // never larger than asked
        let q = crowded_queue(
            pool,
            pool / pairs,
            ring_region,
            2,
            32 << 10,
            floor,
            128 << 10,
        )
        .unwrap();
        assert_eq!(q.data_size, 128 << 10);
        // rings that fit their share: no queue
        let (ring, _) = fair_geometry(geo, pool, 8, floor, "xen:domain 1");
        assert!(
            crowded_queue(pool, pool / 8, region_bytes(ring), 8, 32 << 10, floor, MIB).is_none()
        );
        // so crowded that no queue holds records of the floor: none
        assert!(crowded_queue(pool, 4096, ring_region, 512, 32 << 10, floor, MIB).is_none());
    }

    fn limited(tag: &str, max_share: usize, room: usize) -> Limited {
        let dir = std::env::temp_dir().join(format!("ivcom-fit-{tag}-{}", std::process::id()));
        Limited {
            inner: HostBackend::open_dir(&dir).unwrap(),
            max_share,
            room,
            dir,
        }
    }

    const MIB: usize = 1 << 20;

    fn data_size(r: &Result<Offer>) -> usize {
        r.as_ref().unwrap().channel.geometry().data_size as usize
    }

    #[test]
    fn rings_fit_the_backends_share_limit() {
        // 2 MiB rings (two rings + control pages: 4 MiB + 8 KiB) on a 4 MiB
        // limit, records of 256 KiB: 1 MiB rings.
        let hv = limited("limit", 4 * MIB, usize::MAX);
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), MIB);
        assert!(why.unwrap().contains("exceed what limited can share"));
    }

    #[test]
    fn rings_shrink_when_the_backend_has_no_room_now() {
        let hv = limited("room", usize::MAX, 3 * MIB);
        let geo = Geometry::with_max_record(4 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), MIB);
        assert!(why.unwrap().contains("no room"));
    }

    #[test]
    fn rings_never_shrink_below_the_largest_record() {
        // 512 KiB records need rings of at least 2 MiB (a record fits in
        // half a ring): the offer fails with the backend's error.
        let hv = limited("floor", 4 * MIB, usize::MAX);
        let geo = Geometry::new(2 * MIB).unwrap();
        let (r, _) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        let e = r.err().expect("no ring of 2 MiB fits");
        assert!(
            e.to_string().contains("exceed what limited can share"),
            "{e}"
        );
    }

    #[test]
    fn records_shrink_down_to_the_floor_when_rings_must() {
        // 2 MiB rings of 256 KiB records, floor 8 KiB. With 3 MiB of room
        // (other links hold the rest) 1 MiB rings keep their records; with
        // 600 KiB, 256 KiB rings get records of 128 KiB - 8 (the largest
        // that fits in half a ring).
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let hv = limited("rec1", 4 * MIB, 3 * MIB);
        let (r, _) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (MIB as u32, 256 << 10));
        let hv = limited("rec2", 4 * MIB, 600 << 10);
        let (r, why) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (256 << 10, (128 << 10) - 8));
        assert!(why.unwrap().contains("no room"));
    }

    #[test]
    fn records_never_shrink_below_the_floor() {
        // 40 KiB of room: 16 KiB rings (two rings + control pages: 40 KiB)
        // would fit, but their records of 8 KiB - 8 are below the floor of
        // 8 KiB: no offer.
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let hv = limited("rec3", 4 * MIB, 40 << 10);
        let (r, _) = offer_fitted(&hv, 1, geo, 8 << 10, 7);
        assert!(r
            .err()
            .expect("no ring fits")
            .to_string()
            .contains("no room"));
        // the same room with a 4000-byte floor: 16 KiB rings
        let hv = limited("rec4", 4 * MIB, 40 << 10);
        let (r, _) = offer_fitted(&hv, 1, geo, 4000, 7);
        let g = r.unwrap().channel.geometry();
        assert_eq!((g.data_size, g.max_record), (16 << 10, (8 << 10) - 8));
    }

    #[test]
    fn halving_keeps_a_valid_geometry() {
        let mut g = Geometry::with_max_record(4 * MIB, 256 << 10).unwrap();
        let mut sizes = Vec::new();
        while let Some(h) = g.halved(1024) {
            assert!(Geometry::with_max_record(h.data_size as usize, h.max_record as usize).is_ok());
            assert!(h.max_record <= g.max_record && h.max_record >= 1024);
            sizes.push(h.data_size);
            g = h;
        }
        // down to the smallest data area (4 KiB, records of 2 KiB - 8)
        assert_eq!(*sizes.last().unwrap() as usize, crate::ring::MIN_DATA);
        assert_eq!(
            Geometry::with_max_record(2 * MIB, 256 << 10)
                .unwrap()
                .halved(256 << 10),
            Some(Geometry::with_max_record(MIB, 256 << 10).unwrap())
        );
        assert_eq!(
            Geometry::with_max_record(MIB, 256 << 10)
                .unwrap()
                .halved(256 << 10),
            None
        );
    }

    #[test]
    fn rings_that_fit_are_left_alone() {
        let hv = limited("fits", 8 * MIB, usize::MAX);
        let geo = Geometry::with_max_record(2 * MIB, 256 << 10).unwrap();
        let (r, why) = offer_fitted(&hv, 1, geo, geo.max_record as usize, 7);
        assert_eq!(data_size(&r), 2 * MIB);
        assert!(why.is_none());
    }
}
