//! Stable health check codes, as in Ceph's `ceph health detail`.
//!
//! A code's string (e.g. `OSD_DOWN`) is the key of its check in a status report and in
//! `storectl status --format json`; it never changes meaning once released. Each code has a
//! fixed severity, a description of when it is raised and a hint telling the operator what
//! to do. docs/ARCHITECTURE.md ("Health") lists them all.

use std::fmt;
use std::str::FromStr;

use crate::msg::Severity;

/// Declares the codes once, so [`HealthCode::ALL`] and [`HealthCode::as_str`] cannot miss
/// one.
macro_rules! health_codes {
    ($($(#[$doc:meta])* $variant:ident => $code:literal,)*) => {
        /// Stable health check codes. Printed as `SCREAMING_SNAKE` strings, e.g. `OSD_DOWN`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum HealthCode {
            $($(#[$doc])* $variant,)*
        }

        impl HealthCode {
            /// Every code, in the order of the table in docs/ARCHITECTURE.md.
            pub const ALL: &'static [HealthCode] = &[$(HealthCode::$variant,)*];

            /// The stable string: the check's key in status reports and JSON output.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(HealthCode::$variant => $code,)*
                }
            }
        }
    };
}

health_codes! {
    /// A voting monitor is down or unreachable.
    MonDown => "MON_DOWN",
    /// Fewer than a majority of voting monitors reachable: the map cannot change.
    MonQuorumLost => "MON_QUORUM_LOST",
    /// An even number of voting monitors.
    EvenMonitorCount => "EVEN_MONITOR_COUNT",
    /// OSDs are down but still in.
    OsdDown => "OSD_DOWN",
    /// An OSD's device is at least 85% used.
    OsdNearfull => "OSD_NEARFULL",
    /// An OSD's device is at least 95% used.
    OsdFull => "OSD_FULL",
    /// An OSD's reads found checksum mismatches on its device.
    OsdScrubErrors => "OSD_SCRUB_ERRORS",
    /// An OSD stopped after its data device returned an I/O error.
    OsdDeviceErrors => "OSD_DEVICE_ERRORS",
    /// Cluster flags are set.
    OsdmapFlags => "OSDMAP_FLAGS",
    /// A pool's size exceeds the number of its failure domains that hold in OSDs.
    PoolSizeExceedsDomains => "POOL_SIZE_EXCEEDS_DOMAINS",
    /// PGs are not serving I/O: inactive, peering, incomplete or down.
    PgAvailability => "PG_AVAILABILITY",
    /// PGs are degraded or undersized.
    PgDegraded => "PG_DEGRADED",
    /// `norebalance` keeps PGs where CRUSH would no longer put them.
    ObjectMisplaced => "OBJECT_MISPLACED",
    /// An image lock is held by a blocklisted session.
    ImageLockBlocklisted => "IMAGE_LOCK_BLOCKLISTED",
    /// An image lock is held by a session that stopped reporting.
    ImageLockOrphaned => "IMAGE_LOCK_ORPHANED",
    /// Operations blocked longer than `osd_op_complaint_time` on an OSD or gateway.
    SlowOps => "SLOW_OPS",
}

impl HealthCode {
    /// How bad it is; the cluster's health is the worst active check's.
    pub fn severity(self) -> Severity {
        match self {
            HealthCode::MonQuorumLost
            | HealthCode::OsdFull
            | HealthCode::OsdScrubErrors
            | HealthCode::OsdDeviceErrors => Severity::Err,
            HealthCode::MonDown
            | HealthCode::EvenMonitorCount
            | HealthCode::OsdDown
            | HealthCode::OsdNearfull
            | HealthCode::OsdmapFlags
            | HealthCode::PoolSizeExceedsDomains
            | HealthCode::PgAvailability
            | HealthCode::PgDegraded
            | HealthCode::ObjectMisplaced
            | HealthCode::ImageLockBlocklisted
            | HealthCode::ImageLockOrphaned
            | HealthCode::SlowOps => Severity::Warn,
        }
    }

    /// When the check is raised.
    pub fn description(self) -> &'static str {
        match self {
            HealthCode::MonDown => "a voting monitor is down or unreachable",
            HealthCode::MonQuorumLost => {
                "fewer than a majority of voting monitors reachable: the cluster map cannot change"
            }
            HealthCode::EvenMonitorCount => {
                "an even number of voting monitors: it tolerates no more failures than one fewer, and a network split can leave no side with quorum"
            }
            HealthCode::OsdDown => "OSDs are down but still in: their PGs are degraded",
            HealthCode::OsdNearfull => "an OSD's device is at least 85% used",
            HealthCode::OsdFull => "an OSD's device is at least 95% used: writes to it fail",
            HealthCode::OsdScrubErrors => {
                "an OSD's reads found checksum mismatches on its device"
            }
            HealthCode::OsdDeviceErrors => {
                "an OSD stopped after its data device returned an I/O error (it is marked down at once)"
            }
            HealthCode::OsdmapFlags => {
                "cluster flags are set (noout, nodown, noup, norebalance, norecover, nobackfill)"
            }
            HealthCode::PoolSizeExceedsDomains => {
                "a pool's size exceeds the number of its failure domains (hosts or OSDs) that hold in OSDs"
            }
            HealthCode::PgAvailability => {
                "PGs are inactive (fewer up OSDs than the pool's min_size, or none), peering, incomplete or down: I/O to them waits"
            }
            HealthCode::PgDegraded => {
                "PGs are degraded (copies missing, being recovered) or undersized (fewer OSDs than the pool's size)"
            }
            HealthCode::ObjectMisplaced => {
                "norebalance keeps PGs where CRUSH would no longer put them"
            }
            HealthCode::ImageLockBlocklisted => {
                "an image lock is held by a blocklisted (fenced) session"
            }
            HealthCode::ImageLockOrphaned => {
                "an image lock is held by a session that has not reported for over client_session_grace"
            }
            HealthCode::SlowOps => {
                "operations blocked longer than osd_op_complaint_time on an OSD or gateway"
            }
        }
    }

    /// What the operator should do about it.
    pub fn hint(self) -> &'static str {
        match self {
            HealthCode::MonDown => {
                "start the monitor, or repair the network to it; `storectl status` says what each monitor answered"
            }
            HealthCode::MonQuorumLost => {
                "start the stopped monitors (or fix the network between them) until a majority answers"
            }
            HealthCode::EvenMonitorCount => {
                "add a monitor (`storectl mon add NAME ADDR`) or remove one (`storectl mon rm NAME`)"
            }
            HealthCode::OsdDown => {
                "start the OSD, or check its host and log; it is marked out after mon_osd_down_out_interval unless noout is set"
            }
            HealthCode::OsdNearfull => {
                "add OSDs or free space before it fills; `storectl status` shows usage"
            }
            HealthCode::OsdFull => "add OSDs or free space now; `storectl status` shows usage",
            HealthCode::OsdScrubErrors => {
                "a damaged copy is read from another replica when one exists; check the OSD's device (kernel log, SMART) and replace it if the count grows"
            }
            HealthCode::OsdDeviceErrors => {
                "check the device (kernel log, SMART) and replace it: `storectl osd out ID`, then `osd purge`; the check clears when the OSD runs again without errors"
            }
            HealthCode::OsdmapFlags => "unset each with `storectl osd unset FLAG` when done",
            HealthCode::PoolSizeExceedsDomains => {
                "add hosts (or OSDs, for failure_domain osd), or lower the size (`storectl pool set POOL size N`)"
            }
            HealthCode::PgAvailability => {
                "start the down OSDs; `storectl health detail` says what the PGs wait for"
            }
            HealthCode::PgDegraded => {
                "recovery runs by itself; start down OSDs or let them be marked out; norecover and nobackfill hold it back"
            }
            HealthCode::ObjectMisplaced => {
                "they move when the flag is unset (`storectl osd unset norebalance`)"
            }
            HealthCode::ImageLockBlocklisted => {
                "the next session to open the image takes the lock; `storectl client blocklist ls` lists fenced sessions"
            }
            HealthCode::ImageLockOrphaned => {
                "check the holder's gateway (`storectl client ls`); a claim from another session breaks the lock"
            }
            HealthCode::SlowOps => {
                "check the named daemon's log and `storectl status`: a slow or full device, a down peer or the network"
            }
        }
    }
}

