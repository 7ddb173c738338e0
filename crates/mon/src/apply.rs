//! Applying committed commands to the cluster map: pure and deterministic, so every monitor
//! that applies the same log reaches the same map and the same verdicts.
//!
//! Invariant: the epoch grows by exactly one for each command that changes the map, and never
//! for one that does not.

use store_types::map::{
    weight_to_f64, ClusterMap, CrushWeight, FailureDomain, Flag, HeldPlacement, HostBucket,
    MonInfo, OsdInfo, Pool,
};
use store_types::msg::{CommandOutcome, MapCommand};
use store_types::StoreError;

use crate::locks;
use crate::pgs;

/// Largest pg_num a pool may have (as Ceph's mon_max_pg_per_osd keeps it sane).
pub const MAX_PG_NUM: u32 = 65536;
/// Largest pool size.
pub const MAX_POOL_SIZE: u32 = 10;
pub const DEFAULT_PG_NUM: u32 = 128;

/// Applies one command. On error the map is untouched.
pub fn apply_command(map: &mut ClusterMap, cmd: &MapCommand) -> Result<CommandOutcome, StoreError> {
    let before_epoch = map.epoch;
    // What served each PG before a CRUSH change, for the PGs' pg_temp entries.
    let before = moves_crush(cmd).then(|| map.clone());
    let mut lock_generation = None;
    let mut lock = |r: crate::locks::LockResult| -> Result<(String, Option<u32>), StoreError> {
        let (msg, g) = r?;
        lock_generation = g;
        Ok((msg, None))
    };
    let (message, osd_id) = match cmd {
        MapCommand::OsdBoot {
            uuid,
            addr,
            host,
            weight,
        } => {
            let id = osd_boot(map, uuid, addr, host, *weight)?;
            (
                format!("osd.{id} booted at {addr} on host {host}"),
                Some(id),
            )
        }
        MapCommand::OsdMarkDown { ids, now_ms } => (mark_down(map, ids, *now_ms)?, None),
        MapCommand::OsdOut { ids } => (set_in(map, ids, false)?, None),
        MapCommand::OsdIn { ids } => (set_in(map, ids, true)?, None),
        MapCommand::OsdReweight { id, weight } => (reweight(map, *id, *weight)?, None),
        MapCommand::OsdPurge { id } => (purge(map, *id)?, None),
        MapCommand::SetFlag(f) => (set_flag(map, *f, true), None),
        MapCommand::UnsetFlag(f) => (set_flag(map, *f, false), None),
        MapCommand::PoolCreate {
            name,
            size,
            min_size,
            pg_num,
            failure_domain,
        } => (
            pool_create(map, name, *size, *min_size, *pg_num, *failure_domain)?,
            None,
        ),
        MapCommand::PoolSet { name, key, value } => (pool_set(map, name, key, value)?, None),
        MapCommand::PoolRm { name } => (pool_rm(map, name)?, None),
        MapCommand::LockAcquire(claim) => lock(locks::acquire(map, claim))?,
        MapCommand::LockRelease {
            lock_key,
            session,
            generation,
        } => lock(locks::release(map, lock_key, *session, *generation))?,
        MapCommand::LockBreak {
            claim,
            holder,
            reason,
        } => lock(locks::break_lock(map, claim, *holder, reason))?,
        MapCommand::LockDrop { lock_key, session } => {
            (locks::drop_lock(map, lock_key, *session)?, None)
        }
        MapCommand::BlocklistAdd {
            session,
            reason,
            expire_s,
        } => (
            locks::add_blocklist(map, *session, reason, *expire_s)?,
            None,
        ),
        MapCommand::BlocklistRm { session } => (locks::rm_blocklist(map, *session)?, None),
        MapCommand::BlocklistExpire { sessions } => (locks::expire_blocklist(map, sessions), None),
        MapCommand::PgActivated { pgs: list } => (pgs::activated(map, list), None),
        MapCommand::PgTempDone { pgs: list } => (pgs::temp_done(map, list), None),
        MapCommand::OsdLost { id } => (pgs::osd_lost(map, *id)?, None),
    };
    let changed = map.epoch != before_epoch;
    debug_assert!(map.epoch == before_epoch || map.epoch == before_epoch + 1);
    if changed {
        if let Some(before) = before {
            pgs::update_pg_temp(&before, map);
        }
        if moves_placement(cmd) {
            map.placement_epoch = map.epoch;
        }
    }
    Ok(CommandOutcome {
        epoch: map.epoch,
        changed,
        message,
        osd_id,
        lock_generation,
    })
}

