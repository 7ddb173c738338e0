//! Rendering for people (tables, Ceph-like layouts) and for programs (JSON shaped like
//! `ceph ... -f json` where there is an equivalent).

use comfy_table::{presets::NOTHING, Cell, CellAlignment, Table};
use serde_json::{json, Value};
use store_types::map::{weight_to_f64, ClusterMap, Pool, CRUSH_ROOT_ID, CRUSH_ROOT_NAME};
use store_types::msg::{Severity, StatusReport};

use crate::Format;

pub fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn checks_json(s: &StatusReport, detail: bool) -> Value {
    let mut checks = serde_json::Map::new();
    for (code, c) in &s.checks {
        let mut v = json!({
            "severity": c.severity.as_str(),
            "summary": { "message": c.summary },
        });
        if detail {
            v["detail"] = c.detail.iter().map(|d| json!({ "message": d })).collect();
        }
        checks.insert(code.clone(), v);
    }
    Value::Object(checks)
}

pub fn status_json(s: &StatusReport) -> Value {
    json!({
        "fsid": s.fsid,
        "health": { "status": s.health.as_str(), "checks": checks_json(s, false) },
        "quorum_names": s.quorum_names,
        "quorum_leader_name": s.leader_name,
        "answered_by": s.answered_by,
        "monmap": {
            "num_mons": s.mons.len(),
            "mons": s.mons.iter().map(|m| json!({
                "name": m.name, "addr": m.addr, "rank": m.id, "reachable": m.reachable, "error": m.error,
            })).collect::<Vec<_>>(),
        },
        "osdmap": {
            "epoch": s.epoch,
            "num_osds": s.num_osds,
            "num_up_osds": s.num_up_osds,
            "num_in_osds": s.num_in_osds,
            "flags": s.flags,
        },
        "clients": {
            "num_sessions": s.num_sessions,
            "num_image_locks": s.num_image_locks,
            "num_blocklisted": s.num_blocklisted,
        },
        "pgmap": {
            "pgs_by_state": s.pgs_by_state.iter().map(|(k, v)| json!({"state_name": k, "count": v})).collect::<Vec<_>>(),
            "num_pgs": s.num_pgs,
            "num_pools": s.num_pools,
            "degraded_objects": s.degraded_objects,
            "degraded_total": s.object_copies,
            "degraded_ratio": s.degraded_objects as f64 / s.object_copies.max(1) as f64,
            "recovering_objects": s.recovery_objects_left,
            "recovering_objects_per_sec": s.recovery_objects_per_sec,
            "recovering_bytes_per_sec": s.recovery_bytes_per_sec,
            "misplaced_objects": s.misplaced_objects,
            "misplaced_total": s.object_copies,
            "misplaced_ratio": s.misplaced_objects as f64 / s.object_copies.max(1) as f64,
            "pgs_remapped": s.pgs_remapped,
            "bytes_used": s.used_bytes,
            "bytes_total": s.total_bytes,
            "bytes_avail": s.total_bytes.saturating_sub(s.used_bytes),
        },
    })
}

