//! Reads: client reads bounded by the op timeout, read repair of a damaged local copy from a
//! replica, and serving object ranges to repairing and recovering peers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use store_objstore::{ObjError, ObjectId, ObjectStore};
use store_placement::map_pg;
use store_types::map::OsdId;
use store_types::osdmsg::{ClientOpKind, ObjStat, ObjVersion, OsdRequest, OsdResponse, Pg};
use store_types::{ErrorCode, StoreError};
use tracing::warn;

use super::client::ReplyTo;
use super::recovery::pieces;
use super::{obj_err, pg_id, OsdService, PgSlot, REPLICA_TIMEOUT};

impl<S: ObjectStore> OsdService<S> {
    /// A released read, answered within the op timeout: a read that repairs from slow
    /// replicas could otherwise hold its client for one timeout per peer. Past the bound
    /// the client gets TIMEOUT, and the read still runs to its end (it may be repairing
    /// the local copy) before its object is released.
    pub(super) async fn bounded_read(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        object: String,
        kind: ClientOpKind,
        from: Option<OsdId>,
        to: ReplyTo,
    ) {
        let me = self.clone();
        let pg = slot.pg;
        let name = object.clone();
        let mut read = tokio::spawn(async move {
            match from {
                Some(osd) => me.remote_read(pg, osd, &name, kind).await,
                None => me.local_read(pg, &name, kind).await,
            }
        });
        let bound = Duration::from_millis(self.limits.op_timeout_ms);
        match tokio::time::timeout(bound, &mut read).await {
            Ok(res) => to.send(res.unwrap_or_else(|e| {
                OsdResponse::Error(StoreError::internal(format!("read task failed: {e}")))
            })),
            Err(_) => {
                warn!(pg = ?pg, object, "read not done within the op timeout; answered TIMEOUT");
                to.send(OsdResponse::Error(StoreError::new(
                    ErrorCode::Timeout,
                    format!("read of {object} not done within {} ms", bound.as_millis()),
                )));
                let _ = read.await;
            }
        }
    }

    /// A client read served from OSD `osd`'s copy (checksums verified there): this OSD
    /// misses the object and cannot recover it now. Stat and Allocated are answered from
    /// the copy's size (every byte up to it counts as allocated: true of the data, if less
    /// precise than a local block map).
    async fn remote_read(&self, pg: Pg, osd: OsdId, object: &str, op: ClientOpKind) -> OsdResponse {
        let (offset, len) = match op {
            ClientOpKind::Read { offset, len } => (offset, len),
            ClientOpKind::Stat | ClientOpKind::Allocated { .. } => (0, 0),
            _ => return OsdResponse::Error(StoreError::internal("not a read")),
        };
        let req = OsdRequest::Fetch {
            pg,
            object: object.to_string(),
            offset,
            len,
        };
        let (size, version, data) = match self.peer_call(osd, &req).await {
            Ok(OsdResponse::Fetched {
                size,
                version,
                data,
            }) => (size, version, data),
            Err(e) if e.code == ErrorCode::NotFound => {
                return match op {
                    ClientOpKind::Stat => OsdResponse::Stat(None),
                    ClientOpKind::Allocated { .. } => OsdResponse::Extents(None),
                    _ => OsdResponse::Error(e),
                }
            }
            Err(e) => return OsdResponse::Error(e),
            Ok(other) => {
                return OsdResponse::Error(StoreError::internal(format!(
                    "osd.{osd} answered a fetch with {other:?}"
                )))
            }
        };
        match op {
            ClientOpKind::Stat => OsdResponse::Stat(Some(ObjStat { size, version })),
            ClientOpKind::Allocated { offset, len } => {
                let end = size.min(offset.saturating_add(len));
                let extents = (end > offset).then(|| (offset, end - offset));
                OsdResponse::Extents(Some(extents.into_iter().collect()))
            }
            _ => OsdResponse::Data(data.into()),
        }
    }