/// Whether a command can change some PG's acting set.
fn moves_placement(cmd: &MapCommand) -> bool {
    moves_crush(cmd)
        || matches!(
            cmd,
            MapCommand::PgTempDone { .. }
                | MapCommand::PoolCreate { .. }
                | MapCommand::PoolRm { .. }
        )
}

/// Whether a command can change some PG's CRUSH set (up OSDs) of an existing pool.
fn moves_crush(cmd: &MapCommand) -> bool {
    matches!(
        cmd,
        MapCommand::OsdBoot { .. }
            | MapCommand::OsdMarkDown { .. }
            | MapCommand::OsdOut { .. }
            | MapCommand::OsdIn { .. }
            | MapCommand::OsdReweight { .. }
            | MapCommand::OsdPurge { .. }
            | MapCommand::PoolSet { .. }
            | MapCommand::SetFlag(Flag::NoRebalance)
            | MapCommand::UnsetFlag(Flag::NoRebalance)
    )
}

/// Replaces the monitor list (from a committed Raft membership); bumps the epoch if it differs.
pub fn set_mons(map: &mut ClusterMap, mons: Vec<MonInfo>) {
    let new: std::collections::BTreeMap<_, _> = mons.into_iter().map(|m| (m.id, m)).collect();
    if new != map.mons {
        map.mons = new;
        map.epoch += 1;
    }
}

fn bump(map: &mut ClusterMap) {
    map.epoch += 1;
}

fn osd_boot(
    map: &mut ClusterMap,
    uuid: &str,
    addr: &str,
    host: &str,
    weight: CrushWeight,
) -> Result<u32, StoreError> {
    if uuid.is_empty() || addr.is_empty() || host.is_empty() {
        return Err(StoreError::invalid("osd boot needs uuid, addr and host"));
    }
    if map.has_flag(Flag::NoUp) {
        if let Some(o) = map.osds.values().find(|o| o.uuid == uuid) {
            if !o.up {
                return Err(StoreError::new(
                    store_types::ErrorCode::NotPermitted,
                    format!("osd.{} may not be marked up: the noup flag is set", o.id),
                ));
            }
        }
    }
    let existing = map.osds.values().find(|o| o.uuid == uuid).map(|o| o.id);
    let id = match existing {
        Some(id) => id,
        None => {
            let id = map.next_osd_id;
            map.next_osd_id += 1;
            map.osds.insert(
                id,
                OsdInfo {
                    id,
                    uuid: uuid.to_string(),
                    addr: String::new(),
                    host: String::new(),
                    weight,
                    up: false,
                    is_in: true,
                    up_from: 0,
                    down_stamp_ms: None,
                },
            );
            id
        }
    };
    let epoch_after = map.epoch + 1;
    let osd = map.osds.get_mut(&id).expect("inserted or found above");
    let moved_host = osd.host != host;
    let old_host = std::mem::replace(&mut osd.host, host.to_string());
    if osd.up && osd.addr == addr && !moved_host {
        return Ok(id); // already up here: nothing to change
    }
    osd.addr = addr.to_string();
    osd.up = true;
    osd.up_from = epoch_after;
    osd.down_stamp_ms = None;
    if moved_host {
        crush_remove_osd(map, &old_host, id);
        crush_add_osd(map, host, id);
    }
    bump(map);
    Ok(id)
}

