//! Raft RPCs between monitors, carried as `MonRequest::Raft { kind, body }` frames on the
//! monitors' ordinary port. The bodies are postcard encodings of openraft's own types.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use store_client::RpcConn;
use store_types::msg::{MonRequest, MonResponse};
use store_types::wire::{self, DEFAULT_MAX_FRAME_BYTES};
use store_types::{ErrorCode, StoreError};

use super::{MonNode, MonRaft, TypeConfig};

const KIND_APPEND: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;

pub struct PeerNetwork {
    #[allow(dead_code)]
    fsid: String,
}

impl PeerNetwork {
    pub fn new(fsid: String) -> Self {
        PeerNetwork { fsid }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &MonNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            conn: None,
        }
    }
}

/// One peer monitor; reconnects lazily after a failure.
pub struct PeerClient {
    target: u64,
    addr: String,
    conn: Option<RpcConn>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerErr(String);

impl PeerClient {
    async fn call<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &mut self,
        kind: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, MonNode, RaftError<u64, E>>> {
        // openraft's own logs are off by default (it reports a down peer at ERROR on every
        // retry); peer trouble is logged here at debug and shows in health as MON_DOWN.
        let unreachable = |e: &dyn std::fmt::Display| {
            tracing::debug!(peer = self.target, addr = %self.addr, "raft rpc failed: {e}");
            RPCError::Unreachable(Unreachable::new(&PeerErr(format!("{}: {e}", self.addr))))
        };
        let timeout = option.hard_ttl();
        let conn = match self.conn.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => c.clone(),
            None => {
                let (c, _) = RpcConn::connect(&self.addr, timeout, DEFAULT_MAX_FRAME_BYTES)
                    .await
                    .map_err(|e| unreachable(&e))?;
                self.conn = Some(c.clone());
                c
            }
        };
        let body =
            postcard::to_stdvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp: MonResponse = conn
            .call(&MonRequest::Raft { kind, body }, timeout)
            .await
            .map_err(|e| {
                self.conn = None;
                unreachable(&e)
            })?;
        let bytes = match resp {
            MonResponse::Raft(b) => b,
            MonResponse::Error(e) => return Err(unreachable(&e)),
            other => return Err(unreachable(&format!("unexpected reply {other:?}"))),
        };
        let res: Result<Resp, RaftError<u64, E>> =
            wire::decode_payload(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, MonNode, RaftError<u64>>> {
        self.call(KIND_APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, MonNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(KIND_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, MonNode, RaftError<u64>>> {
        self.call(KIND_VOTE, &rpc, &option).await
    }
}

fn malformed(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(ErrorCode::Malformed, format!("raft rpc: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(v).map_err(|e| StoreError::internal(format!("raft rpc encode: {e}")))
}

/// Serves one Raft RPC from a peer.
pub async fn serve(raft: &MonRaft, kind: u8, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    match kind {
        KIND_APPEND => {
            let req: AppendEntriesRequest<TypeConfig> =
                wire::decode_payload(body).map_err(malformed)?;
            encode(&raft.append_entries(req).await)
        }
        KIND_VOTE => {
            let req: VoteRequest<u64> = wire::decode_payload(body).map_err(malformed)?;
            encode(&raft.vote(req).await)
        }
        KIND_SNAPSHOT => {
            let req: InstallSnapshotRequest<TypeConfig> =
                wire::decode_payload(body).map_err(malformed)?;
            encode(&raft.install_snapshot(req).await)
        }
        other => Err(malformed(format!("unknown raft rpc kind {other}"))),
    }
}
