//! Operations in hand, for `SLOW_OPS`: a daemon registers each operation it accepts and
//! holds the returned guard until it has answered; its heartbeats report the ones older
//! than the complaint time (Ceph's `osd_op_complaint_time`, default 30 s).
//!
//! Ids grow with start time, so the oldest operation is always the first entry: the
//! report walks only the slow ones. The table holds no more entries than the daemon has
//! operations in hand, which its own concurrency limits bound.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use store_types::msg::SlowOps;

/// The default complaint time, as Ceph's `osd_op_complaint_time`.
pub const DEFAULT_COMPLAINT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct OpTracker {
    complaint: Duration,
    inner: Mutex<Ops>,
}

#[derive(Debug, Default)]
struct Ops {
    next_id: u64,
    in_hand: BTreeMap<u64, (Instant, String)>,
}

/// Tracks one operation until dropped.
#[must_use = "the operation counts as in hand only while its guard lives"]
#[derive(Debug)]
pub struct OpGuard {
    tracker: Arc<OpTracker>,
    id: u64,
}

impl OpTracker {
    pub fn new(complaint: Duration) -> Arc<Self> {
        Arc::new(OpTracker {
            complaint,
            inner: Mutex::default(),
        })
    }

    pub fn complaint(&self) -> Duration {
        self.complaint
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, Ops> {
        // Never held across a panic point that leaves the table inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an operation described by `what` (e.g. `write obj-24 (pg 1.1f)`).
    pub fn start(self: &Arc<Self>, what: String) -> OpGuard {
        let mut ops = self.ops();
        let id = ops.next_id;
        ops.next_id += 1;
        ops.in_hand.insert(id, (Instant::now(), what));
        OpGuard {
            tracker: self.clone(),
            id,
        }
    }

    /// Operations in hand now.
    pub fn in_hand(&self) -> usize {
        self.ops().in_hand.len()
    }

    /// The operations in hand for longer than the complaint time, as of `now`.
    pub fn slow_ops_at(&self, now: Instant) -> SlowOps {
        let ops = self.ops();
        let mut slow = SlowOps::default();
        for (start, what) in ops.in_hand.values() {
            let age = now.saturating_duration_since(*start);
            if age <= self.complaint {
                break;
            }
            if slow.count == 0 {
                slow.oldest_age_ms = age.as_millis() as u64;
                slow.oldest = what.clone();
            }
            slow.count += 1;
        }
        slow
    }

    pub fn slow_ops(&self) -> SlowOps {
        self.slow_ops_at(Instant::now())
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.tracker.ops().in_hand.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ops_past_the_complaint_time_are_slow_and_leave_when_done() {
        let t = OpTracker::new(Duration::from_millis(100));
        let a = t.start("write a".into());
        let b = t.start("read b".into());
        let now = Instant::now();
        assert_eq!(t.slow_ops_at(now).count, 0);
        let later = now + Duration::from_secs(2);
        let s = t.slow_ops_at(later);
        assert_eq!((s.count, s.oldest.as_str()), (2, "write a"));
        assert!(s.oldest_age_ms >= 1900);
        drop(a);
        let s = t.slow_ops_at(later);
        assert_eq!((s.count, s.oldest.as_str()), (1, "read b"));
        drop(b);
        assert_eq!(t.slow_ops_at(later), SlowOps::default());
        assert_eq!(t.in_hand(), 0);
        // A newer op is not slow while an older one is.
        let _c = t.start("old".into());
        std::thread::sleep(Duration::from_millis(150));
        let _d = t.start("new".into());
        assert_eq!(t.slow_ops().count, 1);
    }
}
