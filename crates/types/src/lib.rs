//! Shared vocabulary of the store: the cluster map, configuration, the wire frame format
//! and the error and health codes every crate speaks.
//!
//! This crate owns data types and their encodings only. It must not know about placement
//! (CRUSH), consensus, sockets beyond the frame codec, or any storage engine.

pub mod blockdata;
pub mod config;
pub mod error;
pub mod health;
pub mod map;
pub mod msg;
pub mod osdmsg;
pub mod wire;

pub use error::{ErrorCode, StoreError};
pub use health::HealthCode;
