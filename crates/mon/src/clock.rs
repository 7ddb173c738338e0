//! The monitor's two clocks, read together.
//!
//! Intervals (how long since an OSD or a client session was heard from, how long an OSD
//! has been down, recovery rates, blocklist expiry) are measured on the monotonic clock: a
//! step of the wall clock (NTP, an operator's `date -s`) must not mark every OSD down or
//! break a live writer's lock. Wall time is kept only for what an operator reads, such as
//! the `down_stamp_ms` the leader writes into the map.
//!
//! The sans-IO parts take a [`Now`] and pick the clock they need, so tests can step one
//! clock without the other.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Both clocks, read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds since this process first read the clock; never goes backwards or jumps.
    pub mono_ms: u64,
    /// Milliseconds since the Unix epoch; may step either way.
    pub wall_ms: u64,
}

impl Now {
    /// Both clocks `ms` later (tests step them apart with struct update syntax).
    pub fn plus_ms(self, ms: u64) -> Now {
        Now {
            mono_ms: self.mono_ms + ms,
            wall_ms: self.wall_ms + ms,
        }
    }
}

/// The process-wide anchor of the monotonic clock.
fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(Instant::now)
}

/// Milliseconds on the monotonic clock since the process-wide anchor.
pub fn mono_ms() -> u64 {
    anchor().elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch on the wall clock (0 if it reads before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Both clocks, now.
pub fn now() -> Now {
    Now {
        mono_ms: mono_ms(),
        wall_ms: wall_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_does_not_go_backwards() {
        let a = mono_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = mono_ms();
        assert!(b >= a + 5, "{a} then {b}");
        assert!(
            wall_ms() > 1_600_000_000_000,
            "the wall clock reads Unix time"
        );
    }
}
