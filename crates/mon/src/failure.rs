//! OSD failure detection, sans-IO: heartbeats and clock ticks in, map commands out.
//!
//! OSDs heartbeat every monitor, so whichever monitor leads has fresh data. Only the leader
//! acts. A new leader gives every OSD a full grace period from the moment it took over, so a
//! leader change never marks healthy OSDs down.

use std::collections::HashMap;

use store_types::map::{ClusterMap, Flag, OsdId};
use store_types::msg::{MapCommand, OsdStat};
use store_types::osdmsg::PgReport;

#[derive(Clone, Copy, Debug)]
pub struct FailurePolicy {
    /// Without a heartbeat for this long, an up OSD is marked down.
    pub grace_ms: u64,
    /// Down for this long (and noout not set), an in OSD is marked out.
    pub down_out_ms: u64,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            grace_ms: 20_000,
            down_out_ms: 600_000,
        }
    }
}

/// The window recovery rates are measured over.
pub const RATE_WINDOW_MS: u64 = 10_000;

/// Recovered-object counts over time, summed over OSDs: the recovery rate.
#[derive(Debug, Default)]
pub struct RecoveryMeter {
    total: u64,
    /// (time, total) samples, oldest first, within twice the window.
    samples: std::collections::VecDeque<(u64, u64)>,
}

impl RecoveryMeter {
    pub fn add(&mut self, delta: u64, now_ms: u64) {
        self.total += delta;
        self.samples.push_back((now_ms, self.total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > 2 * RATE_WINDOW_MS)
            || self.samples.len() > 4096
        {
            self.samples.pop_front();
        }
    }

    pub fn rate_per_sec(&self, now_ms: u64) -> Option<u64> {
        let (t1, n1) = *self.samples.back()?;
        let (t0, n0) = *self
            .samples
            .iter()
            .find(|(t, _)| now_ms.saturating_sub(*t) <= RATE_WINDOW_MS)?;
        (t1 > t0 + 1000).then(|| (n1 - n0) * 1000 / (t1 - t0))
    }
}

#[derive(Debug, Default)]
pub struct FailureDetector {
    policy: FailurePolicy,
    last_seen_ms: HashMap<OsdId, u64>,
    stats: HashMap<OsdId, OsdStat>,
    /// Each OSD's last report of the PGs it is primary of that are not active, with the
    /// map epoch the report is true of.
    pg_reports: HashMap<OsdId, (u64, Vec<PgReport>)>,
    recovery: RecoveryMeter,
    recovery_bytes: RecoveryMeter,
    /// Since when this monitor leads; None when it does not.
    leader_since_ms: Option<u64>,
}

impl FailureDetector {
    pub fn new(policy: FailurePolicy) -> Self {
        FailureDetector {
            policy,
            ..Default::default()
        }
    }

    pub fn heartbeat(&mut self, id: OsdId, stat: OsdStat, pgs: (u64, Vec<PgReport>), now_ms: u64) {
        let seen = self.last_seen_ms.entry(id).or_insert(now_ms);
        *seen = (*seen).max(now_ms);
        let before = self.stats.get(&id).copied().unwrap_or_default();
        // A restarted OSD counts from zero again.
        let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
        self.recovery.add(
            delta(stat.recovered_objects, before.recovered_objects),
            now_ms,
        );
        self.recovery_bytes
            .add(delta(stat.recovered_bytes, before.recovered_bytes), now_ms);
        self.stats.insert(id, stat);
        self.pg_reports.insert(id, pgs);
    }

    /// Objects and bytes recovered per second over the last [`RATE_WINDOW_MS`], when
    /// known.
    pub fn recovery_rate(&self, now_ms: u64) -> (Option<u64>, Option<u64>) {
        (
            self.recovery.rate_per_sec(now_ms),
            self.recovery_bytes.rate_per_sec(now_ms),
        )
    }

    pub fn pg_reports(&self) -> &HashMap<OsdId, (u64, Vec<PgReport>)> {
        &self.pg_reports
    }

    pub fn stats(&self) -> &HashMap<OsdId, OsdStat> {
        &self.stats
    }

    /// Tells the detector whether this monitor leads now.
    pub fn set_leader(&mut self, leader: bool, now_ms: u64) {
        match (leader, self.leader_since_ms) {
            (true, None) => self.leader_since_ms = Some(now_ms),
            (false, Some(_)) => self.leader_since_ms = None,
            _ => {}
        }
    }

