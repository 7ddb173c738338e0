//! `storectl crush test`: simulate a hierarchy with the real placement code and report
//! utilisation and data movement next to the optimum (like `crushtool --test`).

use serde_json::{json, Value};
use store_placement::sim::{self, ChangeOutcome, Distribution, SimChange, SimReport, SimSpec};
use store_types::map::FailureDomain;

use crate::output::print_json;
use crate::Format;

#[derive(clap::Args)]
pub struct CrushTestArgs {
    /// Number of hosts.
    #[arg(long)]
    hosts: u32,
    /// OSDs per host (each weight 1.0).
    #[arg(long = "osds-per-host", alias = "osds_per_host")]
    osds_per_host: u32,
    /// Placement groups in the simulated pool.
    #[arg(long = "pg-num", alias = "pg_num", default_value_t = 4096)]
    pg_num: u32,
    /// Replicas per PG.
    #[arg(long, default_value_t = 3)]
    size: u32,
    /// host or osd.
    #[arg(long = "failure-domain", default_value = "host")]
    failure_domain: FailureDomain,
    /// Remove this OSD from the hierarchy and report what moves (also: if only marked out).
    #[arg(long = "remove-osd", conflicts_with = "add_host")]
    remove_osd: Option<u32>,
    /// Add one host of the same shape and report what moves.
    #[arg(long = "add-host")]
    add_host: bool,
}

pub fn test(format: Format, a: &CrushTestArgs) -> anyhow::Result<()> {
    let spec = SimSpec {
        hosts: a.hosts,
        osds_per_host: a.osds_per_host,
        pg_num: a.pg_num,
        size: a.size,
        failure_domain: a.failure_domain,
    };
    let change = match (a.remove_osd, a.add_host) {
        (Some(id), _) => SimChange::RemoveOsd(id),
        (None, true) => SimChange::AddHost,
        (None, false) => SimChange::None,
    };
    let report =
        sim::simulate(spec, change).map_err(|e| anyhow::anyhow!("INVALID_ARGUMENT: {e}"))?;
    match format {
        Format::Json => print_json(&report_json(&report)),
        Format::Plain => print_report(&report),
    }
    Ok(())
}

fn dist_json(d: &Distribution) -> Value {
    json!({
        "pgs": d.pgs, "placements": d.total_placements, "undersized_pgs": d.undersized_pgs,
        "min": d.min_placements, "max": d.max_placements, "mean": d.mean_placements,
        "stddev": d.stddev_placements, "max_deviation": d.max_deviation,
        "osds": d.osds.iter().map(|o| json!({
            "id": o.id, "host": o.host, "placements": o.placements, "expected": o.expected,
        })).collect::<Vec<_>>(),
    })
}

fn change_json(c: &ChangeOutcome) -> Value {
    let m = &c.movement;
    json!({
        "distribution": dist_json(&c.distribution),
        "moved_placements": m.moved_placements, "pgs_changed": m.pgs_changed,
        "moved_fraction": m.moved_fraction, "optimal_fraction": m.optimal_fraction,
        "ratio_to_optimal": m.ratio_to_optimal,
    })
}

fn report_json(r: &SimReport) -> Value {
    json!({
        "hosts": r.spec.hosts, "osds_per_host": r.spec.osds_per_host, "pg_num": r.spec.pg_num,
        "size": r.spec.size, "failure_domain": r.spec.failure_domain.to_string(),
        "before": dist_json(&r.before),
        "after": r.after.as_ref().map(change_json),
        "if_marked_out": r.if_marked_out.as_ref().map(change_json),
    })
}

fn print_dist(label: &str, d: &Distribution) {
    let expected_mean = d.mean_placements;
    println!(
        "{label}: {} PGs, {} replica placements over {} OSDs",
        d.pgs,
        d.total_placements,
        d.osds.len()
    );
    println!(
        "  per OSD: min {} / max {} / mean {:.1} / stddev {:.1} ({:.1}% of mean); max deviation from expected {:.1}%",
        d.min_placements,
        d.max_placements,
        expected_mean,
        d.stddev_placements,
        if expected_mean > 0.0 { 100.0 * d.stddev_placements / expected_mean } else { 0.0 },
        100.0 * d.max_deviation
    );
    if d.undersized_pgs > 0 {
        println!(
            "  {} PGs could not get all their replicas (too few failure domains)",
            d.undersized_pgs
        );
    }
}

fn print_change(label: &str, c: &ChangeOutcome) {
    let m = &c.movement;
    println!(
        "{label}: {} of {} placements move ({:.2}%), {} PGs change; optimal {:.2}%; ratio {:.3}x",
        m.moved_placements,
        m.total_placements,
        100.0 * m.moved_fraction,
        m.pgs_changed,
        100.0 * m.optimal_fraction,
        m.ratio_to_optimal
    );
    print_dist("  after", &c.distribution);
}

fn print_report(r: &SimReport) {
    println!(
        "crush test: {} hosts x {} OSDs, pg_num {}, size {}, failure domain {}",
        r.spec.hosts, r.spec.osds_per_host, r.spec.pg_num, r.spec.size, r.spec.failure_domain
    );
    print_dist("utilisation", &r.before);
    let what = match r.change {
        SimChange::None => return,
        SimChange::RemoveOsd(id) => format!("remove osd.{id}"),
        SimChange::AddHost => "add a host".to_string(),
    };
    if let Some(c) = &r.after {
        print_change(&what, c);
    }
    if let Some(c) = &r.if_marked_out {
        print_change("if only marked out", c);
    }
}
