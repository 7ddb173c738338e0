//! Slow operations reported by daemons, sans-IO: reports in, the current SLOW_OPS picture
//! out (Ceph's SLOW_OPS: "N slow ops, oldest one blocked for S sec, daemons [...] have
//! slow ops").
//!
//! OSDs report in each heartbeat (every `osd_heartbeat_interval`), gateways and other
//! image clients in each session heartbeat (every second). A daemon that stops reporting
//! (it died, or lost this monitor) stops counting after [`REPORT_HORIZON_MS`]: its ops are
//! gone with it, and OSD_DOWN or the lock checks say the rest.

use std::collections::BTreeMap;

use store_types::msg::SlowOps;

use crate::clock::Now;

/// How long a report counts without being renewed.
pub const REPORT_HORIZON_MS: u64 = 10_000;
/// Daemons tracked at most (a report beyond it is dropped): the table's bound.
pub const MAX_DAEMONS: usize = 4096;

#[derive(Debug, Default)]
pub struct SlowOpsTable {
    /// By daemon name (`osd.3`, `gateway 10.0.0.5:10809 on pve1`): its last report, and
    /// when it came (monotonic).
    reports: BTreeMap<String, (SlowOps, u64)>,
}

impl SlowOpsTable {
    /// Records a daemon's report (a report of none clears it).
    pub fn report(&mut self, daemon: &str, ops: SlowOps, now: Now) {
        self.reports
            .retain(|_, (_, at)| now.mono_ms.saturating_sub(*at) <= REPORT_HORIZON_MS);
        if ops.count == 0 {
            self.reports.remove(daemon);
        } else if self.reports.len() < MAX_DAEMONS || self.reports.contains_key(daemon) {
            self.reports.insert(daemon.to_string(), (ops, now.mono_ms));
        }
    }

    /// The daemons with slow ops now, by name.
    pub fn current(&self, now: Now) -> Vec<(String, SlowOps)> {
        self.reports
            .iter()
            .filter(|(_, (_, at))| now.mono_ms.saturating_sub(*at) <= REPORT_HORIZON_MS)
            .map(|(d, (ops, _))| (d.clone(), ops.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(count: u64, age_ms: u64) -> SlowOps {
        SlowOps {
            count,
            oldest_age_ms: age_ms,
            oldest: "write obj (pg 1.0)".into(),
        }
    }

    #[test]
    fn reports_count_until_cleared_or_stale() {
        let mut t = SlowOpsTable::default();
        let now = Now::default();
        t.report("osd.1", slow(2, 31_000), now);
        t.report("osd.2", slow(0, 0), now);
        assert_eq!(t.current(now).len(), 1);
        // Cleared by a report of none.
        t.report("osd.1", slow(0, 0), now.plus_ms(1000));
        assert!(t.current(now.plus_ms(1000)).is_empty());
        // A daemon that stops reporting stops counting.
        t.report("osd.3", slow(1, 40_000), now);
        assert_eq!(t.current(now.plus_ms(REPORT_HORIZON_MS)).len(), 1);
        assert!(t.current(now.plus_ms(REPORT_HORIZON_MS + 1)).is_empty());
    }
}