impl fmt::Display for HealthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is no health code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown health check code {0:?}")]
pub struct UnknownHealthCode(pub String);

impl FromStr for HealthCode {
    type Err = UnknownHealthCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HealthCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownHealthCode(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_is_unique_and_parses_back() {
        let mut seen = HashSet::new();
        for code in HealthCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert_eq!(s.parse::<HealthCode>(), Ok(*code));
            assert_eq!(code.to_string(), s);
            assert!(
                s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{s} is not SCREAMING_SNAKE"
            );
            assert!(!code.description().is_empty() && !code.hint().is_empty());
        }
        assert_eq!(
            "OSD_GONE".parse::<HealthCode>(),
            Err(UnknownHealthCode("OSD_GONE".into()))
        );
    }

    #[test]
    fn severities_are_as_documented() {
        let errs: Vec<&str> = HealthCode::ALL
            .iter()
            .filter(|c| c.severity() == Severity::Err)
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            errs,
            [
                "MON_QUORUM_LOST",
                "OSD_FULL",
                "OSD_SCRUB_ERRORS",
                "OSD_DEVICE_ERRORS"
            ]
        );
        assert!(HealthCode::ALL.iter().all(|c| c.severity() != Severity::Ok));
        assert_eq!(HealthCode::SlowOps.severity(), Severity::Warn);
    }

    /// The Health table in docs/ARCHITECTURE.md lists every code with its severity,
    /// description and hint, as written here.
    #[test]
    fn every_code_is_in_the_architecture_doc() {
        let doc = include_str!("../../../docs/ARCHITECTURE.md");
        for code in HealthCode::ALL {
            let sev = match code.severity() {
                Severity::Ok => "OK",
                Severity::Warn => "WARN",
                Severity::Err => "ERR",
            };
            let row = format!(
                "| `{}` | {sev} | {} | {} |",
                code.as_str(),
                code.description(),
                code.hint()
            );
            assert!(
                doc.lines().any(|l| l == row),
                "docs/ARCHITECTURE.md lacks the row\n{row}"
            );
        }
    }
}
