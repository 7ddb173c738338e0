//! Stable, greppable error codes shared by daemons, the client library and the CLI.
//!
//! A code never changes meaning once released; each has a hint telling the operator what to do.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable error codes. Printed as `SCREAMING_SNAKE` strings, e.g. `NO_QUORUM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Fewer than floor(n/2)+1 monitors reachable: the map cannot change.
    NoQuorum,
    /// No monitor (or daemon) answered at the configured addresses.
    Unreachable,
    /// The request named something that does not exist (pool, OSD, monitor, flag).
    NotFound,
    /// The request would create something that already exists.
    AlreadyExists,
    /// The request is malformed or violates a rule (e.g. min_size > size).
    InvalidArgument,
    /// The operation did not complete in time; it may or may not have taken effect.
    Timeout,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer sent bytes that are not a valid frame or message.
    Malformed,
    /// The request is refused because it is unsafe (e.g. removing the last monitor).
    NotPermitted,
    /// The peer belongs to another cluster (fsid mismatch).
    WrongCluster,
    /// The data cannot be served now: its PG has fewer than min_size OSDs up, or is busy.
    Unavailable,
    /// The device is full.
    NoSpace,
    /// A stored copy failed its checksum.
    Corrupt,
    /// A bug or an unexpected local failure; the message says which.
    Internal,
    /// The client session is fenced: its writes and lock requests are refused.
    Blocklisted,
    /// The write's image lock generation is no longer current: the lock moved elsewhere.
    LockLost,
    /// The image lock is held by another live session, which was asked to release it.
    LockBusy,
    /// An OSD's data device returned an I/O error: the OSD stops (its PGs are served by
    /// the other OSDs).
    DeviceError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoQuorum => "NO_QUORUM",
            ErrorCode::Unreachable => "UNREACHABLE",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::VersionMismatch => "VERSION_MISMATCH",
            ErrorCode::Malformed => "MALFORMED",
            ErrorCode::NotPermitted => "NOT_PERMITTED",
            ErrorCode::WrongCluster => "WRONG_CLUSTER",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::NoSpace => "NO_SPACE",
            ErrorCode::Corrupt => "CORRUPT",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Blocklisted => "BLOCKLISTED",
            ErrorCode::LockLost => "LOCK_LOST",
            ErrorCode::LockBusy => "LOCK_BUSY",
            ErrorCode::DeviceError => "DEVICE_ERROR",
        }
    }

    /// What the operator should do about it.
    pub fn hint(self) -> &'static str {
        match self {
            ErrorCode::NoQuorum => {
                "start the stopped monitors (or fix the network between them) until a majority answers"
            }
            ErrorCode::Unreachable => {
                "check that the daemons run and that mon_host in store.conf names their addresses"
            }
            ErrorCode::NotFound => "check the name or id (`storectl pool ls`, `storectl osd tree`)",
            ErrorCode::AlreadyExists => "choose another name, or remove the existing one first",
            ErrorCode::InvalidArgument => "fix the argument as the message says",
            ErrorCode::Timeout => "check `storectl status`; the change may still have been applied",
            ErrorCode::VersionMismatch => "run the same release on all daemons and clients",
            ErrorCode::Malformed => "a client or peer sent invalid bytes; check what connects to this port",
            ErrorCode::NotPermitted => "read the reason; it protects data or quorum",
            ErrorCode::WrongCluster => {
                "the conf file or data dir belongs to another cluster; check fsid in store.conf"
            }
            ErrorCode::Unavailable => {
                "check `storectl status` for down OSDs and inactive PGs; bring OSDs back up"
            }
            ErrorCode::NoSpace => "add OSDs or free space; `storectl status` shows usage",
            ErrorCode::Corrupt => "the copy is damaged on one OSD; it is read from another replica when one exists",
            ErrorCode::Internal => "report a bug with the daemon's log",
            ErrorCode::Blocklisted => {
                "this client was fenced (`storectl client blocklist ls`); restart the VM's disk access from a live host"
            }
            ErrorCode::LockLost => {
                "another session took the image's lock; the writer asks for it back on its next write"
            }
            ErrorCode::LockBusy => {
                "another live session holds the image lock (`storectl client ls`); it releases when it stops writing"
            }
            ErrorCode::DeviceError => {
                "the OSD's disk failed an I/O: check `dmesg` and SMART on its host, then replace the device (`storectl osd out`, `osd purge`)"
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that crosses the wire: a stable code plus a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StoreError {
    pub code: ErrorCode,
    pub message: String,
}

impl StoreError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        StoreError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The message with the operator hint appended, for CLI output.
    pub fn with_hint(&self) -> String {
        format!("{} (hint: {})", self, self.code.hint())
    }
}
