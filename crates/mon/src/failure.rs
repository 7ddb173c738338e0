//! OSD failure detection, sans-IO: heartbeats and clock ticks in, map commands out.
//!
//! OSDs heartbeat every monitor, so whichever monitor leads has fresh data. Only the leader
//! acts. A new leader gives every OSD a full grace period from the moment it took over, so a
//! leader change never marks healthy OSDs down.
//!
//! Every interval here (heartbeat grace, down→out, recovery rates) is measured on the
//! monotonic clock ([`Now::mono_ms`]), so a step of the leader's wall clock marks nothing
//! down or out. Wall time only stamps a mark-down in the map, for operators to read.

use std::collections::HashMap;

use store_types::map::{ClusterMap, Flag, OsdId};
use store_types::msg::{MapCommand, OsdStat};
use store_types::osdmsg::PgReport;

use crate::clock::Now;

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
    /// (monotonic time, total) samples, oldest first, within twice the window.
    samples: std::collections::VecDeque<(u64, u64)>,
}

impl RecoveryMeter {
    pub fn add(&mut self, delta: u64, now_mono_ms: u64) {
        self.total += delta;
        self.samples.push_back((now_mono_ms, self.total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now_mono_ms.saturating_sub(*t) > 2 * RATE_WINDOW_MS)
            || self.samples.len() > 4096
        {
            self.samples.pop_front();
        }
    }

    pub fn rate_per_sec(&self, now_mono_ms: u64) -> Option<u64> {
        let (t1, n1) = *self.samples.back()?;
        let (t0, n0) = *self
            .samples
            .iter()
            .find(|(t, _)| now_mono_ms.saturating_sub(*t) <= RATE_WINDOW_MS)?;
        (t1 > t0 + 1000).then(|| (n1 - n0) * 1000 / (t1 - t0))
    }
}

#[derive(Debug, Default)]
pub struct FailureDetector {
    policy: FailurePolicy,
    /// When each OSD was last heard from, on the monotonic clock.
    last_seen_mono_ms: HashMap<OsdId, u64>,
    stats: HashMap<OsdId, OsdStat>,
    /// Each OSD's last report of the PGs it is primary of that are not active, with the
    /// map epoch the report is true of.
    pg_reports: HashMap<OsdId, (u64, Vec<PgReport>)>,
    recovery: RecoveryMeter,
    recovery_bytes: RecoveryMeter,
    /// Since when this monitor leads, on the monotonic clock; None when it does not.
    leader_since_mono_ms: Option<u64>,
    /// Down OSDs: the map's (wall) down stamp, and when this leader first saw the OSD down
    /// with that stamp, on the monotonic clock. The down→out interval counts from the
    /// latter; a new stamp (down again) restarts it.
    down_seen: HashMap<OsdId, (Option<u64>, u64)>,
}

impl FailureDetector {
    pub fn new(policy: FailurePolicy) -> Self {
        FailureDetector {
            policy,
            ..Default::default()
        }
    }

    pub fn heartbeat(&mut self, id: OsdId, stat: OsdStat, pgs: (u64, Vec<PgReport>), now: Now) {
        let seen = self.last_seen_mono_ms.entry(id).or_insert(now.mono_ms);
        *seen = (*seen).max(now.mono_ms);
        let before = self.stats.get(&id).copied().unwrap_or_default();
        // A restarted OSD counts from zero again.
        let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
        self.recovery.add(
            delta(stat.recovered_objects, before.recovered_objects),
            now.mono_ms,
        );
        self.recovery_bytes.add(
            delta(stat.recovered_bytes, before.recovered_bytes),
            now.mono_ms,
        );
        self.stats.insert(id, stat);
        self.pg_reports.insert(id, pgs);
    }

    /// Objects and bytes recovered per second over the last [`RATE_WINDOW_MS`], when
    /// known.
    pub fn recovery_rate(&self, now: Now) -> (Option<u64>, Option<u64>) {
        (
            self.recovery.rate_per_sec(now.mono_ms),
            self.recovery_bytes.rate_per_sec(now.mono_ms),
        )
    }

