//! Image locks and the blocklist, as map changes: pure, like the rest of [`crate::apply`].
//!
//! The rules (docs/image-locks.md has the why):
//! - a lock is granted when free, already the claimant's, or held by a blocklisted session;
//!   every grant bumps the generation, which never decreases;
//! - a lock held by a live session is not taken: the claim is recorded in `requested_by`
//!   and the holder, seeing it in the map, finishes its writes and releases;
//! - a release hands the lock straight to the waiting session, saving a round;
//! - a break (proposed by the leader only after it found the holder gone) blocklists the
//!   holder and grants in one entry, so no map ever lets both write;
//! - blocklist entries expire (by default after an hour, as in Ceph), except while their
//!   session still holds a lock: a fenced session stays fenced for good (its gateway drops
//!   it), and a lock it lost carries a generation its writes no longer match, so lifting an
//!   old entry only keeps the map small.

use std::collections::HashMap;

use store_types::map::{
    session_name, BlocklistEntry, ClusterMap, ImageLock, SessionId, WriteGuard, RECENT_RELEASES,
};
use store_types::msg::LockClaim;
use store_types::{ErrorCode, StoreError};

use crate::clock::Now;

/// Largest number of image locks and blocklist entries the map carries, so a runaway
/// client cannot grow every map push without bound.
pub const MAX_LOCKS: usize = 100_000;
pub const MAX_BLOCKLIST: usize = 100_000;

/// Outcome of a lock command: the message, and the generation if the claimant holds it now.
pub type LockResult = Result<(String, Option<u64>), StoreError>;

fn blocklisted(map: &ClusterMap, s: SessionId) -> Result<(), StoreError> {
    match map.blocklist.get(&s) {
        Some(b) => Err(StoreError::new(
            ErrorCode::Blocklisted,
            format!(
                "{} is blocklisted since epoch {} ({}); it may not take locks",
                session_name(s),
                b.added_epoch,
                b.reason
            ),
        )),
        None => Ok(()),
    }
}

fn validate_claim(c: &LockClaim) -> Result<(), StoreError> {
    if c.lock_key.is_empty() || c.lock_key.len() > 256 || c.image.len() > 512 || c.desc.len() > 512
    {
        return Err(StoreError::invalid("lock claim fields out of bounds"));
    }
    Ok(())
}

/// Grants the lock to `claim` (the caller checked that it may).
fn grant(map: &mut ClusterMap, claim: &LockClaim) -> u64 {
    map.epoch += 1;
    let epoch = map.epoch;
    let lock = map
        .image_locks
        .entry(claim.lock_key.clone())
        .or_insert_with(|| ImageLock {
            image: claim.image.clone(),
            holder: None,
            holder_desc: String::new(),
            holder_instance: 0,
            generation: 0,
            requested_by: None,
            requested_desc: String::new(),
            requested_instance: 0,
            granted_epoch: 0,
            recent_releases: Vec::new(),
            taken_from: Vec::new(),
        });
    lock.generation += 1;
    lock.holder = Some(claim.session);
    lock.holder_desc = claim.desc.clone();
    lock.holder_instance = claim.instance;
    lock.image = claim.image.clone();
    lock.requested_by = None;
    lock.requested_desc.clear();
    lock.requested_instance = 0;
    lock.granted_epoch = epoch;
    lock.generation
}

/// Refuses a claim by a session this lock was taken from: it was fenced, for good.
fn was_taken_from(map: &ClusterMap, claim: &LockClaim) -> Result<(), StoreError> {
    match map.image_locks.get(&claim.lock_key) {
        Some(l) if l.taken_from.contains(&claim.session) => Err(StoreError::new(
            ErrorCode::LockLost,
            format!(
                "the lock of {} was taken from {} (it was fenced); open the image again",
                l.image,
                session_name(claim.session)
            ),
        )),
        _ => Ok(()),
    }
}

/// Remembers that the lock was taken from `holder` without its release.
fn record_taken(map: &mut ClusterMap, key: &str, holder: SessionId) {
    if let Some(l) = map.image_locks.get_mut(key) {
        if !l.taken_from.contains(&holder) {
            l.taken_from.push(holder);
            let extra = l.taken_from.len().saturating_sub(RECENT_RELEASES);
            l.taken_from.drain(..extra);
        }
    }
}