    async fn local_read(&self, pg: Pg, object: &str, op: ClientOpKind) -> OsdResponse {
        let id = ObjectId {
            pool: pg.pool,
            pg: pg.seed,
            name: object.to_string(),
        };
        let res = match op {
            ClientOpKind::Read { offset, len } => {
                match self.store.read_data(&id, offset, len as usize).await {
                    Err(ObjError::Checksum { .. }) => match self.repair(pg, &id).await {
                        Ok(()) => self.store.read_data(&id, offset, len as usize).await,
                        Err(e) => return OsdResponse::Error(e),
                    },
                    other => other,
                }
                .map(OsdResponse::Data)
            }
            ClientOpKind::Allocated { offset, len } => self
                .store
                .allocated(&id, offset, len)
                .await
                .map(OsdResponse::Extents),
            ClientOpKind::Stat => self.store.stat(&id).await.map(|s| {
                OsdResponse::Stat(s.map(|s| ObjStat {
                    size: s.size,
                    version: s.version,
                }))
            }),
            _ => return OsdResponse::Error(StoreError::internal("not a read")),
        };
        if let Err(ObjError::Io(e)) = &res {
            self.device_failed(&format!("reading {object}"), e);
        }
        res.unwrap_or_else(|e| OsdResponse::Error(obj_err(e)))
    }

    /// Rewrites a damaged local object from the first other acting OSD that has a good
    /// copy. Runs inside a read of the object, so no mutation of it can interleave.
    async fn repair(&self, pg: Pg, id: &ObjectId) -> Result<(), StoreError> {
        let map = self.map().ok_or_else(|| StoreError::internal("no map"))?;
        let pool = map
            .pools
            .get(&pg.pool)
            .ok_or_else(|| StoreError::not_found("pool removed"))?;
        let peers: Vec<(OsdId, String)> = map_pg(&map, pool, pg_id(pg))
            .acting
            .into_iter()
            .filter(|o| *o != self.id)
            .filter_map(|o| map.osds.get(&o).map(|i| (o, i.addr.clone())))
            .collect();
        let mut errors = Vec::new();
        for (peer, addr) in peers {
            let res = async {
                let (data, version) = self.fetch_whole(pg, id, &addr).await?;
                // The object keeps its version: damage left by a repair cut short is still
                // caught by the checksums of the next read.
                for (off, piece, _) in pieces(&data, version) {
                    self.store
                        .write(id, off, piece, version)
                        .await
                        .map_err(obj_err)?;
                }
                Ok::<_, StoreError>(())
            }
            .await;
            match res {
                Ok(()) => {
                    self.repaired.fetch_add(1, Ordering::Relaxed);
                    warn!(object = %id, from = peer, "repaired a damaged local copy from a replica");
                    return Ok(());
                }
                Err(e) => errors.push(format!("osd.{peer}: {e}")),
            }
        }
        Err(StoreError::new(
            ErrorCode::Corrupt,
            format!(
                "{id}: the local copy is damaged and no replica could supply a good one ({})",
                if errors.is_empty() {
                    "no other OSD up".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        ))
    }

    pub(super) async fn fetch_whole(
        &self,
        pg: Pg,
        id: &ObjectId,
        addr: &str,
    ) -> Result<(Bytes, ObjVersion), StoreError> {
        const CHUNK: u32 = 4 << 20;
        let conn = self.peer_conn(addr).await?;
        let mut out = bytes::BytesMut::new();
        let mut version = None;
        loop {
            let req = OsdRequest::Fetch {
                pg,
                object: id.name.clone(),
                offset: out.len() as u64,
                len: CHUNK,
            };
            match conn.call::<_, OsdResponse>(&req, REPLICA_TIMEOUT).await? {
                OsdResponse::Fetched {
                    size,
                    version: v,
                    data,
                } => {
                    if version.is_some_and(|old| old != v) {
                        return Err(StoreError::internal("object changed while fetching"));
                    }
                    version = Some(v);
                    out.extend_from_slice(&data);
                    if data.is_empty() || out.len() as u64 >= size {
                        break;
                    }
                }
                OsdResponse::Error(e) => return Err(e),
                other => return Err(StoreError::internal(format!("unexpected reply {other:?}"))),
            }
        }
        Ok((out.freeze(), version.unwrap_or_default()))
    }

    /// Serves a replica's range of an object to a repairing primary.
    pub(super) async fn fetch(&self, pg: Pg, object: String, offset: u64, len: u32) -> OsdResponse {
        let id = ObjectId {
            pool: pg.pool,
            pg: pg.seed,
            name: object,
        };
        let st = match self.store.stat(&id).await {
            Ok(Some(st)) => st,
            Ok(None) => {
                return OsdResponse::Error(StoreError::not_found(format!(
                    "{id} does not exist here"
                )))
            }
            Err(e) => return OsdResponse::Error(obj_err(e)),
        };
        match self.store.read(&id, offset, len as usize).await {
            Ok(data) => OsdResponse::Fetched {
                size: st.size,
                version: st.version,
                data,
            },
            Err(e) => OsdResponse::Error(obj_err(e)),
        }
    }
}