    pub fn pg_reports(&self) -> &HashMap<OsdId, (u64, Vec<PgReport>)> {
        &self.pg_reports
    }

    pub fn stats(&self) -> &HashMap<OsdId, OsdStat> {
        &self.stats
    }

    /// Tells the detector whether this monitor leads now.
    pub fn set_leader(&mut self, leader: bool, now: Now) {
        match (leader, self.leader_since_mono_ms) {
            (true, None) => self.leader_since_mono_ms = Some(now.mono_ms),
            (false, Some(_)) => {
                self.leader_since_mono_ms = None;
                self.down_seen.clear();
            }
            _ => {}
        }
    }

    /// The commands the leader should propose now (none when not leading). Intervals are
    /// measured on `now.mono_ms`; a mark-down is stamped with `now.wall_ms`, for operators.
    pub fn tick(&mut self, map: &ClusterMap, now: Now) -> Vec<MapCommand> {
        let Some(since_mono_ms) = self.leader_since_mono_ms else {
            return Vec::new();
        };
        self.note_down_osds(map, now.mono_ms);
        let mut cmds = Vec::new();
        if !map.has_flag(Flag::NoDown) {
            let down = self.silent_osds(map, since_mono_ms, now.mono_ms);
            if !down.is_empty() {
                cmds.push(MapCommand::OsdMarkDown {
                    ids: down,
                    now_ms: now.wall_ms,
                });
            }
        }
        if !map.has_flag(Flag::NoOut) {
            let out = self.down_long_enough(map, since_mono_ms, now.mono_ms);
            if !out.is_empty() {
                cmds.push(MapCommand::OsdOut { ids: out });
            }
        }
        cmds
    }

    /// Remembers when this monitor first saw each down OSD down (per down stamp), and
    /// forgets OSDs that are up or gone.
    fn note_down_osds(&mut self, map: &ClusterMap, now_mono_ms: u64) {
        self.down_seen
            .retain(|id, _| map.osds.get(id).is_some_and(|o| !o.up));
        for o in map.osds.values().filter(|o| !o.up) {
            let seen = self
                .down_seen
                .entry(o.id)
                .or_insert((o.down_stamp_ms, now_mono_ms));
            if seen.0 != o.down_stamp_ms {
                *seen = (o.down_stamp_ms, now_mono_ms);
            }
        }
    }

    /// Up OSDs not heard from for the grace, counted from max(last heartbeat, leadership
    /// start): a new leader gives every OSD a full grace.
    fn silent_osds(&self, map: &ClusterMap, since_mono_ms: u64, now_mono_ms: u64) -> Vec<OsdId> {
        map.osds
            .values()
            .filter(|o| o.up)
            .filter(|o| {
                let seen_mono_ms = self.last_seen_mono_ms.get(&o.id).copied().unwrap_or(0);
                let from_mono_ms = seen_mono_ms.max(since_mono_ms);
                now_mono_ms.saturating_sub(from_mono_ms) > self.policy.grace_ms
            })
            .map(|o| o.id)
            .collect()
    }

    /// Down, in OSDs this monitor has seen down for the down→out interval, counted from
    /// max(first seen down, leadership start) on the monotonic clock. The map's down
    /// stamp is wall time, from whichever leader proposed it, and is not compared with it.
    fn down_long_enough(
        &self,
        map: &ClusterMap,
        since_mono_ms: u64,
        now_mono_ms: u64,
    ) -> Vec<OsdId> {
        map.osds
            .values()
            .filter(|o| !o.up && o.is_in)
            .filter(|o| {
                let seen_mono_ms = self.down_seen.get(&o.id).map_or(now_mono_ms, |s| s.1);
                let from_mono_ms = seen_mono_ms.max(since_mono_ms);
                now_mono_ms.saturating_sub(from_mono_ms) > self.policy.down_out_ms
            })
            .map(|o| o.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both clocks at `ms`.
    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: ms,
        }
    }

