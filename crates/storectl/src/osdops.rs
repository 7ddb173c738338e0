//! Operator procedures on OSDs, computed from the map the monitors serve:
//! - what `out`, `in` or `reweight` would move, before anything moves (`--dry-run`);
//! - `ok-to-stop`: would stopping these OSDs leave any PG below min_size?
//! - `safe-to-destroy`: is no data left only on these OSDs?
//! - `purge`: remove an OSD for good, refused while it is not safe.

use std::collections::BTreeSet;

use anyhow::bail;
use serde_json::json;
use store_placement::pool_mappings;
use store_types::map::{ClusterMap, CrushWeight, HostBucket, OsdId, OsdInfo};
use store_types::msg::{MapCommand, StatusReport};

use crate::output::{human_bytes, print_json};
use crate::Format;

/// What a map change would move.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Movement {
    pub pgs_total: u64,
    /// PGs whose CRUSH set changes.
    pub pgs_remapped: u64,
    /// PG copies that would be written on an OSD that does not hold them now.
    pub replicas_moved: u64,
}

/// Compares each PG's CRUSH set (in OSDs, down ones included: data moves when OSDs are
/// marked out, not when they go down) before and after.
pub fn movement(before: &ClusterMap, after: &ClusterMap) -> Movement {
    let mut m = Movement::default();
    for pool in before.pools.values() {
        let Some(pool_after) = after.pools.get(&pool.id) else {
            continue;
        };
        let was = pool_mappings(before, pool);
        let will = pool_mappings(after, pool_after);
        for (a, b) in was.iter().zip(&will) {
            m.pgs_total += 1;
            if a.raw != b.raw {
                m.pgs_remapped += 1;
            }
            let old: BTreeSet<OsdId> = a.raw.iter().copied().collect();
            m.replicas_moved += b.raw.iter().filter(|o| !old.contains(o)).count() as u64;
        }
    }
    m
}

/// Average bytes of one PG copy, from the OSDs' reported usage.
fn bytes_per_replica(map: &ClusterMap, status: &StatusReport) -> u64 {
    let replicas: u64 = map
        .pools
        .values()
        .map(|p| u64::from(p.pg_num) * u64::from(p.size))
        .sum();
    status.used_bytes / replicas.max(1)
}

/// The map as it would be after `cmd` (only the commands a dry run supports).
pub fn simulate(map: &ClusterMap, cmd: &MapCommand) -> anyhow::Result<ClusterMap> {
    let mut after = map.clone();
    let osd = |after: &mut ClusterMap, id: OsdId| -> anyhow::Result<()> {
        if !after.osds.contains_key(&id) {
            bail!("osd.{id} does not exist");
        }
        Ok(())
    };
    match cmd {
        MapCommand::OsdOut { ids } | MapCommand::OsdIn { ids } => {
            let is_in = matches!(cmd, MapCommand::OsdIn { .. });
            for id in ids {
                osd(&mut after, *id)?;
                after.osds.get_mut(id).expect("checked").is_in = is_in;
            }
        }
        MapCommand::OsdReweight { id, weight } => {
            osd(&mut after, *id)?;
            after.osds.get_mut(id).expect("checked").weight = *weight;
        }
        other => bail!("no dry run for {other:?}"),
    }
    Ok(after)
}

/// The map as it would be with `count` new OSDs of `weight` on `host` (new or existing).
pub fn simulate_add(
    map: &ClusterMap,
    host: &str,
    count: u32,
    weight: CrushWeight,
) -> anyhow::Result<ClusterMap> {
    if host.is_empty() || count == 0 {
        bail!("name a host and at least one OSD to add");
    }
    let mut after = map.clone();
    for _ in 0..count {
        let id = after
            .next_osd_id
            .max(after.osds.keys().max().map_or(0, |m| m + 1));
        after.next_osd_id = id + 1;
        after.osds.insert(
            id,
            OsdInfo {
                id,
                uuid: format!("dry-run-{id}"),
                addr: String::new(),
                host: host.to_string(),
                weight,
                up: true,
                is_in: true,
                up_from: after.epoch,
                down_stamp_ms: None,
            },
        );
        let next_bucket = after.crush.next_bucket_id;
        let bucket = after
            .crush
            .hosts
            .entry(host.to_string())
            .or_insert_with(|| HostBucket {
                id: next_bucket,
                name: host.to_string(),
                osds: Vec::new(),
            });
        bucket.osds.push(id);
        if bucket.id == next_bucket {
            after.crush.next_bucket_id -= 1;
        }
    }
    Ok(after)
}