    /// The commands the leader should propose now (none when not leading).
    pub fn tick(&self, map: &ClusterMap, now_ms: u64) -> Vec<MapCommand> {
        let Some(since) = self.leader_since_ms else {
            return Vec::new();
        };
        let mut cmds = Vec::new();
        if !map.has_flag(Flag::NoDown) {
            let down: Vec<OsdId> = map
                .osds
                .values()
                .filter(|o| o.up)
                .filter(|o| {
                    let seen = self
                        .last_seen_ms
                        .get(&o.id)
                        .copied()
                        .unwrap_or(0)
                        .max(since);
                    now_ms.saturating_sub(seen) > self.policy.grace_ms
                })
                .map(|o| o.id)
                .collect();
            if !down.is_empty() {
                cmds.push(MapCommand::OsdMarkDown { ids: down, now_ms });
            }
        }
        if !map.has_flag(Flag::NoOut) {
            let out: Vec<OsdId> = map
                .osds
                .values()
                .filter(|o| !o.up && o.is_in)
                .filter(|o| {
                    let since_down = o.down_stamp_ms.unwrap_or(now_ms).max(since);
                    now_ms.saturating_sub(since_down) > self.policy.down_out_ms
                })
                .map(|o| o.id)
                .collect();
            if !out.is_empty() {
                cmds.push(MapCommand::OsdOut { ids: out });
            }
        }
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_rate_is_measured_over_the_window_and_survives_restarts() {
        let mut d = FailureDetector::new(FailurePolicy::default());
        let stat = |n| OsdStat {
            recovered_objects: n,
            ..Default::default()
        };
        assert_eq!(d.recovery_rate(0).0, None);
        d.heartbeat(0, stat(0), (0, vec![]), 0);
        d.heartbeat(0, stat(100), (0, vec![]), 2000);
        assert_eq!(d.recovery_rate(2000).0, Some(50));
        // Restarted: its counter starts over; the rate does not go negative.
        d.heartbeat(0, stat(40), (0, vec![]), 4000);
        assert_eq!(d.recovery_rate(4000).0, Some(35));
        // Long quiet: the old samples leave the window.
        d.heartbeat(0, stat(40), (0, vec![]), 30_000);
        d.heartbeat(0, stat(40), (0, vec![]), 32_000);
        assert_eq!(d.recovery_rate(32_000).0, Some(0));
    }
    use crate::apply::apply_command;
    use store_types::map::WEIGHT_ONE;

    fn map_with(n: u32) -> ClusterMap {
        let mut m = ClusterMap::new("f");
        for i in 0..n {
            apply_command(
                &mut m,
                &MapCommand::OsdBoot {
                    uuid: format!("u{i}"),
                    addr: format!("127.0.0.1:{}", 7000 + i),
                    host: format!("h{i}"),
                    weight: WEIGHT_ONE,
                },
            )
            .unwrap();
        }
        m
    }

    const POLICY: FailurePolicy = FailurePolicy {
        grace_ms: 1000,
        down_out_ms: 5000,
    };

    #[test]
    fn followers_never_act() {
        let m = map_with(2);
        let d = FailureDetector::new(POLICY);
        assert!(d.tick(&m, 1_000_000).is_empty());
    }

    #[test]
    fn silent_osd_goes_down_then_out() {
        let mut m = map_with(2);
        let mut d = FailureDetector::new(POLICY);
        d.set_leader(true, 0);
        d.heartbeat(0, OsdStat::default(), (0, vec![]), 500);
        d.heartbeat(1, OsdStat::default(), (0, vec![]), 500);
        assert!(d.tick(&m, 1400).is_empty(), "within grace");
        d.heartbeat(0, OsdStat::default(), (0, vec![]), 1400);
        let cmds = d.tick(&m, 1600);
        assert_eq!(
            cmds,
            vec![MapCommand::OsdMarkDown {
                ids: vec![1],
                now_ms: 1600
            }]
        );
        apply_command(&mut m, &cmds[0]).unwrap();
        d.heartbeat(0, OsdStat::default(), (0, vec![]), 6700);
        assert!(d.tick(&m, 6500).is_empty(), "not yet out");
        assert_eq!(d.tick(&m, 6700), vec![MapCommand::OsdOut { ids: vec![1] }]);
        // noout holds it in.
        apply_command(&mut m, &MapCommand::SetFlag(Flag::NoOut)).unwrap();
        assert!(d.tick(&m, 6700).is_empty());
    }

    #[test]
    fn new_leader_grants_full_grace() {
        let m = map_with(1);
        let mut d = FailureDetector::new(POLICY);
        d.set_leader(true, 10_000);
        assert!(d.tick(&m, 10_900).is_empty());
        assert_eq!(d.tick(&m, 11_100).len(), 1);
        d.set_leader(false, 11_200);
        assert!(d.tick(&m, 99_999).is_empty());
    }
}
