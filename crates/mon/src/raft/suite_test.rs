//! openraft's own storage test suite (`openraft::testing::Suite`) against our RocksDB log
//! store and state machine, each store in its own temporary directory.
//!
//! Every case of the suite applies (none is skipped). Two notes on how they meet our
//! design:
//! - The suite builds memberships with default nodes (`MonNode` with empty name and
//!   address); applying them writes such monitors into the map (`set_mons`), which is fine
//!   for a store under test.
//! - `get_initial_state_re_apply_committed` only runs its assertions when the store
//!   persists the committed log id; ours does (`save_committed`), so they run.
//! - `transfer_snapshot` builds both stores with the same fsid, so it exercises
//!   `install_snapshot` accepting a snapshot; refusing one of another cluster is ours
//!   alone, tested below.

use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{RaftSnapshotBuilder, StorageError};
use tempfile::TempDir;

use super::store::{open_db, LogStore, MonIdentity, StateMachine};
use super::TypeConfig;

/// Fresh stores of cluster `fsid`, each in a new temporary directory removed when the
/// guard drops.
struct TempStores {
    fsid: &'static str,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for TempStores {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let identity = MonIdentity {
            fsid: self.fsid.into(),
            mon_id: 1,
            name: "a".into(),
        };
        let db = open_db(dir.path(), &identity).expect("a fresh monitor store opens");
        let (sm, _map_rx) = StateMachine::load(db.clone(), self.fsid)?;
        Ok((dir, LogStore::new(db), sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_rocksdb_store() {
    Suite::test_all(TempStores { fsid: "suite" }).expect("openraft storage suite");
}

#[tokio::test]
async fn a_snapshot_of_another_cluster_is_refused() {
    let (_a, _, mut ours) = TempStores { fsid: "ours" }.build().await.unwrap();
    let (_b, _, mut theirs) = TempStores { fsid: "theirs" }.build().await.unwrap();
    let snap = theirs
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let err = ours
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("offered to cluster ours"), "{err}");
    assert!(ours.get_current_snapshot().await.unwrap().is_none());
}
