//! The client library: how gateways, OSDs and `storectl` talk to the cluster.
//!
//! It owns connections (multiplexed request/reply over the frame protocol), monitor failover,
//! map subscriptions and object I/O routed to each PG's primary. It must not know how
//! monitors reach consensus or how OSDs store data.

pub mod conn;
pub mod lowat;
pub mod mon;
pub mod objects;
pub mod optrack;
pub mod server;

pub use conn::RpcConn;
pub use mon::{MonClient, MonClientOptions, MonFanout};
pub use objects::ObjectClient;