pub fn acquire(map: &mut ClusterMap, claim: &LockClaim) -> LockResult {
    validate_claim(claim)?;
    blocklisted(map, claim.session)?;
    was_taken_from(map, claim)?;
    let who = session_name(claim.session);
    let current = map.image_locks.get(&claim.lock_key).cloned();
    match current.as_ref().and_then(|l| l.holder) {
        Some(h) if h == claim.session => {
            let g = current.map_or(0, |l| l.generation);
            Ok((
                format!("{who} already holds {} (generation {g})", claim.image),
                Some(g),
            ))
        }
        Some(h) if !map.blocklist.contains_key(&h) => {
            let lock = map.image_locks.get_mut(&claim.lock_key).expect("present");
            if lock.requested_by != Some(claim.session) {
                lock.requested_by = Some(claim.session);
                lock.requested_desc = claim.desc.clone();
                lock.requested_instance = claim.instance;
                map.epoch += 1;
            }
            Ok((
                format!(
                    "{} is held by {} ({}); asked it to release",
                    claim.image,
                    session_name(h),
                    current.map_or(String::new(), |l| l.holder_desc)
                ),
                None,
            ))
        }
        _ => {
            if current.is_none() && map.image_locks.len() >= MAX_LOCKS {
                return Err(StoreError::new(
                    ErrorCode::NoSpace,
                    format!("the map holds {MAX_LOCKS} image locks already"),
                ));
            }
            // Held by a blocklisted session: taken from it.
            if let Some(h) = current.as_ref().and_then(|l| l.holder) {
                record_taken(map, &claim.lock_key, h);
            }
            let g = grant(map, claim);
            Ok((
                format!("{who} holds {} at generation {g}", claim.image),
                Some(g),
            ))
        }
    }
}

pub fn release(map: &mut ClusterMap, key: &str, session: SessionId, generation: u64) -> LockResult {
    let Some(lock) = map.image_locks.get(key).cloned() else {
        return Err(StoreError::not_found(format!("no lock {key}")));
    };
    if lock.holder != Some(session) || lock.generation != generation {
        if lock.recent_releases.contains(&(session, generation)) {
            // A release resent after it applied: done already.
            return Ok((
                format!(
                    "{} released {} at generation {generation} already",
                    session_name(session),
                    lock.image
                ),
                None,
            ));
        }
        // Taken from it without its release: the lock was broken and the session fenced.
        return Err(StoreError::new(
            ErrorCode::LockLost,
            format!(
                "the lock of {} at generation {generation} was taken from {} without its \
                 release (it was fenced); open the image again",
                lock.image,
                session_name(session)
            ),
        ));
    }
    // The entry read above is still there: nothing between removes one.
    if let Some(l) = map.image_locks.get_mut(key) {
        l.recent_releases.push((session, generation));
        let extra = l.recent_releases.len().saturating_sub(RECENT_RELEASES);
        l.recent_releases.drain(..extra);
    }
    match lock
        .requested_by
        .filter(|r| *r != session && !map.blocklist.contains_key(r))
    {
        Some(next) => {
            let claim = LockClaim {
                lock_key: key.to_string(),
                image: lock.image.clone(),
                session: next,
                desc: lock.requested_desc.clone(),
                instance: lock.requested_instance,
            };
            let g = grant(map, &claim);
            Ok((
                format!(
                    "{} released {}; {} holds it at generation {g}",
                    session_name(session),
                    lock.image,
                    session_name(next)
                ),
                None,
            ))
        }
        None => {
            // A free lock stays as an entry without holder, so its generation never goes back.
            if let Some(l) = map.image_locks.get_mut(key) {
                l.holder = None;
                l.requested_by = None;
                l.requested_desc.clear();
                l.holder_desc.clear();
            }
            map.epoch += 1;
            Ok((
                format!("{} released {}", session_name(session), lock.image),
                None,
            ))
        }
    }
}

