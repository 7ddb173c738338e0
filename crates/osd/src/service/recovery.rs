//! Recovery of single objects (pulled into this OSD, pushed to the others over their ordered
//! replica paths), its limits ([`RecoveryLimits`]) and throttle.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use store_objstore::{ObjError, ObjectId, ObjectStore};
use store_types::map::OsdId;
use store_types::osdmsg::{Mutation, ObjVersion, OsdRequest, OsdResponse, Pg};
use store_types::{ErrorCode, StoreError};
use tokio::sync::Semaphore;

use crate::pg::{Fix, RecoveryFailure};

use super::{obj_err, OsdService, PgSlot};

/// Why the recovery of one object failed, as the engine needs to know it.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecoverError {
    /// A copy is not at the planned version: the plan is stale.
    #[error("stale recovery plan: {0}")]
    Stale(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl RecoverError {
    pub(super) fn cause(&self) -> RecoveryFailure {
        match self {
            RecoverError::Stale(_) => RecoveryFailure::StalePlan,
            // An OSD that cannot take the object: waiting operations fail at once.
            RecoverError::Store(e) if matches!(e.code, ErrorCode::NoSpace | ErrorCode::Corrupt) => {
                RecoveryFailure::Refused(e.clone())
            }
            RecoverError::Store(_) => RecoveryFailure::Transient,
        }
    }
}

/// How hard recovery may work, so client I/O keeps most of the device (Ceph's
/// `osd_recovery_max_active` and `osd_recovery_sleep`).
#[derive(Clone, Copy, Debug)]
pub struct RecoveryLimits {
    /// Recoveries (pulls and pushes, one per PG and target) running at once on this OSD.
    pub max_active: usize,
    /// PGs this OSD leads that backfill at once (Ceph's `osd_max_backfills`): the others
    /// wait (`backfill_wait`) until one is done.
    pub max_backfills: usize,
    /// Pause after each recovered object.
    pub sleep: Duration,
}

impl Default for RecoveryLimits {
    fn default() -> Self {
        RecoveryLimits {
            max_active: 3,
            max_backfills: 1,
            sleep: Duration::ZERO,
        }
    }
}

pub(super) struct RecoveryThrottle {
    pub(super) slots: Arc<Semaphore>,
    pub(super) backfills: Arc<Semaphore>,
    pub(super) sleep: Duration,
}

impl<S: ObjectStore> OsdService<S> {
    /// The configured pause between recovered objects.
    pub(super) async fn recovery_pause(&self) {
        if !self.throttle.sleep.is_zero() {
            tokio::time::sleep(self.throttle.sleep).await;
        }
    }

    /// Whether round `interval` is still the PG's current one (recovery work of an
    /// earlier round must stop touching the PG).
    fn still_round(&self, slot: &PgSlot, interval: u64) -> Result<(), StoreError> {
        if slot.engine.lock().expect("engine lock").round() == Some(interval) {
            Ok(())
        } else {
            Err(StoreError::new(
                ErrorCode::Unavailable,
                "the PG's interval changed; recovery stopped",
            ))
        }
    }

    /// Brings one object to its authoritative version on every OSD of `fixes`: this OSD
    /// first (from `source`), then the others from this OSD, through their ordered
    /// replica paths. The engine runs no client operation on the object meanwhile.
    pub(super) async fn recover_object(
        &self,
        slot: &PgSlot,
        object: &str,
        source: OsdId,
        fixes: &[(OsdId, Fix)],
        interval: u64,
    ) -> Result<(), RecoverError> {
        let oid = ObjectId {
            pool: slot.pg.pool,
            pg: slot.pg.seed,
            name: object.to_string(),
        };
        if let Some((_, fix)) = fixes.iter().find(|(o, _)| *o == self.id) {
            self.recover_here(slot, &oid, source, *fix, interval)
                .await?;
        }
        let others: Vec<(OsdId, Fix)> = fixes
            .iter()
            .copied()
            .filter(|(o, _)| *o != self.id)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let data = match self.store.stat(&oid).await.map_err(obj_err)? {
            Some(st) => {
                let data = self
                    .store
                    .read(&oid, 0, st.size as usize)
                    .await
                    .map_err(obj_err)?;
                Some((data, st.version))
            }
            None => None,
        };
        for (to, fix) in others {
            self.still_round(slot, interval)?;
            self.push_copy(slot.pg, &oid, to, fix, data.as_ref())
                .await?;
            self.recovered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Recovery into this OSD: its copy of `oid` becomes `fix.want`, pulled from `source`.
    async fn recover_here(
        &self,
        slot: &PgSlot,
        oid: &ObjectId,
        source: OsdId,
        fix: Fix,
        interval: u64,
    ) -> Result<(), RecoverError> {
        self.still_round(slot, interval)?;
        let data = match fix.want {
            Some(want) => {
                let addr = self
                    .map()
                    .and_then(|m| m.osds.get(&source).map(|o| o.addr.clone()))
                    .ok_or_else(|| {
                        StoreError::not_found(format!("osd.{source} is not in the map"))
                    })?;
                let (data, got) = self.fetch_whole(slot.pg, oid, &addr).await?;
                if got != want {
                    return Err(RecoverError::Stale(format!(
                        "{oid} is at {got:?} on osd.{source}, not {want:?} as planned"
                    )));
                }
                Some((data, want))
            }
            None => None,
        };
        self.still_round(slot, interval)?;
        if self.refuses_recovery(&oid.name) {
            return Err(StoreError::new(
                ErrorCode::NoSpace,
                format!("failpoint: no space for {oid} here"),
            )
            .into());
        }
        if let Some(have) = fix.have {
            self.store.delete(oid, have).await.map_err(|e| match e {
                ObjError::StaleVersion { .. } => RecoverError::Stale(e.to_string()),
                e => obj_err(e).into(),
            })?;
        }
        if let Some((data, want)) = data {
            self.recovered_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            for (off, piece, v) in pieces(&data, want) {
                self.store
                    .write(oid, off, piece, v)
                    .await
                    .map_err(obj_err)?;
            }
        }
        self.recovered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Recovery into OSD `to` from this OSD's copy (`data`: its bytes and version), over
    /// `to`'s ordered replica path.
    async fn push_copy(
        &self,
        pg: Pg,
        oid: &ObjectId,
        to: OsdId,
        fix: Fix,
        data: Option<&(Bytes, ObjVersion)>,
    ) -> Result<(), RecoverError> {
        let send = |version: ObjVersion, mutation: Mutation| {
            let req = OsdRequest::Replica {
                map_epoch: self.map().map(|m| m.epoch).unwrap_or(0),
                from: self.id,
                pg,
                object: oid.name.clone(),
                version,
                mutation,
            };
            async move {
                match self.peer_call(to, &req).await {
                    Ok(OsdResponse::Committed { .. }) => Ok(()),
                    // A replica refuses a removal below what it holds: the plan is stale.
                    Err(e) if e.code == ErrorCode::InvalidArgument => {
                        Err(RecoverError::Stale(format!("osd.{to}: {}", e.message)))
                    }
                    Err(e) => Err(RecoverError::from(StoreError::new(
                        e.code,
                        format!("osd.{to}: {}", e.message),
                    ))),
                    Ok(other) => {
                        Err(StoreError::internal(format!("unexpected reply {other:?}")).into())
                    }
                }
            }
        };
        if let Some(have) = fix.have {
            send(have, Mutation::Delete).await?;
        }
        let Some(want) = fix.want else {
            return Ok(());
        };
        let Some((data, version)) = data else {
            return Err(RecoverError::Stale(format!(
                "{oid} is missing here, but planned at {want:?}"
            )));
        };
        if *version != want {
            return Err(RecoverError::Stale(format!(
                "{oid} is at {version:?} here, not {want:?} as planned"
            )));
        }
        self.recovered_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        for (offset, chunk, v) in pieces(data, want) {
            let mutation = Mutation::Write {
                offset,
                data: chunk.into(),
            };
            send(v, mutation).await?;
        }
        Ok(())
    }
}

/// An object's bytes as (offset, piece, version) writes small enough for one message; an
/// empty object is one empty piece (so it is still created). Every piece but the last
/// carries the lowest version, so a copy cut short never claims the source's version.
pub(super) fn pieces(data: &Bytes, version: ObjVersion) -> Vec<(u64, Bytes, ObjVersion)> {
    const PIECE: usize = 4 << 20;
    if data.is_empty() {
        return vec![(0, Bytes::new(), version)];
    }
    let starts: Vec<usize> = (0..data.len()).step_by(PIECE).collect();
    let last = starts.len() - 1;
    starts
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let v = if i == last {
                version
            } else {
                ObjVersion::default()
            };
            (o as u64, data.slice(o..(o + PIECE).min(data.len())), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(epoch: u64, seq: u64) -> ObjVersion {
        ObjVersion { epoch, seq }
    }

    #[test]
    fn only_the_last_piece_carries_the_version() {
        let data = Bytes::from(vec![7u8; (4 << 20) * 2 + 5]);
        let p = pieces(&data, v(9, 9));
        assert_eq!(p.len(), 3);
        assert_eq!(
            p.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
            vec![0, 4 << 20, 8 << 20]
        );
        assert_eq!(
            p.iter().map(|(_, _, v)| *v).collect::<Vec<_>>(),
            vec![v(0, 0), v(0, 0), v(9, 9)]
        );
        assert_eq!(p.iter().map(|(_, d, _)| d.len()).sum::<usize>(), data.len());
        assert_eq!(
            pieces(&Bytes::new(), v(1, 1)),
            vec![(0, Bytes::new(), v(1, 1))]
        );
    }
}