fn crush_remove_osd(map: &mut ClusterMap, host: &str, id: u32) {
    if let Some(h) = map.crush.hosts.get_mut(host) {
        h.osds.retain(|o| *o != id);
        if h.osds.is_empty() {
            map.crush.hosts.remove(host);
        }
    }
}

fn crush_add_osd(map: &mut ClusterMap, host: &str, id: u32) {
    if !map.crush.hosts.contains_key(host) {
        let bucket_id = map.crush.next_bucket_id;
        map.crush.next_bucket_id -= 1;
        map.crush.hosts.insert(
            host.to_string(),
            HostBucket {
                id: bucket_id,
                name: host.to_string(),
                osds: Vec::new(),
            },
        );
    }
    let h = map.crush.hosts.get_mut(host).expect("inserted above");
    if let Err(pos) = h.osds.binary_search(&id) {
        h.osds.insert(pos, id);
    }
}

fn check_osds_exist(map: &ClusterMap, ids: &[u32]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Err(StoreError::invalid("no OSD ids given"));
    }
    match ids.iter().find(|id| !map.osds.contains_key(id)) {
        Some(id) => Err(StoreError::not_found(format!("osd.{id} does not exist"))),
        None => Ok(()),
    }
}

fn list(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| format!("osd.{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mark_down(map: &mut ClusterMap, ids: &[u32], now_ms: u64) -> Result<String, StoreError> {
    check_osds_exist(map, ids)?;
    let mut changed = Vec::new();
    for id in ids {
        let osd = map.osds.get_mut(id).expect("checked above");
        if osd.up {
            osd.up = false;
            osd.down_stamp_ms = Some(now_ms);
            changed.push(*id);
        }
    }
    if changed.is_empty() {
        return Ok(format!("{} already down", list(ids)));
    }
    bump(map);
    Ok(format!("marked down {}", list(&changed)))
}

fn set_in(map: &mut ClusterMap, ids: &[u32], is_in: bool) -> Result<String, StoreError> {
    check_osds_exist(map, ids)?;
    let word = if is_in { "in" } else { "out" };
    let mut changed = Vec::new();
    for id in ids {
        let osd = map.osds.get_mut(id).expect("checked above");
        if osd.is_in != is_in {
            osd.is_in = is_in;
            changed.push(*id);
        }
    }
    if changed.is_empty() {
        return Ok(format!("{} already {word}", list(ids)));
    }
    bump(map);
    Ok(format!("marked {word} {}", list(&changed)))
}

fn reweight(map: &mut ClusterMap, id: u32, weight: CrushWeight) -> Result<String, StoreError> {
    check_osds_exist(map, &[id])?;
    let osd = map.osds.get_mut(&id).expect("checked above");
    if osd.weight == weight {
        return Ok(format!(
            "osd.{id} already has weight {}",
            weight_to_f64(weight)
        ));
    }
    osd.weight = weight;
    bump(map);
    Ok(format!(
        "osd.{id} CRUSH weight set to {}",
        weight_to_f64(weight)
    ))
}

fn purge(map: &mut ClusterMap, id: u32) -> Result<String, StoreError> {
    check_osds_exist(map, &[id])?;
    let osd = &map.osds[&id];
    if osd.up || osd.is_in {
        return Err(StoreError::new(
            store_types::ErrorCode::NotPermitted,
            format!(
                "osd.{id} is {} and {}: mark it out, let its data move, stop it, then purge",
                if osd.up { "up" } else { "down" },
                if osd.is_in { "in" } else { "out" }
            ),
        ));
    }
    let host = osd.host.clone();
    map.osds.remove(&id);
    crush_remove_osd(map, &host, id);
    pgs::purged(map, id);
    bump(map);
    Ok(format!("purged osd.{id}"))
}

fn set_flag(map: &mut ClusterMap, flag: Flag, on: bool) -> String {
    let changed = if on {
        map.flags.insert(flag)
    } else {
        map.flags.remove(&flag)
    };
    if changed && flag == Flag::NoRebalance {
        // Holding placement where it stands, or letting it go: unsetting moves placement.
        map.rebalance_hold = on.then(|| {
            map.osds
                .values()
                .map(|o| {
                    let held = HeldPlacement {
                        weight: o.weight,
                        is_in: o.is_in,
                    };
                    (o.id, held)
                })
                .collect()
        });
    }
    match (changed, on) {
        (true, true) => {
            bump(map);
            format!("{flag} is set")
        }
        (true, false) => {
            bump(map);
            format!("{flag} is unset")
        }
        (false, true) => format!("{flag} is already set"),
        (false, false) => format!("{flag} is not set"),
    }
}

/// Pool names: what a CLI, an NBD export name (`pool/image`) and a log line can carry safely.
pub fn validate_pool_name(name: &str) -> Result<(), StoreError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 128 || !ok_chars || name.starts_with('.') {
        return Err(StoreError::invalid(format!(
            "invalid pool name '{name}': use 1-128 of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    Ok(())
}

/// size/min_size/pg_num rules shared by create and set.
pub fn validate_pool_params(size: u32, min_size: u32, pg_num: u32) -> Result<(), StoreError> {
    if size == 0 || size > MAX_POOL_SIZE {
        return Err(StoreError::invalid(format!(
            "size {size} is out of range: 1 <= size <= {MAX_POOL_SIZE}"
        )));
    }
    if min_size == 0 || min_size > size {
        return Err(StoreError::invalid(format!(
            "min_size {min_size} is out of range: 1 <= min_size <= size ({size})"
        )));
    }
    if pg_num == 0 || pg_num > MAX_PG_NUM {
        return Err(StoreError::invalid(format!(
            "pg_num {pg_num} is out of range: 1 <= pg_num <= {MAX_PG_NUM}"
        )));
    }
    Ok(())
}

fn pool_create(
    map: &mut ClusterMap,
    name: &str,
    size: u32,
    min_size: u32,
    pg_num: u32,
    failure_domain: Option<FailureDomain>,
) -> Result<String, StoreError> {
    validate_pool_name(name)?;
    validate_pool_params(size, min_size, pg_num)?;
    if map.pool_by_name(name).is_some() {
        return Err(StoreError::new(
            store_types::ErrorCode::AlreadyExists,
            format!("pool '{name}' already exists"),
        ));
    }
    let failure_domain = failure_domain.unwrap_or(if map.crush.hosts.len() == 1 {
        FailureDomain::Osd
    } else {
        FailureDomain::Host
    });
    let id = map.next_pool_id;
    map.next_pool_id += 1;
    bump(map);
    map.pools.insert(
        id,
        Pool {
            id,
            name: name.to_string(),
            size,
            min_size,
            pg_num,
            failure_domain,
            created_epoch: map.epoch,
        },
    );
    pgs::init_history(map, id);
    Ok(format!(
        "pool '{name}' created (id {id}, size {size}, min_size {min_size}, pg_num {pg_num}, failure domain {failure_domain})"
    ))
}

fn find_pool_mut<'a>(map: &'a mut ClusterMap, name: &str) -> Result<&'a mut Pool, StoreError> {
    map.pools
        .values_mut()
        .find(|p| p.name == name)
        .ok_or_else(|| StoreError::not_found(format!("pool '{name}' does not exist")))
}

fn parse_u32(key: &str, value: &str) -> Result<u32, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::invalid(format!("{key} must be a whole number, got '{value}'")))
}

