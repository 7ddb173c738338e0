//! Raft log and state machine on RocksDB.
//!
//! Column families:
//! - `log`: log index (u64 big-endian, so keys sort by index) → entry record;
//! - `meta`: vote, committed log id, last purged log id, the monitor's identity;
//! - `sm`: the applied state (map + last applied + membership) and the current snapshot.
//!
//! Log writes and votes are synced before openraft is told they are durable. The state
//! machine is written through RocksDB's WAL without fsync: it can always be rebuilt from the
//! durable log and committed index. Every record carries a format version.

// openraft's trait methods return its StorageError by value; our helpers return the same.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use store_types::map::{ClusterMap, MonInfo};
use store_types::msg::CommandOutcome;
use store_types::wire::{decode_record, encode_record};
use tokio::sync::watch;

use super::{MonNode, TypeConfig};
use crate::apply::{apply_command, set_mons};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";
/// Format version of every record this module writes.
const RECORD_V: u16 = 3;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_IDENTITY: &[u8] = b"identity";
const KEY_STATE: &[u8] = b"state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

type NodeId = u64;
type SErr = StorageError<NodeId>;

#[cfg(test)]
#[path = "golden.rs"]
mod golden;

/// Who this data dir belongs to; checked at every start so a foreign dir is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonIdentity {
    pub fsid: String,
    pub mon_id: u64,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("monitor data dir {dir}: {message}")]
    Refused { dir: String, message: String },
    #[error("monitor data dir {dir}: RocksDB: {source}")]
    Rocks { dir: String, source: rocksdb::Error },
}

/// The applied state, persisted as one record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SmState {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, MonNode>,
    pub map: ClusterMap,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MonNode>,
    data: Vec<u8>,
}

/// Opens (or, for an empty or missing dir, creates) the monitor's RocksDB.
/// A non-empty dir that is not our RocksDB, or that belongs to another cluster or monitor,
/// is refused: a store is never silently reset.
pub fn open_db(dir: &Path, identity: &MonIdentity) -> Result<Arc<DB>, OpenError> {
    let d = dir.display().to_string();
    let refused = |message: String| OpenError::Refused {
        dir: d.clone(),
        message,
    };
    let fresh = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(refused(format!("cannot read: {e}"))),
    };
    if !fresh && !dir.join("CURRENT").exists() {
        return Err(refused(
            "not empty and not a monitor store (no RocksDB CURRENT file); refusing to touch it"
                .into(),
        ));
    }
    let mut opts = Options::default();
    opts.create_if_missing(fresh);
    opts.create_missing_column_families(fresh);
    opts.set_keep_log_file_num(4);
    let cfs = [CF_LOG, CF_META, CF_SM]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| OpenError::Rocks {
        dir: d.clone(),
        source,
    })?;
    let rocks = |source| OpenError::Rocks {
        dir: d.clone(),
        source,
    };
    let meta = db
        .cf_handle(CF_META)
        .expect("opened with this column family");
    match db.get_cf(meta, KEY_IDENTITY).map_err(rocks)? {
        None if fresh => {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(meta, KEY_IDENTITY, encode_record(RECORD_V, identity), &wo)
                .map_err(rocks)?;
        }
        None => {
            return Err(refused(
                "has no monitor identity record; refusing to use it".into(),
            ))
        }
        Some(bytes) => {
            let found: MonIdentity = decode_record(RECORD_V, &bytes)
                .map_err(|e| refused(format!("unreadable identity record: {e}")))?;
            if found.fsid != identity.fsid {
                return Err(refused(format!(
                    "belongs to cluster {}, but store.conf says fsid {}",
                    found.fsid, identity.fsid
                )));
            }
            if found.mon_id != identity.mon_id || found.name != identity.name {
                return Err(refused(format!(
                    "belongs to mon.{} (id {}), not mon.{} (id {})",
                    found.name, found.mon_id, identity.name, identity.mon_id
                )));
            }
        }
    }
    Ok(Arc::new(db))
}

fn io_read(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::read(&e).into()
}