pub fn break_lock(
    map: &mut ClusterMap,
    claim: &LockClaim,
    holder: SessionId,
    reason: &str,
) -> LockResult {
    validate_claim(claim)?;
    blocklisted(map, claim.session)?;
    was_taken_from(map, claim)?;
    let current = map.image_locks.get(&claim.lock_key).and_then(|l| l.holder);
    if current != Some(holder) {
        // The holder changed since the leader looked: claim again.
        return acquire(map, claim);
    }
    if !map.blocklist.contains_key(&holder) {
        add_blocklist(map, holder, reason, None)?;
        // One entry, one epoch: the blocklist and the grant land together.
        map.epoch -= 1;
    }
    record_taken(map, &claim.lock_key, holder);
    let g = grant(map, claim);
    Ok((
        format!(
            "{} broke the lock of {} held by {} ({reason}); {} is blocklisted; generation {g}",
            session_name(claim.session),
            claim.image,
            session_name(holder),
            session_name(holder)
        ),
        Some(g),
    ))
}

/// Forgets the lock of a removed image (ids are never reused, so its generation cannot
/// come back). Refused while a session that is not blocklisted holds it.
pub fn drop_lock(
    map: &mut ClusterMap,
    key: &str,
    session: SessionId,
) -> Result<String, StoreError> {
    let Some(lock) = map.image_locks.get(key) else {
        return Ok(format!("no lock {key}"));
    };
    if let Some(h) = lock
        .holder
        .filter(|h| *h != session && !map.blocklist.contains_key(h))
    {
        return Err(StoreError::new(
            ErrorCode::NotPermitted,
            format!(
                "{} is locked by {} ({})",
                lock.image,
                session_name(h),
                lock.holder_desc
            ),
        ));
    }
    let image = lock.image.clone();
    map.image_locks.remove(key);
    map.epoch += 1;
    Ok(format!("lock of {image} dropped"))
}

pub fn add_blocklist(
    map: &mut ClusterMap,
    session: SessionId,
    reason: &str,
    expire_s: Option<u64>,
) -> Result<String, StoreError> {
    if map.blocklist.contains_key(&session) {
        return Ok(format!("{} is already blocklisted", session_name(session)));
    }
    if map.blocklist.len() >= MAX_BLOCKLIST {
        return Err(StoreError::new(
            ErrorCode::NoSpace,
            format!("the blocklist holds {MAX_BLOCKLIST} entries already; remove old ones"),
        ));
    }
    if reason.len() > 512 {
        return Err(StoreError::invalid(
            "blocklist reason longer than 512 bytes",
        ));
    }
    map.epoch += 1;
    // A fenced session waiting for a lock must not be handed it later (say once its entry
    // expired): its claim goes.
    for l in map.image_locks.values_mut() {
        if l.requested_by == Some(session) {
            l.requested_by = None;
            l.requested_desc.clear();
            l.requested_instance = 0;
        }
    }
    map.blocklist.insert(
        session,
        BlocklistEntry {
            added_epoch: map.epoch,
            reason: reason.to_string(),
            expire_s,
        },
    );
    Ok(format!("blocklisted {}", session_name(session)))
}

pub fn rm_blocklist(map: &mut ClusterMap, session: SessionId) -> Result<String, StoreError> {
    if map.blocklist.remove(&session).is_none() {
        return Err(StoreError::not_found(format!(
            "{} is not blocklisted",
            session_name(session)
        )));
    }
    map.epoch += 1;
    Ok(format!(
        "{} is no longer blocklisted",
        session_name(session)
    ))
}

fn holds_a_lock(map: &ClusterMap, session: SessionId) -> bool {
    map.image_locks.values().any(|l| l.holder == Some(session))
}

/// Lifts the expired entries the leader names (session, epoch added), except those added
/// again since or whose session holds a lock.
pub fn expire_blocklist(map: &mut ClusterMap, sessions: &[(SessionId, u64)]) -> String {
    let lift: Vec<SessionId> = sessions
        .iter()
        .filter(|(s, added)| {
            map.blocklist
                .get(s)
                .is_some_and(|e| e.added_epoch == *added)
                && !holds_a_lock(map, *s)
        })
        .map(|(s, _)| *s)
        .collect();
    if lift.is_empty() {
        return "no blocklist entry expired".into();
    }
    for s in &lift {
        map.blocklist.remove(s);
    }
    map.epoch += 1;
    let names: Vec<String> = lift.iter().map(|s| session_name(*s)).collect();
    format!("blocklist entries expired: {}", names.join(", "))
}

