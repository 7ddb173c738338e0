//! Cluster status and health checks, computed from the map, monitor reachability and OSD
//! reports. Pure: everything it needs comes in as arguments.
//!
//! PG states come from the map (which OSDs of each PG's CRUSH set are up, `pg_temp`,
//! `norebalance`'s hold), refined by what each PG's current primary reports (peering,
//! recovering, backfilling, incomplete, down; objects still missing). Every check is raised
//! under a [`HealthCode`], which fixes its key and severity.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use store_placement::{pool_mappings, PgMapping};
use store_types::map::{ClusterMap, OsdId, Pool};
use store_types::msg::{HealthCheck, MonStatus, OsdStat, Severity, SlowOps, StatusReport};
use store_types::osdmsg::{PgPhase, PgReport};
use store_types::HealthCode;

pub struct StatusInput<'a> {
    pub map: &'a ClusterMap,
    /// Every monitor of the map, with whether the answering monitor reached it.
    pub mons: Vec<MonStatus>,
    pub leader_name: Option<String>,
    pub answered_by: String,
    pub osd_stats: &'a HashMap<OsdId, OsdStat>,
    /// Client sessions: how many are live, and which lock holders are silent (None when
    /// this monitor has not watched long enough to tell).
    pub live_sessions: usize,
    pub silent_holders: Option<Vec<String>>,
    /// PGs their primaries report busy (see [`busy_pgs`]).
    pub busy: &'a BusyPgs,
    /// Objects and bytes recovered per second lately, when known.
    pub recovery_rate: (Option<u64>, Option<u64>),
    /// Daemons (OSDs, gateways) that report operations blocked past their complaint time.
    pub slow_ops: &'a [(String, SlowOps)],
}

pub const STATE_CLEAN: &str = "active+clean";
pub const STATE_UNDERSIZED: &str = "active+undersized";
pub const STATE_DEGRADED: &str = "active+undersized+degraded";
pub const STATE_INACTIVE: &str = "undersized+degraded+peered";
pub const STATE_STALE: &str = "stale+undersized+degraded+peered";
pub const STATE_PEERING: &str = "peering";
/// The primary has not reported since the PG's acting set last changed.
pub const STATE_UNKNOWN: &str = "unknown";
pub const STATE_RECOVERING: &str = "active+recovering+degraded";
pub const STATE_RECOVERY_WAIT: &str = "active+recovery_wait+degraded";
pub const STATE_BACKFILLING: &str = "active+degraded+backfilling";
pub const STATE_BACKFILL_WAIT: &str = "active+degraded+backfill_wait";
pub const STATE_INCOMPLETE: &str = "incomplete";
pub const STATE_DOWN: &str = "down";
/// Clean, but `norebalance` keeps it where CRUSH would no longer put it.
pub const STATE_REMAPPED: &str = "active+remapped+backfill_wait";
/// Filling an OSD CRUSH moved it to while the OSDs that held it keep serving.
pub const STATE_REMAPPED_BACKFILLING: &str = "active+remapped+backfilling";

/// What a PG's current primary last reported about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgSeen {
    pub phase: PgPhase,
    /// Object copies missing below the pool's size.
    pub degraded: u64,
    /// Object copies missing on OSDs the PG moves to, beyond its size.
    pub misplaced: u64,
}

/// What the PGs' current primaries say, for PGs that are not simply active.
#[derive(Clone, Debug, Default)]
pub struct BusyPgs {
    /// PGs reported not active+clean, by (pool, seed).
    pub pgs: HashMap<(u32, u32), PgSeen>,
    /// Object copies the current primaries still have to recover (degraded + misplaced).
    pub objects_left: u64,
    pub degraded: u64,
    pub misplaced: u64,
    /// Primaries whose last report predates the last placement change: their PGs' state
    /// is unknown until they report again.
    pub behind: std::collections::HashSet<OsdId>,
}

