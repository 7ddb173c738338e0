//! Peering's questions to the copies of a PG: log heads and copy states, marking copies
//! (in)complete, object listings, and the plan of what a copy misses (from the PG log when
//! it covers the gap, else by comparing listings).

use std::collections::{BTreeMap, BTreeSet};

use store_objstore::{ObjectId, ObjectStore, PG_LOG_MAX_ENTRIES};
use store_types::map::OsdId;
use store_types::osdmsg::{ObjVersion, OsdRequest, OsdResponse, Pg, PgCopyState};
use store_types::StoreError;

use crate::pg::{Fix, RecoveryMode};

use super::{obj_err, OsdService};

impl<S: ObjectStore> OsdService<S> {
    /// An OSD's log head of the PG and the state of its copy.
    pub(super) async fn query_head(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<(Option<ObjVersion>, PgCopyState), StoreError> {
        if osd == self.id {
            let head = self
                .store
                .pg_log_head(pg.pool, pg.seed)
                .await
                .map_err(obj_err)?;
            let state = self
                .store
                .pg_state(pg.pool, pg.seed)
                .await
                .map_err(obj_err)?;
            return Ok((head, state));
        }
        match self.peer_call(osd, &OsdRequest::PgHead { pg }).await? {
            OsdResponse::Head { head, state } => Ok((head, state)),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Records the state of OSD `to`'s copy of the PG (durable on return).
    pub(super) async fn mark(
        &self,
        pg: Pg,
        to: OsdId,
        state: PgCopyState,
    ) -> Result<(), StoreError> {
        if to == self.id {
            return self
                .store
                .set_pg_state(pg.pool, pg.seed, state)
                .await
                .map_err(obj_err);
        }
        let req = OsdRequest::PgMark {
            map_epoch: self.map().map(|m| m.epoch).unwrap_or(0),
            from: self.id,
            pg,
            state,
        };
        match self.peer_call(to, &req).await? {
            OsdResponse::Marked => Ok(()),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// This OSD's objects of a PG with their versions.
    pub(super) async fn local_objects(
        &self,
        pg: Pg,
    ) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        let mut out = BTreeMap::new();
        for name in self.store.list(pg.pool, pg.seed).await.map_err(obj_err)? {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: name.clone(),
            };
            if let Some(st) = self.store.stat(&id).await.map_err(obj_err)? {
                out.insert(name, st.version);
            }
        }
        Ok(out)
    }

    async fn remote_objects(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        match self.peer_call(osd, &OsdRequest::PgList { pg }).await? {
            OsdResponse::Objects(list) => Ok(list.into_iter().collect()),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A PG's objects with their versions on OSD `osd` (this one or another).
    async fn objects_on(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        if osd == self.id {
            self.local_objects(pg).await
        } else {
            self.remote_objects(pg, osd).await
        }
    }

    /// Peering: what OSD `to` misses against `from`'s authoritative copy (whose head is
    /// `auth_head`). From this OSD's PG log when it is the source and its log covers the
    /// gap; else by comparing the two listings. Before answering, `to` is marked
    /// incomplete if it misses anything, or complete up to `auth_head` if not.
    pub(super) async fn plan(
        &self,
        pg: Pg,
        from: OsdId,
        to: OsdId,
        auth_head: Option<ObjVersion>,
    ) -> Result<(Vec<(String, Fix)>, RecoveryMode), StoreError> {
        let (head, state) = self.query_head(pg, to).await?;
        let by_log = if from == self.id && state.complete {
            self.log_delta(pg, effective_head(head, state)).await?
        } else {
            None
        };
        let (fixes, mode) = match by_log {
            Some(fixes) => (fixes, RecoveryMode::Log),
            None => {
                let source = self.objects_on(pg, from).await?;
                let target = self.objects_on(pg, to).await?;
                (listing_delta(&source, &target), RecoveryMode::Backfill)
            }
        };
        let new_state = if fixes.is_empty() {
            PgCopyState {
                complete: true,
                log_from: auth_head.max(state.log_from),
            }
        } else {
            PgCopyState {
                complete: false,
                log_from: state.log_from,
            }
        };
        if new_state != state {
            self.mark(pg, to, new_state).await?;
        }
        Ok((fixes, mode))
    }

    /// Log-based planning: when this OSD's PG log holds the target's newest entry (and is
    /// a full history from there), only the objects of the entries after it changed. Each
    /// fix removes the target's copy at the target's head version (at or above whatever
    /// it holds) first. None when the log does not cover the gap, or the target has
    /// nothing: then the PG is backfilled.
    async fn log_delta(
        &self,
        pg: Pg,
        target_head: Option<ObjVersion>,
    ) -> Result<Option<Vec<(String, Fix)>>, StoreError> {
        let Some(head) = target_head else {
            return Ok(None);
        };
        let mine = self
            .store
            .pg_state(pg.pool, pg.seed)
            .await
            .map_err(obj_err)?;
        if mine.log_from.is_some_and(|from| head < from) {
            return Ok(None);
        }
        let log = self
            .store
            .pg_log(pg.pool, pg.seed, None, PG_LOG_MAX_ENTRIES as usize + 64)
            .await
            .map_err(obj_err)?;
        let Some(at) = log.iter().position(|e| e.version == head) else {
            return Ok(None);
        };
        let changed: BTreeSet<&str> = log[at + 1..].iter().map(|e| e.object.as_str()).collect();
        let mut fixes = Vec::new();
        for name in changed {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: name.to_string(),
            };
            let want = self
                .store
                .stat(&id)
                .await
                .map_err(obj_err)?
                .map(|st| st.version);
            fixes.push((
                name.to_string(),
                Fix {
                    have: Some(head),
                    want,
                },
            ));
        }
        Ok(Some(fixes))
    }
}

/// The head peering counts for a copy: what its state says it holds, if that is newer
/// than its log's newest entry (a recovered copy holds objects, not log entries).
pub(super) fn effective_head(head: Option<ObjVersion>, state: PgCopyState) -> Option<ObjVersion> {
    head.max(state.log_from)
}

/// What makes `target`'s copy of a PG equal to `source`'s: remove what `source` lacks,
/// replace every object whose version differs (removing the target's copy at its own
/// version first).
fn listing_delta(
    source: &BTreeMap<String, ObjVersion>,
    target: &BTreeMap<String, ObjVersion>,
) -> Vec<(String, Fix)> {
    let removes = target
        .iter()
        .filter(|(n, _)| !source.contains_key(*n))
        .map(|(n, v)| {
            let fix = Fix {
                have: Some(*v),
                want: None,
            };
            (n.clone(), fix)
        });
    let copies = source
        .iter()
        .filter(|(n, v)| target.get(*n) != Some(v))
        .map(|(n, v)| {
            let fix = Fix {
                have: target.get(n).copied(),
                want: Some(*v),
            };
            (n.clone(), fix)
        });
    removes.chain(copies).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(epoch: u64, seq: u64) -> ObjVersion {
        ObjVersion { epoch, seq }
    }

    #[test]
    fn listing_delta_removes_extras_and_replaces_what_differs() {
        let source: BTreeMap<String, ObjVersion> = [
            ("a", v(6, 20)),
            ("b", v(6, 19)),
            ("c", v(1, 1)),
            ("same", v(2, 2)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let target: BTreeMap<String, ObjVersion> =
            [("b", v(3, 1)), ("gone", v(4, 4)), ("same", v(2, 2))]
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
        let fix = |have, want| Fix { have, want };
        assert_eq!(
            listing_delta(&source, &target),
            vec![
                ("gone".to_string(), fix(Some(v(4, 4)), None)),
                ("a".to_string(), fix(None, Some(v(6, 20)))),
                ("b".to_string(), fix(Some(v(3, 1)), Some(v(6, 19)))),
                ("c".to_string(), fix(None, Some(v(1, 1)))),
            ]
        );
    }

    #[test]
    fn a_recovered_copy_counts_as_holding_what_it_was_recovered_to() {
        let state = PgCopyState {
            complete: true,
            log_from: Some(v(5, 50)),
        };
        assert_eq!(effective_head(Some(v(5, 10)), state), Some(v(5, 50)));
        assert_eq!(effective_head(Some(v(6, 1)), state), Some(v(6, 1)));
        assert_eq!(effective_head(None, PgCopyState::default()), None);
    }
}