pub fn print_dry_run(
    format: Format,
    map: &ClusterMap,
    status: &StatusReport,
    cmd: &MapCommand,
) -> anyhow::Result<()> {
    print_movement(format, map, status, &simulate(map, cmd)?);
    Ok(())
}

/// Prints what going from `map` to `after` would move.
pub fn print_movement(format: Format, map: &ClusterMap, status: &StatusReport, after: &ClusterMap) {
    let m = movement(map, after);
    let bytes = m.replicas_moved * bytes_per_replica(map, status);
    match format {
        Format::Json => print_json(&json!({
            "dry_run": true,
            "pgs_total": m.pgs_total,
            "pgs_remapped": m.pgs_remapped,
            "replicas_moved": m.replicas_moved,
            "bytes_moved_estimate": bytes,
        })),
        Format::Plain => println!(
            "dry run: {} of {} PGs would be remapped, {} PG copies written elsewhere (~{} from current usage); nothing changed",
            m.pgs_remapped,
            m.pgs_total,
            m.replicas_moved,
            human_bytes(bytes)
        ),
    }
}

/// PGs that would have fewer than min_size OSDs up if `ids` stopped.
pub fn ok_to_stop(map: &ClusterMap, ids: &[OsdId]) -> anyhow::Result<Vec<String>> {
    let mut after = map.clone();
    for id in ids {
        match after.osds.get_mut(id) {
            Some(o) => o.up = false,
            None => bail!("osd.{id} does not exist"),
        }
    }
    let mut bad = Vec::new();
    for pool in after.pools.values() {
        for (seed, m) in pool_mappings(&after, pool).iter().enumerate() {
            if m.acting.len() < pool.min_size as usize {
                bad.push(format!(
                    "{}.{seed:x} would have {} of min_size {} OSDs up",
                    pool.id,
                    m.acting.len(),
                    pool.min_size
                ));
            }
        }
    }
    Ok(bad)
}

/// Why destroying `ids` could lose data (empty: safe).
pub fn safe_to_destroy(
    map: &ClusterMap,
    status: &StatusReport,
    ids: &[OsdId],
) -> anyhow::Result<Vec<String>> {
    let mut reasons = Vec::new();
    for id in ids {
        let Some(o) = map.osds.get(id) else {
            bail!("osd.{id} does not exist");
        };
        if o.is_in {
            reasons.push(format!(
                "osd.{id} is in: mark it out (`storectl osd out {id}`) so its data moves first"
            ));
        }
        let still: usize = map
            .pools
            .values()
            .map(|p| {
                pool_mappings(map, p)
                    .iter()
                    .filter(|m| m.raw.contains(id) || m.acting.contains(id))
                    .count()
            })
            .sum();
        if still > 0 {
            reasons.push(format!("{still} PGs still map to osd.{id}"));
        }
    }
    let unclean: u64 = status
        .pgs_by_state
        .iter()
        .filter(|(s, _)| s.as_str() != "active+clean")
        .map(|(_, n)| n)
        .sum();
    if unclean > 0 {
        reasons.push(format!(
            "{unclean} PGs are not active+clean: data may still be moving or missing a copy"
        ));
    }
    Ok(reasons)
}

