//! The client library: how gateways, OSDs and `storectl` talk to the cluster.
//!
//! It owns connections (multiplexed request/reply over the frame protocol), monitor failover
//! and map subscriptions. It must not know how monitors reach consensus or how OSDs store
//! data; object I/O to OSDs joins it with the replicated I/O issue.

pub mod conn;
pub mod mon;

pub use conn::RpcConn;
pub use mon::{MonClient, MonClientOptions};