/// The leader's clock for blocklist expiry, sans-IO: the map in, the commands to propose
/// out. The map holds no timestamps (applying an entry must not depend on a clock), so
/// the leader times each entry from when it first saw it (an entry is its session and the
/// epoch it was added: one removed and added again is timed anew); a new leader starts
/// over, which only makes entries last longer.
///
/// Ceph stamps a blocklist entry with a wall-clock expiry that operators read. Here the
/// map holds no stamp: the expiry is an interval this leader measures, so it runs on the
/// monotonic clock ([`Now::mono_ms`]). A wall-clock step (an hour ahead, say) must not
/// lift every fence at once.
#[derive(Debug, Default)]
pub struct BlocklistExpiry {
    first_seen_mono_ms: HashMap<(SessionId, u64), u64>,
}

impl BlocklistExpiry {
    /// `default_expire_ms` applies to entries without their own expiry.
    pub fn tick(
        &mut self,
        map: &ClusterMap,
        leader: bool,
        now: Now,
        default_expire_ms: u64,
    ) -> Option<store_types::msg::MapCommand> {
        if !leader {
            self.first_seen_mono_ms.clear();
            return None;
        }
        self.first_seen_mono_ms.retain(|(s, added), _| {
            map.blocklist
                .get(s)
                .is_some_and(|e| e.added_epoch == *added)
        });
        let mut expired = Vec::new();
        for (s, entry) in &map.blocklist {
            let key = (*s, entry.added_epoch);
            let seen = *self.first_seen_mono_ms.entry(key).or_insert(now.mono_ms);
            let expire_ms = match entry.expire_s {
                Some(0) => continue,
                Some(secs) => secs.saturating_mul(1000),
                None if default_expire_ms == 0 => continue,
                None => default_expire_ms,
            };
            if now.mono_ms.saturating_sub(seen) >= expire_ms && !holds_a_lock(map, *s) {
                expired.push(key);
            }
        }
        (!expired.is_empty())
            .then_some(store_types::msg::MapCommand::BlocklistExpire { sessions: expired })
    }
}