fn io_write(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write(&e).into()
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

fn get_record<T: for<'de> Deserialize<'de>>(
    db: &DB,
    cf: &str,
    key: &[u8],
) -> Result<Option<T>, SErr> {
    let h = db.cf_handle(cf).expect("column family exists");
    match db.get_cf(h, key).map_err(io_read)? {
        None => Ok(None),
        Some(b) => decode_record(RECORD_V, &b).map(Some).map_err(io_read),
    }
}

fn put_record<T: Serialize>(db: &DB, cf: &str, key: &[u8], v: &T, sync: bool) -> Result<(), SErr> {
    let h = db.cf_handle(cf).expect("column family exists");
    let wo = if sync {
        synced()
    } else {
        WriteOptions::default()
    };
    db.put_cf_opt(h, key, encode_record(RECORD_V, v), &wo)
        .map_err(io_write)
}

/// The Raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        LogStore { db }
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, SErr> {
        let h = self.db.cf_handle(CF_LOG).expect("column family exists");
        let mut it = self.db.iterator_cf(h, IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(kv) => {
                let (_, v) = kv.map_err(io_read)?;
                let e: Entry<TypeConfig> = decode_record(RECORD_V, &v).map_err(io_read)?;
                Ok(Some(e.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let h = self.db.cf_handle(CF_LOG).expect("column family exists");
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(
            h,
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        ) {
            let (k, v) = kv.map_err(io_read)?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io_read(std::io::Error::other("log key is not 8 bytes")))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(decode_record(RECORD_V, &v).map_err(io_read)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = get_record(&self.db, CF_META, KEY_PURGED)?;
        let last = self.last_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        put_record(&self.db, CF_META, KEY_VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_record(&self.db, CF_META, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        put_record(&self.db, CF_META, KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_record::<Option<LogId<NodeId>>>(&self.db, CF_META, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let h = self.db.cf_handle(CF_LOG).expect("column family exists");
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put_cf(h, e.log_id.index.to_be_bytes(), encode_record(RECORD_V, &e));
        }
        let res = self.db.write_opt(batch, &synced());
        let io_res = res
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io_res);
        res.map_err(io_write)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let h = self.db.cf_handle(CF_LOG).expect("column family exists");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        // delete_range's end is exclusive: u64::MAX itself is never a real index.
        self.db.write_opt(batch, &synced()).map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // Record the purge point first so a crash in between never loses it.
        put_record(&self.db, CF_META, KEY_PURGED, &log_id, true)?;
        let h = self.db.cf_handle(CF_LOG).expect("column family exists");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db.write(batch).map_err(io_write)
    }
}

/// The state machine: the cluster map.
pub struct StateMachine {
    db: Arc<DB>,
    state: SmState,
    map_tx: watch::Sender<Arc<ClusterMap>>,
    snapshot_seq: u64,
}

impl StateMachine {
    /// Loads the applied state, or starts from an empty map for `fsid`.
    pub fn load(db: Arc<DB>, fsid: &str) -> Result<(Self, watch::Receiver<Arc<ClusterMap>>), SErr> {
        let state = get_record::<SmState>(&db, CF_SM, KEY_STATE)?.unwrap_or_else(|| SmState {
            last_applied: None,
            membership: StoredMembership::default(),
            map: ClusterMap::new(fsid),
        });
        let (map_tx, map_rx) = watch::channel(Arc::new(state.map.clone()));
        Ok((
            StateMachine {
                db,
                state,
                map_tx,
                snapshot_seq: 0,
            },
            map_rx,
        ))
    }

    fn persist(&self) -> Result<(), SErr> {
        put_record(&self.db, CF_SM, KEY_STATE, &self.state, false)
    }

    fn publish(&self) {
        let cur = self.map_tx.borrow().epoch;
        assert!(
            self.state.map.epoch >= cur,
            "map epoch went backwards: {} -> {}",
            cur,
            self.state.map.epoch
        );
        if self.state.map.epoch != cur
            || self.state.map.mons.len() != self.map_tx.borrow().mons.len()
        {
            self.map_tx.send_replace(Arc::new(self.state.map.clone()));
        }
    }

    fn apply_membership(&mut self) {
        let m = self.state.membership.membership();
        let voters: std::collections::BTreeSet<u64> = m.voter_ids().collect();
        let mons: Vec<MonInfo> = m
            .nodes()
            .map(|(id, n)| MonInfo {
                id: *id,
                name: n.name.clone(),
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        set_mons(&mut self.state.map, mons);
    }
}

/// Result of applying one entry (what the proposer gets back).
pub type ApplyResult = Result<CommandOutcome, store_types::StoreError>;

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MonNode>), SErr> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<super::Response>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            self.state.last_applied = Some(e.log_id);
            let res = match e.payload {
                EntryPayload::Blank => noop(self.state.map.epoch),
                EntryPayload::Normal(cmd) => apply_command(&mut self.state.map, &cmd),
                EntryPayload::Membership(m) => {
                    self.state.membership = StoredMembership::new(Some(e.log_id), m);
                    self.apply_membership();
                    noop(self.state.map.epoch)
                }
            };
            out.push(super::Response(res));
        }
        self.persist()?;
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MonNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let state: SmState = decode_record(RECORD_V, &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if state.map.fsid != self.state.map.fsid {
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                &std::io::Error::other(format!(
                    "snapshot of cluster {} offered to cluster {}",
                    state.map.fsid, self.state.map.fsid
                )),
            )
            .into());
        }
        self.state = state;
        self.persist()?;
        put_record(
            &self.db,
            CF_SM,
            KEY_SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
            false,
        )?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let s: Option<StoredSnapshot> = get_record(&self.db, CF_SM, KEY_SNAPSHOT)?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

fn noop(epoch: u64) -> ApplyResult {
    Ok(CommandOutcome {
        epoch,
        changed: false,
        message: String::new(),
        osd_id: None,
        lock_generation: None,
    })
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    state: SmState,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let data = encode_record(RECORD_V, &self.state);
        let snapshot_id = match self.state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.membership.clone(),
            snapshot_id,
        };
        put_record(
            &self.db,
            CF_SM,
            KEY_SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
            false,
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