    #[test]
    fn recovery_rate_is_measured_over_the_window_and_survives_restarts() {
        let mut d = FailureDetector::new(FailurePolicy::default());
        let stat = |n| OsdStat {
            recovered_objects: n,
            ..Default::default()
        };
        assert_eq!(d.recovery_rate(at(0)).0, None);
        d.heartbeat(0, stat(0), (0, vec![]), at(0));
        d.heartbeat(0, stat(100), (0, vec![]), at(2000));
        assert_eq!(d.recovery_rate(at(2000)).0, Some(50));
        // Restarted: its counter starts over; the rate does not go negative.
        d.heartbeat(0, stat(40), (0, vec![]), at(4000));
        assert_eq!(d.recovery_rate(at(4000)).0, Some(35));
        // Long quiet: the old samples leave the window.
        d.heartbeat(0, stat(40), (0, vec![]), at(30_000));
        d.heartbeat(0, stat(40), (0, vec![]), at(32_000));
        assert_eq!(d.recovery_rate(at(32_000)).0, Some(0));
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
        let mut d = FailureDetector::new(POLICY);
        assert!(d.tick(&m, at(1_000_000)).is_empty());
    }

    #[test]
    fn silent_osd_goes_down_then_out() {
        let mut m = map_with(2);
        let mut d = FailureDetector::new(POLICY);
        d.set_leader(true, at(0));
        d.heartbeat(0, OsdStat::default(), (0, vec![]), at(500));
        d.heartbeat(1, OsdStat::default(), (0, vec![]), at(500));
        assert!(d.tick(&m, at(1400)).is_empty(), "within grace");
        d.heartbeat(0, OsdStat::default(), (0, vec![]), at(1400));
        let cmds = d.tick(&m, at(1600));
        assert_eq!(
            cmds,
            vec![MapCommand::OsdMarkDown {
                ids: vec![1],
                now_ms: 1600
            }]
        );
        apply_command(&mut m, &cmds[0]).unwrap();
        // The down→out interval counts from the tick that first sees it down.
        assert!(d.tick(&m, at(1600)).is_empty());
        d.heartbeat(0, OsdStat::default(), (0, vec![]), at(6700));
        assert!(d.tick(&m, at(6500)).is_empty(), "not yet out");
        assert_eq!(
            d.tick(&m, at(6700)),
            vec![MapCommand::OsdOut { ids: vec![1] }]
        );
        // noout holds it in.
        apply_command(&mut m, &MapCommand::SetFlag(Flag::NoOut)).unwrap();
        assert!(d.tick(&m, at(6700)).is_empty());
    }

    #[test]
    fn new_leader_grants_full_grace() {
        let m = map_with(1);
        let mut d = FailureDetector::new(POLICY);
        d.set_leader(true, at(10_000));
        assert!(d.tick(&m, at(10_900)).is_empty());
        assert_eq!(d.tick(&m, at(11_100)).len(), 1);
        d.set_leader(false, at(11_200));
        assert!(d.tick(&m, at(99_999)).is_empty());
    }

    /// A wall-clock reading in 2023, so steps back stay above zero.
    const WALL_MS: u64 = 1_700_000_000_000;
    const HOUR_MS: u64 = 3_600_000;

    fn heard(d: &mut FailureDetector, ids: &[OsdId], now: Now) {
        for id in ids {
            d.heartbeat(*id, OsdStat::default(), (0, vec![]), now);
        }
    }