impl BusyPgs {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The busy PGs of the reports, keeping only each PG's current primary's word (a report
/// from an OSD that is no longer primary, or is down, says nothing).
pub fn busy_pgs(map: &ClusterMap, reports: &HashMap<OsdId, (u64, Vec<PgReport>)>) -> BusyPgs {
    let mut out = BusyPgs::new();
    for o in map.osds.values().filter(|o| o.up) {
        if reports
            .get(&o.id)
            .is_none_or(|(e, _)| *e < map.placement_epoch)
        {
            out.behind.insert(o.id);
        }
    }
    let mut mappers = HashMap::new();
    for (osd, (_, list)) in reports {
        if !map.osds.get(osd).is_some_and(|o| o.up) {
            continue;
        }
        for r in list {
            let Some(pool) = map.pools.get(&r.pg.pool) else {
                continue;
            };
            if r.pg.seed >= pool.pg_num {
                continue;
            }
            let mapper = mappers
                .entry(pool.id)
                .or_insert_with(|| store_placement::PoolMapper::new(map, pool));
            if mapper.map_seed(r.pg.seed).primary == Some(*osd) {
                let misplaced = r.misplaced.min(r.objects_left);
                let seen = PgSeen {
                    phase: r.phase,
                    degraded: r.objects_left - misplaced,
                    misplaced,
                };
                out.pgs.insert((r.pg.pool, r.pg.seed), seen);
                out.objects_left += r.objects_left;
                out.degraded += seen.degraded;
                out.misplaced += seen.misplaced;
            }
        }
    }
    out
}

/// PG counts by state, for all pools: from the map (which OSDs are up, pg_temp), refined
/// by what the primaries report (peering, recovering, what is missing where).
pub fn pgs_by_state(map: &ClusterMap, busy: &BusyPgs) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    let held = held_back(map);
    for pool in map.pools.values() {
        for (seed, m) in pool_mappings(map, pool).into_iter().enumerate() {
            let key = (pool.id, seed as u32);
            let behind = m.primary.is_some_and(|p| busy.behind.contains(&p));
            let state = pg_state(
                pool,
                &m,
                busy.pgs.get(&key),
                behind,
                held.pgs.contains(&key),
            );
            *out.entry(state).or_default() += 1;
        }
    }
    out
}

/// One PG's state, in Ceph's words and order (`active+undersized+degraded+remapped+backfilling`).
fn pg_state(pool: &Pool, m: &PgMapping, seen: Option<&PgSeen>, behind: bool, held: bool) -> String {
    let acting = m.acting.len();
    if acting == 0 {
        return STATE_STALE.into();
    }
    if acting < pool.min_size as usize {
        return STATE_INACTIVE.into();
    }
    if behind {
        return STATE_UNKNOWN.into();
    }
    let phase = seen.map_or(PgPhase::Active, |s| s.phase);
    match phase {
        PgPhase::Peering => return STATE_PEERING.into(),
        PgPhase::Incomplete => return STATE_INCOMPLETE.into(),
        PgPhase::Down => return STATE_DOWN.into(),
        PgPhase::Inactive => return STATE_INACTIVE.into(),
        _ => {}
    }
    let undersized = acting < pool.size as usize;
    let degraded = m.up.len() < m.raw.len()
        || (undersized && m.raw.len() >= pool.size as usize)
        || seen.is_some_and(|s| s.degraded > 0);
    let remapped = m.remapped() || held;
    let mut parts = vec!["active"];
    let busy = phase != PgPhase::Active;
    if !busy && !undersized && !degraded && !remapped {
        parts.push("clean");
    }
    match phase {
        PgPhase::RecoveryWait => parts.push("recovery_wait"),
        PgPhase::Recovering => parts.push("recovering"),
        _ => {}
    }
    if undersized {
        parts.push("undersized");
    }
    if degraded {
        parts.push("degraded");
    }
    if remapped {
        parts.push("remapped");
    }
    match phase {
        PgPhase::BackfillWait => parts.push("backfill_wait"),
        PgPhase::Backfilling => parts.push("backfilling"),
        PgPhase::Active if held => parts.push("backfill_wait"),
        _ => {}
    }
    if parts == ["active", "remapped"] {
        // Every copy is complete; the primary is about to drop the pg_temp entry.
        parts = vec!["active", "clean", "remapped"];
    }
    parts.join("+")
}

/// What `norebalance` holds back: the PGs whose placement would move without the hold,
/// and how many copies would move, of how many placement slots (PGs × size).
#[derive(Debug, Default)]
pub struct HeldBack {
    pub pgs: BTreeSet<(u32, u32)>,
    pub copies: u64,
    pub slots: u64,
}

pub fn held_back(map: &ClusterMap) -> HeldBack {
    let mut out = HeldBack::default();
    if map.rebalance_hold.is_none() {
        return out;
    }
    let mut free = map.clone();
    free.rebalance_hold = None;
    for pool in map.pools.values() {
        let held = pool_mappings(map, pool);
        let unheld = pool_mappings(&free, pool);
        for (seed, (h, u)) in held.iter().zip(&unheld).enumerate() {
            let moved = u.raw.iter().filter(|o| !h.raw.contains(o)).count() as u64;
            if moved > 0 {
                out.pgs.insert((pool.id, seed as u32));
                out.copies += moved;
            }
        }
        out.slots += u64::from(pool.pg_num) * u64::from(pool.size);
    }
    out
}

/// The checks raised so far, by code string (the key `storectl` and JSON output use).
type Checks = BTreeMap<String, HealthCheck>;

/// A check of `code`, with the code's severity.
fn new_check(code: HealthCode, summary: String, detail: Vec<String>) -> HealthCheck {
    HealthCheck {
        severity: code.severity(),
        summary,
        detail,
    }
}

/// Raises check `code` (replacing an earlier one of the same code).
fn raise(checks: &mut Checks, code: HealthCode, summary: String, detail: Vec<String>) {
    checks.insert(code.as_str().to_string(), new_check(code, summary, detail));
}

fn mon_checks(input: &StatusInput, checks: &mut Checks) -> Vec<String> {
    let voters: Vec<&MonStatus> = input
        .mons
        .iter()
        .filter(|m| input.map.mons.get(&m.id).is_some_and(|i| i.voter))
        .collect();
    let n = voters.len();
    let reachable: Vec<String> = voters
        .iter()
        .filter(|m| m.reachable)
        .map(|m| m.name.clone())
        .collect();
    let quorum = n / 2 + 1;
    let has_quorum = reachable.len() >= quorum;
    let down: Vec<&&MonStatus> = voters.iter().filter(|m| !m.reachable).collect();
    if !down.is_empty() {
        let detail = down
            .iter()
            .map(|m| {
                format!(
                    "mon.{} ({}) is down or unreachable: {}",
                    m.name,
                    m.addr,
                    m.error.as_deref().unwrap_or("no answer")
                )
            })
            .collect();
        let q = if has_quorum {
            format!("quorum {}", reachable.join(","))
        } else {
            "no quorum".to_string()
        };
        raise(
            checks,
            HealthCode::MonDown,
            format!("{}/{} mons down, {q}", down.len(), n),
            detail,
        );
    }
    if !has_quorum {
        raise(
            checks,
            HealthCode::MonQuorumLost,
            format!(
                "no monitor quorum: {} of {} monitors reachable, {} needed; the cluster map cannot change",
                reachable.len(),
                n,
                quorum
            ),
            vec!["start the stopped monitors or repair the network between them".into()],
        );
    }
    if n > 0 && n.is_multiple_of(2) {
        raise(
            checks,
            HealthCode::EvenMonitorCount,
            format!("{n} monitors: an even count tolerates no more failures than {} and a network split can leave no side with quorum", n - 1),
            vec![format!(
                "add a monitor (`storectl mon add NAME ADDR`) or remove one (`storectl mon rm NAME`) to get {} or {} monitors",
                n + 1,
                n - 1
            )],
        );
    }
    if has_quorum {
        reachable
    } else {
        Vec::new()
    }
}

fn osd_checks(map: &ClusterMap, checks: &mut Checks) {
    let down: Vec<String> = map
        .osds
        .values()
        .filter(|o| !o.up && o.is_in)
        .map(|o| format!("osd.{} (root=default,host={}) is down", o.id, o.host))
        .collect();
    if !down.is_empty() {
        let summary = format!("{} osds down", down.len());
        raise(checks, HealthCode::OsdDown, summary, down);
    }
    if !map.flags.is_empty() {
        let names: Vec<String> = map.flags.iter().map(|f| f.to_string()).collect();
        raise(
            checks,
            HealthCode::OsdmapFlags,
            format!("{} flag(s) set", names.join(",")),
            vec!["unset with `storectl osd unset FLAG` when done".into()],
        );
    }
    for pool in map.pools.values() {
        let domains = map.failure_domains_available(pool.failure_domain);
        if (pool.size as usize) > domains {
            let code = HealthCode::PoolSizeExceedsDomains;
            let e = checks
                .entry(code.as_str().to_string())
                .or_insert_with(|| new_check(code, String::new(), Vec::new()));
            e.detail.push(format!(
                "pool '{}' has size {} but only {} {} failure domain(s) hold in OSDs: add {}s or lower the size",
                pool.name, pool.size, domains, pool.failure_domain, pool.failure_domain
            ));
            e.summary = format!(
                "{} pool(s) cannot place all replicas in distinct failure domains",
                e.detail.len()
            );
        }
    }
}

/// Ceph's defaults: mon_osd_full_ratio and mon_osd_nearfull_ratio.
pub const FULL_RATIO: f64 = 0.95;
pub const NEARFULL_RATIO: f64 = 0.85;

/// OSDs whose last report counted device I/O errors: an OSD stops at its first, so this
/// names OSDs that died of their disk (until they run again without errors).
fn device_checks(map: &ClusterMap, stats: &HashMap<OsdId, OsdStat>, checks: &mut Checks) {
    let mut failed: Vec<String> = stats
        .iter()
        .filter(|(id, st)| st.device_errors > 0 && map.osds.contains_key(id))
        .map(|(id, st)| {
            format!(
                "osd.{id} stopped after {} I/O error(s) on its data device",
                st.device_errors
            )
        })
        .collect();
    if failed.is_empty() {
        return;
    }
    failed.sort();
    let summary = format!("{} osd(s) stopped on device I/O errors", failed.len());
    raise(checks, HealthCode::OsdDeviceErrors, summary, failed);
}

fn usage_checks(map: &ClusterMap, stats: &HashMap<OsdId, OsdStat>, checks: &mut Checks) {
    let mut full = Vec::new();
    let mut nearfull = Vec::new();
    let mut scrub = Vec::new();
    for (id, st) in stats.iter().filter(|(id, _)| map.osds.contains_key(id)) {
        let ratio = if st.total_bytes == 0 {
            0.0
        } else {
            st.used_bytes as f64 / st.total_bytes as f64
        };
        let line = format!("osd.{id} is {:.1}% full", ratio * 100.0);
        if ratio >= FULL_RATIO {
            full.push(line);
        } else if ratio >= NEARFULL_RATIO {
            nearfull.push(line);
        }
        if st.checksum_errors > 0 {
            scrub.push(format!(
                "osd.{id} found {} checksum mismatches on its device",
                st.checksum_errors
            ));
        }
    }
    let mut add = |code: HealthCode, summary: String, mut detail: Vec<String>| {
        if !detail.is_empty() {
            detail.sort();
            raise(checks, code, summary, detail);
        }
    };
    let n = full.len();
    add(
        HealthCode::OsdFull,
        format!("{n} full osd(s): writes to them fail"),
        full,
    );
    let n = nearfull.len();
    add(
        HealthCode::OsdNearfull,
        format!("{n} nearfull osd(s)"),
        nearfull,
    );
    let n = scrub.len();
    add(
        HealthCode::OsdScrubErrors,
        format!("{n} osd(s) report checksum errors: damaged copies were detected"),
        scrub,
    );
}

/// SLOW_OPS, worded as Ceph's: how many, the oldest's age, which daemons; a detail line per
/// daemon names its oldest op.
fn slow_op_checks(slow: &[(String, SlowOps)], checks: &mut Checks) {
    if slow.is_empty() {
        return;
    }
    let count: u64 = slow.iter().map(|(_, s)| s.count).sum();
    let oldest_ms = slow.iter().map(|(_, s)| s.oldest_age_ms).max().unwrap_or(0);
    let daemons: Vec<&str> = slow.iter().map(|(d, _)| d.as_str()).collect();
    let summary = format!(
        "{count} slow ops, oldest one blocked for {} sec, daemons [{}] have slow ops.",
        oldest_ms / 1000,
        daemons.join(",")
    );
    let detail = slow
        .iter()
        .map(|(d, s)| {
            format!(
                "{d}: {} ops blocked, oldest for {} ms: {}",
                s.count, s.oldest_age_ms, s.oldest
            )
        })
        .collect();
    raise(checks, HealthCode::SlowOps, summary, detail);
}

fn pg_checks(pgs: &BTreeMap<String, u64>, waited_for: &[String], checks: &mut Checks) {
    let count = |pred: &dyn Fn(&str) -> bool| -> u64 {
        pgs.iter().filter(|(s, _)| pred(s)).map(|(_, n)| *n).sum()
    };
    let peering = count(&|s| s == STATE_PEERING || s == STATE_UNKNOWN);
    let incomplete = count(&|s| s == STATE_INCOMPLETE);
    let down = count(&|s| s == STATE_DOWN);
    let inactive = count(&|s| {
        !s.starts_with("active")
            && s != STATE_PEERING
            && s != STATE_UNKNOWN
            && s != STATE_INCOMPLETE
            && s != STATE_DOWN
    });
    let recovering = count(&|s| s.contains("recovering") || s.contains("backfilling"));
    let waiting = count(&|s| s.contains("_wait"));
    let degraded = count(&|s| s.contains("degraded"));
    let undersized = count(&|s| s.contains("undersized"));
    if inactive + peering + incomplete + down > 0 {
        let mut detail = Vec::new();
        if inactive > 0 {
            detail.push(format!(
                "{inactive} pgs have fewer up OSDs than their pool's min_size: I/O to them waits until OSDs return"
            ));
        }
        if peering > 0 {
            detail.push(format!(
                "{peering} pgs peering: their OSDs are agreeing on the newest copy; I/O to them waits until they are done"
            ));
        }
        if incomplete > 0 {
            detail.push(format!(
                "{incomplete} pgs incomplete: no up OSD holds a complete copy (a recovery into each was cut short); start the OSDs that were down"
            ));
        }
        if down > 0 {
            detail.push(format!(
                "{down} pgs down: the OSDs that last served them ({}) may hold acknowledged writes no other OSD has; start them, or if one is gone for good, `storectl osd lost ID --yes-i-really-mean-it` (what only it held is lost)",
                waited_for.join(", ")
            ));
        }
        raise(
            checks,
            HealthCode::PgAvailability,
            format!(
                "Reduced data availability: {inactive} pgs inactive, {peering} peering, {incomplete} incomplete, {down} down"
            ),
            detail,
        );
    }
    if degraded > 0 || undersized > 0 {
        raise(
            checks,
            HealthCode::PgDegraded,
            format!("Degraded data redundancy: {degraded} pgs degraded ({recovering} recovering, {waiting} waiting), {undersized} pgs undersized"),
            if waiting > 0 {
                vec![format!(
                    "{waiting} pgs wait: the norecover or nobackfill flag holds their recovery back (objects a client touches are still recovered)"
                )]
            } else {
                Vec::new()
            },
        );
    }
}

/// An estimate of the object copies missing from PGs with fewer acting OSDs than their
/// size (an OSD down, not yet out): the empty slots times the average copies per slot.
/// Their primaries cannot count them (nothing is planned for an OSD that is not there).
fn undersized_copies(map: &ClusterMap, object_copies: u64) -> u64 {
    let (mut filled, mut empty) = (0u64, 0u64);
    for pool in map.pools.values() {
        for m in pool_mappings(map, pool) {
            filled += m.acting.len() as u64;
            if m.raw.len() >= pool.size as usize {
                empty += (pool.size as usize).saturating_sub(m.acting.len()) as u64;
            }
        }
    }
    object_copies * empty / filled.max(1)
}

/// The OSDs `down` PGs wait for (of their last active sets, those not serving them now),
/// for the health detail.
fn down_waits(map: &ClusterMap, busy: &BusyPgs) -> Vec<String> {
    let mut ids: BTreeSet<OsdId> = BTreeSet::new();
    for ((pool, seed), seen) in &busy.pgs {
        if seen.phase != PgPhase::Down {
            continue;
        }
        let (Some(rec), Some(p)) = (map.last_active(*pool, *seed), map.pools.get(pool)) else {
            continue;
        };
        let acting = store_placement::map_pg(
            map,
            p,
            store_placement::PgId {
                pool: *pool,
                seed: *seed,
            },
        )
        .acting;
        ids.extend(rec.osds.iter().filter(|o| !acting.contains(o)));
    }
    ids.iter()
        .map(|o| match map.osds.get(o) {
            Some(i) if i.up => format!("osd.{o}, up but out: mark it in"),
            Some(_) => format!("osd.{o}, down"),
            None => format!("osd.{o}, purged"),
        })
        .collect()
}

/// Builds the status report.
pub fn status(input: StatusInput) -> StatusReport {
    let map = input.map;
    let mut checks = BTreeMap::new();
    let quorum_names = mon_checks(&input, &mut checks);
    osd_checks(map, &mut checks);
    usage_checks(map, input.osd_stats, &mut checks);
    device_checks(map, input.osd_stats, &mut checks);
    let pgs = pgs_by_state(map, input.busy);
    pg_checks(&pgs, &down_waits(map, input.busy), &mut checks);
    let pgs_remapped = pgs
        .iter()
        .filter(|(s, _)| s.contains("remapped"))
        .map(|(_, n)| *n)
        .sum();
    let object_copies: u64 = map
        .osds
        .keys()
        .filter_map(|id| input.osd_stats.get(id))
        .map(|s| s.objects)
        .sum();
    let held = held_back(map);
    let held_objects = object_copies * held.copies / held.slots.max(1);
    if !held.pgs.is_empty() {
        raise(
            &mut checks,
            HealthCode::ObjectMisplaced,
            format!(
                "~{held_objects} objects misplaced ({:.1}%): norebalance keeps {} pgs where CRUSH would no longer put them",
                100.0 * held_objects as f64 / object_copies.max(1) as f64,
                held.pgs.len()
            ),
            vec!["they move when the flag is unset (`storectl osd unset norebalance`)".into()],
        );
    }
    lock_checks(map, input.silent_holders.as_deref(), &mut checks);
    slow_op_checks(input.slow_ops, &mut checks);
    let health = checks
        .values()
        .map(|c| c.severity)
        .max()
        .unwrap_or(Severity::Ok);
    let (total_bytes, used_bytes) = map
        .osds
        .keys()
        .filter_map(|id| input.osd_stats.get(id))
        .fold((0, 0), |(t, u), s| (t + s.total_bytes, u + s.used_bytes));
    StatusReport {
        osd_stats: input
            .osd_stats
            .iter()
            .filter(|(id, _)| map.osds.contains_key(id))
            .map(|(id, s)| (*id, *s))
            .collect(),
        fsid: map.fsid.clone(),
        epoch: map.epoch,
        health,
        checks,
        mons: input.mons,
        quorum_names,
        leader_name: input.leader_name,
        answered_by: input.answered_by,
        num_osds: map.osds.len(),
        num_up_osds: map.num_up_osds(),
        num_in_osds: map.num_in_osds(),
        num_pools: map.pools.len(),
        num_pgs: pgs.values().sum(),
        pgs_by_state: pgs,
        total_bytes,
        used_bytes,
        flags: map.flags.iter().map(|f| f.to_string()).collect(),
        num_sessions: input.live_sessions,
        recovery_objects_left: input.busy.objects_left,
        degraded_objects: input.busy.degraded + undersized_copies(map, object_copies),
        object_copies,
        recovery_objects_per_sec: input.recovery_rate.0,
        recovery_bytes_per_sec: input.recovery_rate.1,
        num_image_locks: map
            .image_locks
            .values()
            .filter(|l| l.holder.is_some())
            .count(),
        num_blocklisted: map.blocklist.len(),
        pgs_remapped,
        misplaced_objects: held_objects + input.busy.misplaced,
    }
}

/// Image locks that nobody can use: held by a fenced session (IMAGE_LOCK_BLOCKLISTED), or
/// by one that stopped reporting (IMAGE_LOCK_ORPHANED). Both clear when another session
/// takes the lock.
fn lock_checks(map: &ClusterMap, silent: Option<&[String]>, checks: &mut Checks) {
    use store_types::map::session_name;
    let fenced: Vec<String> = map
        .image_locks
        .values()
        .filter_map(|l| {
            l.holder
                .filter(|h| map.blocklist.contains_key(h))
                .map(|h| (l, h))
        })
        .map(|(l, h)| {
            format!(
                "image {} is locked by blocklisted {} ({})",
                l.image,
                session_name(h),
                l.holder_desc
            )
        })
        .collect();
    if !fenced.is_empty() {
        raise(
            checks,
            HealthCode::ImageLockBlocklisted,
            format!(
                "{} image lock(s) held by blocklisted sessions",
                fenced.len()
            ),
            fenced,
        );
    }
    if let Some(silent) = silent.filter(|s| !s.is_empty()) {
        raise(
            checks,
            HealthCode::ImageLockOrphaned,
            format!(
                "{} image lock(s) held by sessions that stopped reporting",
                silent.len()
            ),
            silent.to_vec(),
        );
    }
}

#[cfg(test)]
mod tests;