/// For tests and assertions: whether a write guarded so would pass under `map`.
pub fn would_accept(map: &ClusterMap, g: &WriteGuard) -> bool {
    map.check_write_guard(g).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both clocks at `ms`.
    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: ms,
        }
    }

    fn claim(session: SessionId) -> LockClaim {
        LockClaim {
            lock_key: "1/abc".into(),
            image: "p/img".into(),
            session,
            desc: format!("gw {session}"),
            instance: session,
        }
    }

    fn guard(map: &ClusterMap, session: SessionId) -> WriteGuard {
        WriteGuard {
            session,
            lock_key: "1/abc".into(),
            generation: map.image_locks["1/abc"].generation,
        }
    }

    #[test]
    fn cooperative_hand_over_moves_the_lock_and_fences_the_old_generation() {
        let mut m = ClusterMap::new("f");
        let (_, g1) = acquire(&mut m, &claim(1)).unwrap();
        assert_eq!(g1, Some(1));
        let old = guard(&m, 1);
        assert!(would_accept(&m, &old));
        // B asks: A still holds it, but is asked to release.
        let e = m.epoch;
        assert_eq!(acquire(&mut m, &claim(2)).unwrap().1, None);
        assert_eq!(m.image_locks["1/abc"].requested_by, Some(2));
        assert_eq!(m.epoch, e + 1);
        // Asking again changes nothing.
        acquire(&mut m, &claim(2)).unwrap();
        assert_eq!(m.epoch, e + 1);
        // A releases: B holds it at generation 2, A's guard is refused.
        release(&mut m, "1/abc", 1, 1).unwrap();
        let l = &m.image_locks["1/abc"];
        assert_eq!((l.holder, l.generation, l.requested_by), (Some(2), 2, None));
        let err = m.check_write_guard(&old).unwrap_err();
        assert_eq!(err.code, ErrorCode::LockLost);
        assert!(would_accept(&m, &guard(&m, 2)));
        // A stale release is a no-op.
        let e = m.epoch;
        release(&mut m, "1/abc", 1, 1).unwrap();
        assert_eq!(m.epoch, e);
    }

    #[test]
    fn released_lock_keeps_its_generation() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        release(&mut m, "1/abc", 1, 1).unwrap();
        assert_eq!(m.image_locks["1/abc"].holder, None);
        // A release resent after it applied is answered as done, without a new epoch.
        let e = m.epoch;
        release(&mut m, "1/abc", 1, 1).unwrap();
        assert_eq!(m.epoch, e);
        assert_eq!(acquire(&mut m, &claim(1)).unwrap().1, Some(2));
    }

    #[test]
    fn a_release_by_a_session_the_lock_was_taken_from_is_refused() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        break_lock(&mut m, &claim(2), 1, "gone").unwrap();
        // Even with its blocklist entry gone (expired), it learns it was fenced.
        m.blocklist.clear();
        let e = m.epoch;
        let err = release(&mut m, "1/abc", 1, 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::LockLost, "{err}");
        assert_eq!(m.epoch, e);
        // Only the last few releases are remembered.
        for g in 2..2 + RECENT_RELEASES as u64 + 3 {
            release(&mut m, "1/abc", 2, g).unwrap();
            acquire(&mut m, &claim(2)).unwrap();
        }
        assert_eq!(
            m.image_locks["1/abc"].recent_releases.len(),
            RECENT_RELEASES
        );
    }

    #[test]
    fn break_blocklists_the_holder_in_the_same_epoch() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        let old = guard(&m, 1);
        let e = m.epoch;
        let (_, g) = break_lock(&mut m, &claim(2), 1, "gone").unwrap();
        assert_eq!(g, Some(2));
        assert_eq!(m.epoch, e + 1);
        assert_eq!(
            m.check_write_guard(&old).unwrap_err().code,
            ErrorCode::Blocklisted
        );
        // The fenced session may not take the lock back.
        assert_eq!(
            acquire(&mut m, &claim(1)).unwrap_err().code,
            ErrorCode::Blocklisted
        );
        // A lock held by a blocklisted session is free to take.
        add_blocklist(&mut m, 2, "test", None).unwrap();
        assert_eq!(acquire(&mut m, &claim(3)).unwrap().1, Some(3));
    }

    #[test]
    fn guards_from_the_future_ask_for_a_newer_map() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        let mut g = guard(&m, 1);
        g.generation = 5;
        assert_eq!(
            m.check_write_guard(&g).unwrap_err().code,
            ErrorCode::Unavailable
        );
        g.lock_key = "9/none".into();
        assert_eq!(
            m.check_write_guard(&g).unwrap_err().code,
            ErrorCode::Unavailable
        );
    }

    #[test]
    fn blocklist_add_and_rm() {
        let mut m = ClusterMap::new("f");
        add_blocklist(&mut m, 7, "operator", None).unwrap();
        let e = m.epoch;
        add_blocklist(&mut m, 7, "again", None).unwrap();
        assert_eq!(m.epoch, e);
        rm_blocklist(&mut m, 7).unwrap();
        assert_eq!(
            rm_blocklist(&mut m, 7).unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn blocklist_entries_expire_on_the_leaders_clock_unless_they_hold_a_lock() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        add_blocklist(&mut m, 1, "holds a lock", Some(10)).unwrap();
        add_blocklist(&mut m, 2, "default expiry", None).unwrap();
        add_blocklist(&mut m, 3, "never", Some(0)).unwrap();
        add_blocklist(&mut m, 4, "ten seconds", Some(10)).unwrap();
        let mut t = BlocklistExpiry::default();
        // Not leading: nothing, and no clock kept.
        assert_eq!(t.tick(&m, false, at(0), 60_000), None);
        // Leading from t=1000: each entry is timed from here.
        assert_eq!(t.tick(&m, true, at(1_000), 60_000), None);
        assert_eq!(t.tick(&m, true, at(10_999), 60_000), None);
        // Entries are (session, epoch added).
        let added = |m: &ClusterMap, s: SessionId| (s, m.blocklist[&s].added_epoch);
        let expire = |sessions: Vec<(SessionId, u64)>| {
            Some(store_types::msg::MapCommand::BlocklistExpire { sessions })
        };
        let (e1, e2, e4) = (added(&m, 1), added(&m, 2), added(&m, 4));
        assert_eq!(t.tick(&m, true, at(11_000), 60_000), expire(vec![e4]));
        assert_eq!(t.tick(&m, true, at(61_000), 60_000), expire(vec![e2, e4]));
        // A leader change starts the clock over (entries only last longer).
        assert_eq!(t.tick(&m, false, at(62_000), 60_000), None);
        assert_eq!(t.tick(&m, true, at(63_000), 60_000), None);
        assert_eq!(t.tick(&m, true, at(73_000), 60_000), expire(vec![e4]));
        // Applying: one epoch; entries gone, added again since, or holding a lock are left.
        let e = m.epoch;
        let msg = expire_blocklist(&mut m, &[e1, e2, e4, (9, 1)]);
        assert!(msg.contains("client."), "{msg}");
        assert_eq!(m.epoch, e + 1);
        assert_eq!(m.blocklist.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(
            expire_blocklist(&mut m, &[e1, e4]),
            "no blocklist entry expired"
        );
        assert_eq!(m.epoch, e + 1);
        // Removed and added again: timed anew, and an old expiry does not lift it.
        rm_blocklist(&mut m, 3).unwrap();
        add_blocklist(&mut m, 3, "again", Some(10)).unwrap();
        assert_eq!(
            expire_blocklist(&mut m, &[(3, 0)]),
            "no blocklist entry expired"
        );
        assert_eq!(t.tick(&m, true, at(80_000), 60_000), None);
        // Once its lock is gone, the entry of session 1 expires too.
        m.image_locks.clear();
        let e3 = added(&m, 3);
        assert_eq!(t.tick(&m, true, at(90_000), 60_000), expire(vec![e1, e3]));
    }

    #[test]
    fn a_wall_clock_step_lifts_no_blocklist_entry() {
        let mut m = ClusterMap::new("f");
        add_blocklist(&mut m, 2, "default expiry", None).unwrap();
        let mut t = BlocklistExpiry::default();
        let t0 = Now {
            mono_ms: 0,
            wall_ms: 1_700_000_000_000,
        };
        assert_eq!(t.tick(&m, true, t0, 60_000), None);
        // The wall clock steps an hour ahead while a second passes: the fence stays.
        let stepped = Now {
            mono_ms: 1000,
            wall_ms: t0.wall_ms + 1000 + 3_600_000,
        };
        assert_eq!(t.tick(&m, true, stepped, 60_000), None);
        let e2 = (2, m.blocklist[&2].added_epoch);
        let expire = Some(store_types::msg::MapCommand::BlocklistExpire { sessions: vec![e2] });
        assert_eq!(t.tick(&m, true, t0.plus_ms(60_000), 60_000), expire);
    }

    #[test]
    fn a_session_the_lock_was_taken_from_may_not_claim_it_again() {
        let mut m = ClusterMap::new("f");
        acquire(&mut m, &claim(1)).unwrap();
        break_lock(&mut m, &claim(2), 1, "gone").unwrap();
        // Its entry expired: still no claim, neither by acquire nor by a break.
        m.blocklist.clear();
        assert_eq!(
            acquire(&mut m, &claim(1)).unwrap_err().code,
            ErrorCode::LockLost
        );
        assert_eq!(
            break_lock(&mut m, &claim(1), 2, "x").unwrap_err().code,
            ErrorCode::LockLost
        );
        // A lock held by a blocklisted session, taken by another, counts as taken too.
        add_blocklist(&mut m, 2, "operator", None).unwrap();
        acquire(&mut m, &claim(3)).unwrap();
        m.blocklist.clear();
        assert_eq!(
            acquire(&mut m, &claim(2)).unwrap_err().code,
            ErrorCode::LockLost
        );
        // A blocklisted session that was waiting loses its claim: it is never handed it.
        acquire(&mut m, &claim(4)).unwrap();
        assert_eq!(m.image_locks["1/abc"].requested_by, Some(4));
        add_blocklist(&mut m, 4, "operator", None).unwrap();
        assert_eq!(m.image_locks["1/abc"].requested_by, None);
        m.blocklist.clear();
        let g = m.image_locks["1/abc"].generation;
        release(&mut m, "1/abc", 3, g).unwrap();
        assert_eq!(m.image_locks["1/abc"].holder, None);
    }
}