pub fn status(format: Format, s: &StatusReport) {
    if format == Format::Json {
        return print_json(&status_json(s));
    }
    let pad = "            ";
    println!("  cluster:");
    println!("    id:     {}", s.fsid);
    println!("    health: {}", s.health.as_str());
    for c in s.checks.values() {
        println!("{pad}{}", c.summary);
    }
    println!();
    println!("  services:");
    let quorum = if s.quorum_names.is_empty() {
        "NO QUORUM".to_string()
    } else {
        format!(
            "quorum {} (leader {})",
            s.quorum_names.join(","),
            s.leader_name.as_deref().unwrap_or("unknown")
        )
    };
    println!("    mon: {} daemons, {quorum}", s.mons.len());
    println!(
        "    osd: {} osds: {} up, {} in",
        s.num_osds, s.num_up_osds, s.num_in_osds
    );
    if !s.flags.is_empty() {
        println!("         flags {}", s.flags.join(","));
    }
    println!(
        "    client: {} open image sessions, {} image locks held, {} blocklisted",
        s.num_sessions, s.num_image_locks, s.num_blocklisted
    );
    println!();
    println!("  data:");
    println!("    pools:   {} pools, {} pgs", s.num_pools, s.num_pgs);
    println!(
        "    usage:   {} used, {} / {} avail",
        human_bytes(s.used_bytes),
        human_bytes(s.total_bytes.saturating_sub(s.used_bytes)),
        human_bytes(s.total_bytes)
    );
    let mut first = true;
    for (state, n) in &s.pgs_by_state {
        let label = if first {
            "    pgs:     "
        } else {
            "             "
        };
        println!("{label}{n} {state}");
        first = false;
    }
    let pct = |n: u64| 100.0 * n as f64 / s.object_copies.max(1) as f64;
    if s.degraded_objects > 0 {
        println!(
            "             {}/{} object copies degraded ({:.2}%)",
            s.degraded_objects,
            s.object_copies,
            pct(s.degraded_objects)
        );
    }
    if s.misplaced_objects > 0 {
        println!(
            "             {}/{} object copies misplaced ({:.2}%)",
            s.misplaced_objects,
            s.object_copies,
            pct(s.misplaced_objects)
        );
    }
    let rate = s.recovery_objects_per_sec.filter(|r| *r > 0);
    if s.recovery_objects_left > 0 || rate.is_some() {
        println!();
        println!("  io:");
        let speed = match (rate, s.recovery_bytes_per_sec) {
            (Some(r), Some(b)) => format!("{}/s, {r} objects/s, ", human_bytes(b)),
            (Some(r), None) => format!("{r} objects/s, "),
            _ => String::new(),
        };
        let eta = match rate {
            Some(r) => format!(", about {} s left", s.recovery_objects_left.div_ceil(r)),
            None => String::new(),
        };
        println!(
            "    recovery: {speed}{} object copies to recover ({:.1}% of {}){eta}",
            s.recovery_objects_left,
            pct(s.recovery_objects_left),
            s.object_copies
        );
    }
    println!(
        "    map epoch {} (answered by mon.{})",
        s.epoch, s.answered_by
    );
}

pub fn health(format: Format, s: &StatusReport, detail: bool) {
    if format == Format::Json {
        return print_json(
            &json!({ "status": s.health.as_str(), "checks": checks_json(s, detail) }),
        );
    }
    if s.health == Severity::Ok {
        println!("HEALTH_OK");
        return;
    }
    let codes: Vec<&str> = s.checks.keys().map(String::as_str).collect();
    if !detail {
        let summaries: Vec<&str> = s.checks.values().map(|c| c.summary.as_str()).collect();
        println!("{} {}", s.health.as_str(), summaries.join("; "));
        return;
    }
    println!("{}: {}", s.health.as_str(), codes.join(", "));
    for (code, c) in &s.checks {
        println!("[{}] {code}: {}", short(c.severity), c.summary);
        for d in &c.detail {
            println!("    {d}");
        }
        // What to do, from the code (a newer monitor's unknown code has none here).
        if let Ok(known) = code.parse::<store_types::HealthCode>() {
            println!("    hint: {}", known.hint());
        }
    }
}

fn short(s: Severity) -> &'static str {
    match s {
        Severity::Ok => "OK",
        Severity::Warn => "WRN",
        Severity::Err => "ERR",
    }
}

pub fn mons(format: Format, s: &StatusReport) {
    if format == Format::Json {
        return print_json(&json!({
            "quorum_names": s.quorum_names,
            "quorum_leader_name": s.leader_name,
            "mons": s.mons.iter().map(|m| json!({
                "name": m.name, "rank": m.id, "addr": m.addr,
                "in_quorum": s.quorum_names.contains(&m.name), "error": m.error,
            })).collect::<Vec<_>>(),
        }));
    }
    let mut t = table(&["RANK", "NAME", "ADDR", "STATE"]);
    for m in &s.mons {
        let state = if s.leader_name.as_deref() == Some(&m.name) && m.reachable {
            "leader".to_string()
        } else if s.quorum_names.contains(&m.name) {
            "in quorum".to_string()
        } else {
            format!("down ({})", m.error.as_deref().unwrap_or("unreachable"))
        };
        t.add_row(vec![
            m.id.to_string(),
            m.name.clone(),
            m.addr.clone(),
            state,
        ]);
    }
    println!("{t}");
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(Cell::new));
    t
}

