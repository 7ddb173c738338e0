//! The monitor's view of consensus: propose a map change, learn the leader, follow the map.
//!
//! Only [`crate::raft`] implements it (with openraft); the rest of the monitor is written
//! against this trait so that the consensus library can change behind one module.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use store_types::map::{ClusterMap, MonId};
use store_types::msg::{CommandOutcome, MapCommand};
use store_types::StoreError;
use tokio::sync::watch;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    pub id: MonId,
    pub name: String,
    pub addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// This monitor is not the leader; the leader, if known.
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<LeaderInfo>),
    /// The command was applied and refused by the map's rules (deterministically).
    #[error(transparent)]
    Rejected(StoreError),
    /// The consensus engine stopped.
    #[error("consensus stopped: {0}")]
    Fatal(String),
}

pub trait Consensus: Send + Sync + 'static {
    fn my_id(&self) -> MonId;
    fn leader(&self) -> Option<LeaderInfo>;
    fn is_leader(&self) -> bool;
    /// The newest applied map; changes with every applied entry that bumps the epoch.
    fn map(&self) -> watch::Receiver<Arc<ClusterMap>>;
    /// Commits one map change and returns what applying it did. Waits for a quorum.
    fn propose(
        &self,
        cmd: MapCommand,
    ) -> impl Future<Output = Result<CommandOutcome, ConsensusError>> + Send;
    fn add_monitor(
        &self,
        name: String,
        addr: String,
        catch_up: Duration,
    ) -> impl Future<Output = Result<CommandOutcome, ConsensusError>> + Send;
    fn remove_monitor(
        &self,
        name: String,
    ) -> impl Future<Output = Result<CommandOutcome, ConsensusError>> + Send;
    /// Serves a consensus RPC from a peer monitor.
    fn handle_peer_rpc(
        &self,
        kind: u8,
        body: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
