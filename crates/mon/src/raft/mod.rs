//! The one place that knows openraft. Everything else in the monitor talks to
//! [`crate::consensus::Consensus`], so an openraft upgrade touches only this module.

pub mod network;
pub mod store;
#[cfg(test)]
mod suite_test;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, Raft, ServerState};
use serde::{Deserialize, Serialize};
use store_types::map::{ClusterMap, MonId};
use store_types::msg::{CommandOutcome, MapCommand};
use store_types::{ErrorCode, StoreError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::consensus::{Consensus, ConsensusError, LeaderInfo};
use store::{LogStore, MonIdentity, StateMachine};

/// A monitor as a Raft node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonNode {
    pub name: String,
    pub addr: String,
}

impl std::fmt::Display for MonNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mon.{}@{}", self.name, self.addr)
    }
}

/// What applying one log entry returned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response(pub Result<CommandOutcome, StoreError>);

openraft::declare_raft_types!(
    pub TypeConfig:
        D = MapCommand,
        R = Response,
        NodeId = u64,
        Node = MonNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type MonRaft = Raft<TypeConfig>;

/// Raft timing. Elections after 1-2 s of silence: fast failover, yet no spurious elections
/// on a loaded 2-core machine.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 200,
            election_min_ms: 1000,
            election_max_ms: 2000,
        }
    }
}

/// openraft behind our [`Consensus`] trait.
pub struct RaftConsensus {
    raft: MonRaft,
    id: MonId,
    map_rx: watch::Receiver<Arc<ClusterMap>>,
}

impl RaftConsensus {
    /// Opens the store in `dir` and starts the Raft node. `initial` is the initial monitor set
    /// when this monitor is one of the initial members (it then bootstraps the cluster if its
    /// log is empty); None for a monitor added later.
    pub async fn start(
        dir: &Path,
        identity: MonIdentity,
        initial: Option<BTreeMap<MonId, MonNode>>,
        timing: RaftTiming,
    ) -> Result<Self, StoreError> {
        let db = store::open_db(dir, &identity).map_err(|e| StoreError::internal(e.to_string()))?;
        let log = LogStore::new(db.clone());
        let (sm, map_rx) = StateMachine::load(db, &identity.fsid)
            .map_err(|e| StoreError::internal(format!("loading monitor state: {e}")))?;
        let config = Config {
            cluster_name: identity.fsid.clone(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::internal(format!("raft config: {e}")))?;
        let network = network::PeerNetwork::new(identity.fsid.clone());
        let raft = Raft::new(identity.mon_id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| StoreError::internal(format!("starting raft: {e}")))?;
        if let Some(members) = initial {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| StoreError::internal(e.to_string()))?;
            if !initialized {
                info!(members = ?members.keys().collect::<Vec<_>>(), "bootstrapping monitor cluster");
                // Every initial member may do this with the same set; Raft elects one leader.
                if let Err(e) = raft.initialize(members).await {
                    warn!("initialize: {e}");
                }
            }
        }
        Ok(RaftConsensus {
            raft,
            id: identity.mon_id,
            map_rx,
        })
    }

