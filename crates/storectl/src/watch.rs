//! `storectl status --watch`: prints cluster events as they happen (health checks raised
//! and cleared, OSDs up and down, PG state counts), like `ceph -w`, by comparing
//! successive status reports.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use store_client::MonClient;
use store_types::msg::StatusReport;

use crate::output::print_json;
use crate::Format;

/// How often the monitors are asked.
const POLL: Duration = Duration::from_secs(1);

/// The events between two reports, in a stable order.
pub fn events(prev: &StatusReport, cur: &StatusReport) -> Vec<String> {
    let mut out = Vec::new();
    if prev.health != cur.health {
        out.push(format!(
            "health {} -> {}",
            prev.health.as_str(),
            cur.health.as_str()
        ));
    }
    for (code, c) in &cur.checks {
        match prev.checks.get(code) {
            None => out.push(format!("raised {code}: {}", c.summary)),
            Some(p) if p.summary != c.summary => out.push(format!("{code}: {}", c.summary)),
            _ => {}
        }
    }
    for code in prev.checks.keys().filter(|c| !cur.checks.contains_key(*c)) {
        out.push(format!("cleared {code}"));
    }
    if (prev.num_up_osds, prev.num_in_osds, prev.num_osds)
        != (cur.num_up_osds, cur.num_in_osds, cur.num_osds)
    {
        out.push(format!(
            "osd: {} osds: {} up, {} in",
            cur.num_osds, cur.num_up_osds, cur.num_in_osds
        ));
    }
    if prev.pgs_by_state != cur.pgs_by_state {
        let states: Vec<String> = cur
            .pgs_by_state
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        out.push(format!("pgs: {}", states.join(", ")));
    }
    let flags = |s: &StatusReport| s.flags.iter().cloned().collect::<BTreeSet<_>>();
    if flags(prev) != flags(cur) {
        out.push(format!("flags: {}", cur.flags.join(",")));
    }
    out
}

/// Prints the status, then every change, until interrupted.
pub async fn run(format: Format, mons: &MonClient) -> anyhow::Result<()> {
    let mut prev: Option<StatusReport> = None;
    loop {
        match mons.status().await {
            Ok(cur) => {
                let lines = match &prev {
                    None => {
                        crate::output::status(format, &cur);
                        Vec::new()
                    }
                    Some(p) => events(p, &cur),
                };
                let now = utc_time_of_day();
                for l in lines {
                    match format {
                        Format::Json => print_json(&json!({"time": now, "event": l})),
                        Format::Plain => println!("{now} {l}"),
                    }
                }
                prev = Some(cur);
            }
            Err(e) => eprintln!("{} status failed: {}", utc_time_of_day(), e.with_hint()),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// UTC time of day as HH:MM:SS (no date library needed for a watch line).
fn utc_time_of_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use store_types::msg::{HealthCheck, Severity};

    fn report() -> StatusReport {
        crate::output::sample_status(8)
    }

    #[test]
    fn an_osd_going_down_and_coming_back_reads_as_events() {
        let a = report();
        assert!(events(&a, &a).is_empty());
        let mut b = report();
        b.health = Severity::Warn;
        b.num_up_osds = 2;
        b.checks.insert(
            "OSD_DOWN".into(),
            HealthCheck {
                severity: Severity::Warn,
                summary: "1 osds down".into(),
                detail: vec![],
            },
        );
        b.pgs_by_state = [("active+undersized+degraded".to_string(), 8)].into();
        assert_eq!(
            events(&a, &b),
            vec![
                "health HEALTH_OK -> HEALTH_WARN",
                "raised OSD_DOWN: 1 osds down",
                "osd: 3 osds: 2 up, 3 in",
                "pgs: 8 active+undersized+degraded",
            ]
        );
        assert_eq!(events(&b, &a)[1], "cleared OSD_DOWN");
    }
}