    #[test]
    fn a_wall_clock_step_marks_no_osd_down_or_out() {
        let mut m = map_with(3);
        let mut d = FailureDetector::new(POLICY);
        let t0 = Now {
            mono_ms: 0,
            wall_ms: WALL_MS,
        };
        d.set_leader(true, t0);
        heard(&mut d, &[0, 1, 2], t0.plus_ms(500));
        heard(&mut d, &[0, 1], t0.plus_ms(1400));
        // osd.2 fell silent: down, stamped with the wall clock.
        let cmds = d.tick(&m, t0.plus_ms(1600));
        let down = MapCommand::OsdMarkDown {
            ids: vec![2],
            now_ms: WALL_MS + 1600,
        };
        assert_eq!(cmds, vec![down]);
        apply_command(&mut m, &cmds[0]).unwrap();
        assert!(d.tick(&m, t0.plus_ms(1700)).is_empty());
        // The wall clock steps an hour ahead while 100 ms pass.
        let stepped = Now {
            mono_ms: 1800,
            wall_ms: WALL_MS + 1800 + HOUR_MS,
        };
        assert!(d.tick(&m, stepped).is_empty(), "nothing down, nothing out");
        // Back an hour: still nothing, and the silent osd.2 goes out on time.
        let back = Now {
            mono_ms: 1900,
            wall_ms: WALL_MS + 1900 - HOUR_MS,
        };
        heard(&mut d, &[0, 1], back);
        assert!(d.tick(&m, back).is_empty());
        heard(&mut d, &[0, 1], back.plus_ms(4900));
        let out = d.tick(&m, back.plus_ms(4900));
        assert_eq!(out, vec![MapCommand::OsdOut { ids: vec![2] }]);
    }

    #[test]
    fn down_out_counts_from_when_this_monitor_saw_the_osd_down() {
        let mut m = map_with(1);
        let mut d = FailureDetector::new(POLICY);
        let t0 = Now {
            mono_ms: 0,
            wall_ms: WALL_MS,
        };
        d.set_leader(true, t0);
        // Marked down with a wall stamp an hour old: the proposing leader's wall clock was
        // an hour behind (and has been stepped since).
        let stale = MapCommand::OsdMarkDown {
            ids: vec![0],
            now_ms: WALL_MS - HOUR_MS,
        };
        apply_command(&mut m, &stale).unwrap();
        let seen_down = t0.plus_ms(10_000);
        assert!(d.tick(&m, seen_down).is_empty(), "just seen down");
        let not_yet = seen_down.plus_ms(POLICY.down_out_ms);
        assert!(d.tick(&m, not_yet).is_empty());
        let out = d.tick(&m, not_yet.plus_ms(1));
        assert_eq!(out, vec![MapCommand::OsdOut { ids: vec![0] }]);
    }

    #[test]
    fn an_osd_down_again_is_timed_anew() {
        let mut m = map_with(1);
        let mut d = FailureDetector::new(POLICY);
        d.set_leader(true, at(0));
        let down = |ms| MapCommand::OsdMarkDown {
            ids: vec![0],
            now_ms: ms,
        };
        apply_command(&mut m, &down(1000)).unwrap();
        assert!(d.tick(&m, at(1000)).is_empty());
        // Up and down again between two ticks: the new down stamp restarts the interval.
        let mut again = m.clone();
        again.osds.get_mut(&0).unwrap().down_stamp_ms = Some(5000);
        assert!(d.tick(&again, at(5000)).is_empty());
        assert!(d.tick(&again, at(10_000)).is_empty());
        assert_eq!(d.tick(&again, at(10_001)).len(), 1);
    }

    #[test]
    fn a_wall_clock_step_does_not_disturb_the_recovery_rate() {
        let mut d = FailureDetector::new(POLICY);
        let stat = |n| OsdStat {
            recovered_objects: n,
            ..Default::default()
        };
        let t0 = Now {
            mono_ms: 0,
            wall_ms: WALL_MS,
        };
        d.heartbeat(0, stat(0), (0, vec![]), t0);
        d.heartbeat(0, stat(100), (0, vec![]), t0.plus_ms(2000));
        let stepped = Now {
            mono_ms: 4000,
            wall_ms: WALL_MS + 4000 + HOUR_MS,
        };
        d.heartbeat(0, stat(200), (0, vec![]), stepped);
        assert_eq!(d.recovery_rate(stepped).0, Some(50));
    }
}