pub fn pools(format: Format, map: &ClusterMap) {
    if format == Format::Json {
        return print_json(&map.pools.values().map(pool_json).collect::<Vec<_>>().into());
    }
    let mut t = table(&["ID", "NAME", "SIZE", "MIN_SIZE", "PG_NUM", "FAILURE_DOMAIN"]);
    for p in map.pools.values() {
        t.add_row(vec![
            p.id.to_string(),
            p.name.clone(),
            p.size.to_string(),
            p.min_size.to_string(),
            p.pg_num.to_string(),
            p.failure_domain.to_string(),
        ]);
    }
    println!("{t}");
}

fn pool_json(p: &Pool) -> Value {
    json!({
        "pool_id": p.id, "pool_name": p.name, "size": p.size, "min_size": p.min_size,
        "pg_num": p.pg_num, "failure_domain": p.failure_domain.to_string(),
        "created_epoch": p.created_epoch,
    })
}

pub fn pool_get(format: Format, p: &Pool, key: Option<&str>) -> anyhow::Result<()> {
    let all = pool_json(p);
    let Some(key) = key else {
        match format {
            Format::Json => print_json(&all),
            Format::Plain => {
                for k in [
                    "pool_id",
                    "pool_name",
                    "size",
                    "min_size",
                    "pg_num",
                    "failure_domain",
                ] {
                    println!("{k}: {}", plain(&all[k]));
                }
            }
        }
        return Ok(());
    };
    let v = all.get(key).ok_or_else(|| {
        anyhow::anyhow!(
            "INVALID_ARGUMENT: unknown pool setting '{key}': expected size, min_size, pg_num or failure_domain"
        )
    })?;
    match format {
        Format::Json => print_json(&json!({ key: v })),
        Format::Plain => println!("{key}: {}", plain(v)),
    }
    Ok(())
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `ceph osd tree`: root, hosts, OSDs.
/// `osd df`: each OSD's weight, usage, objects, PGs it serves and recovery counters.
pub fn osd_df(format: Format, map: &ClusterMap, status: &StatusReport) {
    let mut pgs: std::collections::BTreeMap<store_types::map::OsdId, u64> = Default::default();
    for pool in map.pools.values() {
        for m in store_placement::pool_mappings(map, pool) {
            for o in m
                .acting
                .iter()
                .chain(m.up.iter().filter(|o| !m.acting.contains(o)))
            {
                *pgs.entry(*o).or_default() += 1;
            }
        }
    }
    let rows: Vec<Value> = map
        .osds
        .values()
        .map(|o| {
            let st = status.osd_stats.get(&o.id).copied().unwrap_or_default();
            json!({
                "id": o.id, "host": o.host, "crush_weight": weight_to_f64(o.weight),
                "status": if o.up { "up" } else { "down" }, "in": o.is_in,
                "kb": st.total_bytes / 1024, "kb_used": st.used_bytes / 1024,
                "utilization": 100.0 * st.used_bytes as f64 / st.total_bytes.max(1) as f64,
                "objects": st.objects, "pgs": pgs.get(&o.id).copied().unwrap_or(0),
                "recovered_objects": st.recovered_objects, "recovered_bytes": st.recovered_bytes,
            })
        })
        .collect();
    if format == Format::Json {
        return print_json(&json!({ "nodes": rows }));
    }
    let mut t = table(&[
        "ID",
        "HOST",
        "WEIGHT",
        "STATUS",
        "SIZE",
        "USE",
        "%USE",
        "OBJECTS",
        "PGS",
        "RECOVERED",
    ]);
    for (o, r) in map.osds.values().zip(&rows) {
        let st = status.osd_stats.get(&o.id).copied().unwrap_or_default();
        t.add_row(vec![
            o.id.to_string(),
            o.host.clone(),
            format!("{:.5}", weight_to_f64(o.weight)),
            format!(
                "{}{}",
                r["status"].as_str().unwrap_or(""),
                if o.is_in { "" } else { ",out" }
            ),
            human_bytes(st.total_bytes),
            human_bytes(st.used_bytes),
            format!("{:.2}", r["utilization"].as_f64().unwrap_or(0.0)),
            st.objects.to_string(),
            r["pgs"].to_string(),
            format!(
                "{} ({} objects)",
                human_bytes(st.recovered_bytes),
                st.recovered_objects
            ),
        ]);
    }
    println!("{t}");
}

pub fn osd_tree(format: Format, map: &ClusterMap) {
    let root_weight: u64 = map.crush.hosts.values().map(|h| map.host_weight(h)).sum();
    let mut nodes = vec![json!({
        "id": CRUSH_ROOT_ID, "name": CRUSH_ROOT_NAME, "type": "root", "type_id": 11,
        "weight": root_weight as f64 / 65536.0,
        "children": map.crush.hosts.values().map(|h| h.id).collect::<Vec<_>>(),
    })];
    let mut t = table(&["ID", "WEIGHT", "TYPE NAME", "STATUS", "REWEIGHT", "ADDR"]);
    t.add_row(vec![
        CRUSH_ROOT_ID.to_string(),
        format!("{:.5}", root_weight as f64 / 65536.0),
        format!("root {CRUSH_ROOT_NAME}"),
        String::new(),
        String::new(),
        String::new(),
    ]);
    for h in map.crush.hosts.values() {
        let hw = map.host_weight(h) as f64 / 65536.0;
        nodes.push(json!({
            "id": h.id, "name": h.name, "type": "host", "type_id": 1, "weight": hw,
            "children": h.osds,
        }));
        t.add_row(vec![
            h.id.to_string(),
            format!("{hw:.5}"),
            format!("    host {}", h.name),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for id in &h.osds {
            let Some(o) = map.osds.get(id) else { continue };
            let status = if o.up { "up" } else { "down" };
            let reweight = if o.is_in { 1.0 } else { 0.0 };
            nodes.push(json!({
                "id": o.id, "name": format!("osd.{}", o.id), "type": "osd", "type_id": 0,
                "status": status, "weight": weight_to_f64(o.weight), "crush_weight": weight_to_f64(o.weight),
                "reweight": reweight, "exists": 1, "addr": o.addr, "host": o.host, "in": o.is_in,
            }));
            t.add_row(vec![
                o.id.to_string(),
                format!("{:.5}", weight_to_f64(o.weight)),
                format!("        osd.{}", o.id),
                status.to_string(),
                format!("{reweight:.5}"),
                o.addr.clone(),
            ]);
        }
    }
    if format == Format::Json {
        return print_json(&json!({ "nodes": nodes, "stray": [] }));
    }
    if let Some(col) = t.column_mut(1) {
        col.set_cell_alignment(CellAlignment::Right);
    }
    println!("{t}");
}

/// A healthy status report of 3 OSDs and one pool, for tests to modify.
#[cfg(test)]
pub fn sample_status(pgs: u64) -> StatusReport {
    StatusReport {
        osd_stats: Default::default(),
        fsid: String::new(),
        epoch: 1,
        health: Severity::Ok,
        checks: Default::default(),
        mons: vec![],
        quorum_names: vec![],
        leader_name: None,
        answered_by: String::new(),
        num_osds: 3,
        num_up_osds: 3,
        num_in_osds: 3,
        num_pools: 1,
        num_pgs: pgs,
        pgs_by_state: [("active+clean".to_string(), pgs)].into(),
        total_bytes: 0,
        used_bytes: 0,
        flags: vec![],
        num_sessions: 0,
        recovery_objects_left: 0,
        object_copies: 0,
        recovery_objects_per_sec: None,
        recovery_bytes_per_sec: None,
        degraded_objects: 0,
        pgs_remapped: 0,
        misplaced_objects: 0,
        num_image_locks: 0,
        num_blocklisted: 0,
    }
}