fn pool_set(
    map: &mut ClusterMap,
    name: &str,
    key: &str,
    value: &str,
) -> Result<String, StoreError> {
    let pool = find_pool_mut(map, name)?;
    let mut new = pool.clone();
    match key {
        "size" => new.size = parse_u32(key, value)?,
        "min_size" => new.min_size = parse_u32(key, value)?,
        "pg_num" => {
            let v = parse_u32(key, value)?;
            if v != pool.pg_num {
                // Objects would map to PGs whose OSDs do not hold them: until OSDs split
                // their PG copies, pg_num is fixed at creation.
                return Err(StoreError::new(
                    store_types::ErrorCode::NotPermitted,
                    format!(
                        "pg_num of pool '{name}' is fixed at {} (PG splitting and merging are not supported yet): create a new pool with the pg_num you want and copy images with `storectl image cp`",
                        pool.pg_num
                    ),
                ));
            }
        }
        "failure_domain" => {
            new.failure_domain = value.parse().map_err(StoreError::invalid)?;
        }
        other => {
            return Err(StoreError::invalid(format!(
                "unknown pool setting '{other}': expected size, min_size, pg_num or failure_domain"
            )))
        }
    }
    validate_pool_params(new.size, new.min_size, new.pg_num)?;
    if new == *pool {
        return Ok(format!("pool '{name}' {key} is already {value}"));
    }
    *pool = new;
    bump(map);
    Ok(format!("set pool '{name}' {key} to {value}"))
}