    fn leader_info(&self) -> Option<LeaderInfo> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some(LeaderInfo {
            id,
            name: node.name,
            addr: node.addr,
        })
    }

    fn map_client_write_err(
        &self,
        e: RaftError<u64, ClientWriteError<u64, MonNode>>,
    ) -> ConsensusError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                ConsensusError::NotLeader(f.leader_id.zip(f.leader_node).map(|(id, n)| {
                    LeaderInfo {
                        id,
                        name: n.name,
                        addr: n.addr,
                    }
                }))
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ConsensusError::Rejected(StoreError::new(ErrorCode::NotPermitted, e.to_string()))
            }
            RaftError::Fatal(f) => {
                tracing::error!("raft stopped: {f}");
                ConsensusError::Fatal(f.to_string())
            }
        }
    }

    /// Match index of a peer as the leader sees it (None when not leader or unknown).
    fn matched_index(&self, id: MonId) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        m.replication?.get(&id).cloned().flatten().map(|l| l.index)
    }

    async fn add_voter(
        &self,
        name: String,
        addr: String,
        catch_up: Duration,
    ) -> Result<CommandOutcome, ConsensusError> {
        let map = self.map_rx.borrow().clone();
        if map.mons.values().any(|m| m.name == name && m.voter) {
            return Err(ConsensusError::Rejected(StoreError::new(
                ErrorCode::AlreadyExists,
                format!("mon.{name} is already a member"),
            )));
        }
        if let Some(m) = map.mons.values().find(|m| m.addr == addr && m.name != name) {
            return Err(ConsensusError::Rejected(StoreError::invalid(format!(
                "address {addr} is already used by mon.{}",
                m.name
            ))));
        }
        let id = map
            .mons
            .values()
            .find(|m| m.name == name)
            .map(|m| m.id)
            .unwrap_or_else(|| map.mons.keys().max().copied().unwrap_or(0) + 1);
        let node = MonNode {
            name: name.clone(),
            addr,
        };
        self.raft
            .add_learner(id, node, false)
            .await
            .map_err(|e| self.map_client_write_err(e))?;
        // Promote only once the learner has caught up, so the new member cannot stall commits.
        let deadline = tokio::time::Instant::now() + catch_up;
        loop {
            let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            if self.matched_index(id).is_some_and(|i| i + 1 >= last) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ConsensusError::Rejected(StoreError::new(
                    ErrorCode::Timeout,
                    format!(
                        "mon.{name} (id {id}) was added as a learner but has not caught up within {} s: \
                         start it with `stored mon --id {name}` and run `storectl mon add` again to promote it",
                        catch_up.as_secs()
                    ),
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resp = self
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(|e| self.map_client_write_err(e))?;
        Ok(CommandOutcome {
            epoch: self.map_rx.borrow().epoch,
            changed: true,
            message: format!("mon.{name} (id {id}) added at log {}", resp.log_id),
            osd_id: None,
            lock_generation: None,
        })
    }

    async fn remove_voter(&self, name: String) -> Result<CommandOutcome, ConsensusError> {
        let map = self.map_rx.borrow().clone();
        let Some(mon) = map.mons.values().find(|m| m.name == name).cloned() else {
            return Err(ConsensusError::Rejected(StoreError::not_found(format!(
                "mon.{name} is not a member"
            ))));
        };
        if map.voters().count() <= 1 && mon.voter {
            return Err(ConsensusError::Rejected(StoreError::new(
                ErrorCode::NotPermitted,
                "refusing to remove the last monitor",
            )));
        }
        let change = if mon.voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([mon.id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([mon.id]))
        };
        let resp = self
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.map_client_write_err(e))?;
        Ok(CommandOutcome {
            epoch: self.map_rx.borrow().epoch,
            changed: true,
            message: format!("mon.{name} removed at log {}", resp.log_id),
            osd_id: None,
            lock_generation: None,
        })
    }
}

impl Consensus for RaftConsensus {
    fn my_id(&self) -> MonId {
        self.id
    }

    fn leader(&self) -> Option<LeaderInfo> {
        self.leader_info()
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    fn map(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.map_rx.clone()
    }

    async fn propose(&self, cmd: MapCommand) -> Result<CommandOutcome, ConsensusError> {
        let resp = self
            .raft
            .client_write(cmd)
            .await
            .map_err(|e| self.map_client_write_err(e))?;
        resp.data.0.map_err(ConsensusError::Rejected)
    }

    async fn add_monitor(
        &self,
        name: String,
        addr: String,
        catch_up: Duration,
    ) -> Result<CommandOutcome, ConsensusError> {
        self.add_voter(name, addr, catch_up).await
    }

    async fn remove_monitor(&self, name: String) -> Result<CommandOutcome, ConsensusError> {
        self.remove_voter(name).await
    }

    async fn handle_peer_rpc(&self, kind: u8, body: &[u8]) -> Result<Vec<u8>, StoreError> {
        network::serve(&self.raft, kind, body).await
    }

    async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            warn!("raft shutdown: {e}");
        }
    }
}
