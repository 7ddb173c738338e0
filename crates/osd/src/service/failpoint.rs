//! Test-only fault injection, from `STORE_FAILPOINT` in the OSD's environment: dropped
//! replica operations and device I/O errors.

use store_objstore::{ObjError, ObjectStore};
use tracing::warn;

use super::OsdService;

/// EIO, as the kernel reports a failed device I/O.
const fn libc_eio() -> i32 {
    5
}

/// A fault the tests inject, from `STORE_FAILPOINT` in the OSD's environment:
/// `drop_replica_op:NAME` makes this OSD silently drop the first replica operation on
/// object NAME (never applied, never answered), so another replica holds a write that the
/// primary never acknowledged: a divergent replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failpoint {
    DropReplicaOp {
        object: String,
    },
    /// `device_eio:NAME`: applying a mutation of object NAME fails as the device would
    /// with EIO.
    DeviceEio {
        object: String,
    },
    /// `refuse_recovery:NAME`: recovering object NAME into this OSD fails as a full
    /// device would (NO_SPACE), every time.
    RefuseRecovery {
        object: String,
    },
}

impl Failpoint {
    pub fn from_env() -> Option<Failpoint> {
        let v = std::env::var("STORE_FAILPOINT").ok()?;
        match v.split_once(':') {
            Some(("drop_replica_op", object)) if !object.is_empty() => {
                Some(Failpoint::DropReplicaOp {
                    object: object.to_string(),
                })
            }
            Some(("device_eio", object)) if !object.is_empty() => Some(Failpoint::DeviceEio {
                object: object.to_string(),
            }),
            Some(("refuse_recovery", object)) if !object.is_empty() => {
                Some(Failpoint::RefuseRecovery {
                    object: object.to_string(),
                })
            }
            // The daemon's own (see `stored`).
            _ if v == "panic_after_start" => None,
            _ => {
                warn!("ignoring unknown STORE_FAILPOINT '{v}'");
                None
            }
        }
    }
}

impl<S: ObjectStore> OsdService<S> {
    /// The `device_eio` failpoint: the result a failing device would give.
    pub(super) fn inject_device_error(
        &self,
        object: &str,
        res: Result<(), ObjError>,
    ) -> Result<(), ObjError> {
        let fp = self.failpoint.lock().expect("failpoint lock");
        match &*fp {
            Some(Failpoint::DeviceEio { object: o }) if o == object => {
                Err(ObjError::Io(std::io::Error::from_raw_os_error(libc_eio())))
            }
            _ => res,
        }
    }

    /// The `refuse_recovery` failpoint: whether recovering `object` into this OSD fails.
    pub(super) fn refuses_recovery(&self, object: &str) -> bool {
        let fp = self.failpoint.lock().expect("failpoint lock");
        matches!(&*fp, Some(Failpoint::RefuseRecovery { object: o }) if o == object)
    }

    /// Whether a one-shot injected fault swallows this replica operation.
    pub(super) fn fire_failpoint(&self, object: &str) -> bool {
        let mut fp = self.failpoint.lock().expect("failpoint lock");
        match fp.as_ref() {
            Some(Failpoint::DropReplicaOp { object: o }) if o == object => {
                warn!(object, "failpoint: dropping a replica operation");
                *fp = None;
                true
            }
            _ => false,
        }
    }
}