fn pool_rm(map: &mut ClusterMap, name: &str) -> Result<String, StoreError> {
    let id = find_pool_mut(map, name)?.id;
    map.pools.remove(&id);
    pgs::forget_pool(map, id);
    bump(map);
    Ok(format!("pool '{name}' removed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use store_types::map::WEIGHT_ONE;

    fn boot(map: &mut ClusterMap, uuid: &str, host: &str) -> u32 {
        let out = apply_command(
            map,
            &MapCommand::OsdBoot {
                uuid: uuid.into(),
                addr: format!("127.0.0.1:{}", 7000 + uuid.len()),
                host: host.into(),
                weight: WEIGHT_ONE,
            },
        )
        .unwrap();
        out.osd_id.unwrap()
    }

    fn create(
        map: &mut ClusterMap,
        name: &str,
        size: u32,
        min: u32,
    ) -> Result<CommandOutcome, StoreError> {
        apply_command(
            map,
            &MapCommand::PoolCreate {
                name: name.into(),
                size,
                min_size: min,
                pg_num: 32,
                failure_domain: None,
            },
        )
    }

    #[test]
    fn osd_boot_assigns_stable_ids_and_crush_hosts() {
        let mut m = ClusterMap::new("f");
        assert_eq!(boot(&mut m, "u0", "h0"), 0);
        assert_eq!(boot(&mut m, "u1", "h1"), 1);
        let e = m.epoch;
        // Re-boot of a running OSD at the same address: no change, same id.
        assert_eq!(boot(&mut m, "u0", "h0"), 0);
        assert_eq!(m.epoch, e);
        assert_eq!(m.crush.hosts["h0"].osds, vec![0]);
        // Down, then boot again: same id, up again, epoch +1 each.
        apply_command(
            &mut m,
            &MapCommand::OsdMarkDown {
                ids: vec![0],
                now_ms: 5,
            },
        )
        .unwrap();
        assert!(!m.osds[&0].up);
        assert_eq!(m.osds[&0].down_stamp_ms, Some(5));
        assert_eq!(boot(&mut m, "u0", "h0"), 0);
        assert!(m.osds[&0].up);
        assert_eq!(m.epoch, e + 2);
        // Moving host moves the CRUSH entry and drops the empty bucket.
        assert_eq!(boot(&mut m, "u0", "h9"), 0);
        assert!(!m.crush.hosts.contains_key("h0"));
        assert_eq!(m.crush.hosts["h9"].osds, vec![0]);
    }

    #[test]
    fn pool_rules() {
        let mut m = ClusterMap::new("f");
        boot(&mut m, "a", "h0");
        boot(&mut m, "b", "h1");
        assert!(create(&mut m, "p", 3, 4).is_err());
        assert!(create(&mut m, "p", 0, 0).is_err());
        assert!(create(&mut m, "bad/name", 3, 2).is_err());
        let e = m.epoch;
        let out = create(&mut m, "p", 3, 2).unwrap();
        assert!(out.changed);
        assert_eq!(m.epoch, e + 1);
        assert_eq!(
            m.pool_by_name("p").unwrap().failure_domain,
            FailureDomain::Host
        );
        let err = create(&mut m, "p", 3, 2).unwrap_err();
        assert_eq!(err.code, store_types::ErrorCode::AlreadyExists);
        assert_eq!(m.epoch, e + 1, "a failed command must not bump the epoch");
        let set = |m: &mut ClusterMap, k: &str, v: &str| {
            apply_command(
                m,
                &MapCommand::PoolSet {
                    name: "p".into(),
                    key: k.into(),
                    value: v.into(),
                },
            )
        };
        assert!(set(&mut m, "min_size", "4").is_err());
        // pg_num is fixed: objects would map to PGs that do not hold them.
        assert!(set(&mut m, "pg_num", "16").is_err());
        let e = set(&mut m, "pg_num", "64").unwrap_err();
        assert_eq!(e.code, store_types::ErrorCode::NotPermitted);
        assert!(e.message.contains("fixed"), "{e}");
        assert!(!set(&mut m, "pg_num", "32").unwrap().changed);
        assert!(set(&mut m, "colour", "blue").is_err());
        apply_command(&mut m, &MapCommand::PoolRm { name: "p".into() }).unwrap();
        assert!(m.pools.is_empty());
        assert!(apply_command(&mut m, &MapCommand::PoolRm { name: "p".into() }).is_err());
    }

    #[test]
    fn single_host_defaults_to_osd_failure_domain() {
        let mut m = ClusterMap::new("f");
        boot(&mut m, "a", "h0");
        boot(&mut m, "b", "h0");
        create(&mut m, "p", 2, 1).unwrap();
        assert_eq!(
            m.pool_by_name("p").unwrap().failure_domain,
            FailureDomain::Osd
        );
    }

    #[test]
    fn flags_and_in_out_only_bump_on_change() {
        let mut m = ClusterMap::new("f");
        boot(&mut m, "a", "h0");
        let e = m.epoch;
        assert!(
            apply_command(&mut m, &MapCommand::SetFlag(Flag::NoOut))
                .unwrap()
                .changed
        );
        assert!(
            !apply_command(&mut m, &MapCommand::SetFlag(Flag::NoOut))
                .unwrap()
                .changed
        );
        assert!(
            apply_command(&mut m, &MapCommand::OsdOut { ids: vec![0] })
                .unwrap()
                .changed
        );
        assert!(
            !apply_command(&mut m, &MapCommand::OsdOut { ids: vec![0] })
                .unwrap()
                .changed
        );
        assert!(
            apply_command(&mut m, &MapCommand::OsdIn { ids: vec![0] })
                .unwrap()
                .changed
        );
        assert!(apply_command(&mut m, &MapCommand::OsdIn { ids: vec![7] }).is_err());
        assert_eq!(m.epoch, e + 3);
    }

    #[test]
    fn purge_only_a_down_out_osd_and_reweight() {
        let mut m = ClusterMap::new("f");
        boot(&mut m, "u0", "h0");
        boot(&mut m, "u1", "h1");
        let e = apply_command(&mut m, &MapCommand::OsdPurge { id: 0 }).unwrap_err();
        assert!(e.message.contains("mark it out"), "{e}");
        apply_command(&mut m, &MapCommand::OsdOut { ids: vec![0] }).unwrap();
        apply_command(
            &mut m,
            &MapCommand::OsdMarkDown {
                ids: vec![0],
                now_ms: 1,
            },
        )
        .unwrap();
        apply_command(&mut m, &MapCommand::OsdPurge { id: 0 }).unwrap();
        assert!(!m.osds.contains_key(&0));
        assert!(!m.crush.hosts.contains_key("h0"));
        assert!(apply_command(&mut m, &MapCommand::OsdPurge { id: 0 }).is_err());
        let out = apply_command(
            &mut m,
            &MapCommand::OsdReweight {
                id: 1,
                weight: 0x8000,
            },
        )
        .unwrap();
        assert!(out.changed && m.osds[&1].weight == 0x8000);
        let again = apply_command(
            &mut m,
            &MapCommand::OsdReweight {
                id: 1,
                weight: 0x8000,
            },
        )
        .unwrap();
        assert!(!again.changed);
    }
}