/// Prints a verdict; an unfavourable one is an error (non-zero exit), as Ceph's EBUSY.
pub fn verdict(
    format: Format,
    what: &str,
    ids: &[OsdId],
    reasons: &[String],
) -> anyhow::Result<()> {
    let names: Vec<String> = ids.iter().map(|i| format!("osd.{i}")).collect();
    let ok = reasons.is_empty();
    match format {
        Format::Json => print_json(&json!({ what: ok, "osds": ids, "reasons": reasons })),
        Format::Plain if ok => println!(
            "{} {} {what}",
            names.join(", "),
            if ids.len() > 1 { "are" } else { "is" }
        ),
        Format::Plain => {}
    }
    if !ok {
        let shown: Vec<&String> = reasons.iter().take(10).collect();
        let more = reasons.len().saturating_sub(shown.len());
        bail!(
            "{} not {what}: {}{}",
            names.join(", "),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use store_types::map::{Pool, WEIGHT_ONE};

    fn cluster(hosts: u32) -> ClusterMap {
        let mut m = ClusterMap::new("f");
        for id in 0..hosts {
            m.osds.insert(
                id,
                OsdInfo {
                    id,
                    uuid: format!("u{id}"),
                    addr: String::new(),
                    host: format!("h{id}"),
                    weight: WEIGHT_ONE,
                    up: true,
                    is_in: true,
                    up_from: 1,
                    down_stamp_ms: None,
                },
            );
            m.crush.hosts.insert(
                format!("h{id}"),
                HostBucket {
                    id: -2 - id as i32,
                    name: format!("h{id}"),
                    osds: vec![id],
                },
            );
        }
        m.pools.insert(
            1,
            Pool {
                id: 1,
                name: "p".into(),
                size: 3,
                min_size: 2,
                pg_num: 64,
                failure_domain: store_types::map::FailureDomain::Host,
                created_epoch: 1,
            },
        );
        m
    }

    #[test]
    fn out_moves_only_the_copies_of_that_osd() {
        let m = cluster(6);
        let after = simulate(&m, &MapCommand::OsdOut { ids: vec![2] }).unwrap();
        let mv = movement(&m, &after);
        let on_two = pool_mappings(&m, &m.pools[&1])
            .iter()
            .filter(|p| p.raw.contains(&2))
            .count() as u64;
        assert_eq!(mv.pgs_remapped, on_two);
        assert_eq!(
            mv.replicas_moved, on_two,
            "one new copy per PG that lost one"
        );
        assert_eq!(
            movement(&m, &m),
            Movement {
                pgs_total: 64,
                ..Default::default()
            }
        );
    }

    #[test]
    fn adding_a_host_moves_only_copies_onto_it() {
        let m = cluster(6);
        let after = simulate_add(&m, "h9", 2, WEIGHT_ONE).unwrap();
        assert_eq!(after.osds.len(), 8);
        assert_eq!(after.crush.hosts["h9"].osds, vec![6, 7]);
        let mv = movement(&m, &after);
        let onto_new = pool_mappings(&after, &after.pools[&1])
            .iter()
            .filter(|p| p.raw.iter().any(|o| *o >= 6))
            .count() as u64;
        // Host failure domain: one copy per PG at most lands on the new host.
        assert_eq!(mv.replicas_moved, onto_new);
        assert!(mv.pgs_remapped > 0 && mv.pgs_remapped < 64, "{mv:?}");
        assert!(simulate_add(&m, "", 1, WEIGHT_ONE).is_err());
    }

    #[test]
    fn stopping_two_of_three_is_not_ok_and_in_osds_are_not_safe() {
        let m = cluster(3);
        assert!(ok_to_stop(&m, &[0]).unwrap().is_empty());
        assert_eq!(ok_to_stop(&m, &[0, 1]).unwrap().len(), 64);
        let status = crate::output::sample_status(64);
        let r = safe_to_destroy(&m, &status, &[0]).unwrap();
        assert!(
            r[0].contains("is in") && r[1].contains("64 PGs still map"),
            "{r:?}"
        );
        let mut out = m.clone();
        out.osds.get_mut(&0).unwrap().is_in = false;
        let r = safe_to_destroy(&out, &status, &[0]).unwrap();
        assert!(r.is_empty(), "{r:?}");
    }
}
