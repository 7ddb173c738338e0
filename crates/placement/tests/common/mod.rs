//! Map builders shared by the integration tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use store_types::map::{ClusterMap, FailureDomain, HostBucket, OsdId, OsdInfo, Pool, PoolId};

/// An OSD spec for [`build_map`]: (id, host index, weight, up, in).
pub type OsdSpec = (OsdId, usize, u32, bool, bool);

/// A map with hosts `host0..host{hosts-1}` and the given OSDs, buckets kept consistent.
pub fn build_map(hosts: usize, osds: &[OsdSpec]) -> ClusterMap {
    let mut map = ClusterMap::new("test");
    for h in 0..hosts {
        let name = format!("host{h}");
        let mut ids: Vec<OsdId> = osds.iter().filter(|o| o.1 == h).map(|o| o.0).collect();
        ids.sort_unstable();
        let bucket = HostBucket {
            id: -2 - h as i32,
            name: name.clone(),
            osds: ids,
        };
        map.crush.hosts.insert(name, bucket);
    }
    for &(id, host, weight, up, is_in) in osds {
        map.osds.insert(
            id,
            OsdInfo {
                id,
                uuid: format!("uuid-{id}"),
                addr: String::new(),
                host: format!("host{host}"),
                weight,
                up,
                is_in,
                up_from: 0,
                down_stamp_ms: None,
            },
        );
        map.next_osd_id = map.next_osd_id.max(id + 1);
    }
    map
}

pub fn pool(id: PoolId, size: u32, pg_num: u32, failure_domain: FailureDomain) -> Pool {
    Pool {
        id,
        name: format!("pool{id}"),
        size,
        min_size: size - size / 2,
        pg_num,
        failure_domain,
        created_epoch: 0,
    }
}

/// The frozen golden map: 4 hosts × 3 OSDs with distinct weights, osd.4 out, osd.7 down,
/// osd.10 with weight 0.
pub fn golden_map() -> ClusterMap {
    const W: u32 = 0x10000;
    build_map(
        4,
        &[
            (0, 0, W, true, true),
            (1, 0, W, true, true),
            (2, 0, 2 * W, true, true),
            (3, 1, W / 2, true, true),
            (4, 1, W, true, false),
            (5, 1, 3 * W, true, true),
            (6, 2, W, true, true),
            (7, 2, W, false, true),
            (8, 2, W + W / 4, true, true),
            (9, 3, 4 * W, true, true),
            (10, 3, 0, true, true),
            (11, 3, W, true, true),
        ],
    )
}
