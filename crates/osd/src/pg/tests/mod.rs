//! Tests of the PG engine, by topic; the helpers they share (feeding events, picking
//! commands out of the output) are here.

use super::*;
use std::collections::BTreeSet;

mod ops;
mod peering;
mod random;
mod recovery;

type Pg = PgPrimary<u32>;

fn pg() -> Pg {
    PgPrimary::new(
        0,
        0,
        PgLimits {
            op_timeout_ms: 1000,
            max_waiting: 8,
        },
    )
}

/// Feeds a map and answers peering with equal (empty) heads, so a new interval goes
/// active at once; returns every command except the head queries.
fn map(pg: &mut Pg, epoch: u64, acting: &[OsdId], min_size: u32) -> Vec<Command<u32>> {
    let event = Event::Map {
        epoch,
        history: acting.to_vec(),
        size: 3,
        acting: acting.to_vec(),
        min_size,
        incarnation: 0,
        pause: RecoveryPause::default(),
    };
    let c = pg.handle(event);
    settle_heads(pg, c)
}

fn settle_heads(pg: &mut Pg, cmds: Vec<Command<u32>>) -> Vec<Command<u32>> {
    let mut out = Vec::new();
    for c in cmds {
        match c {
            Command::QueryHead { to, interval } => {
                let more = pg.handle(Event::Head {
                    from: to,
                    interval,
                    head: None,
                    complete: true,
                });
                out.extend(settle_heads(pg, more));
            }
            other => out.push(other),
        }
    }
    out
}

fn mutate(pg: &mut Pg, op: OpId, object: &str, now_ms: u64) -> Vec<Command<u32>> {
    pg.handle(Event::Mutate {
        op,
        object: object.into(),
        payload: op as u32,
        now_ms,
    })
}

fn read(pg: &mut Pg, op: OpId, object: &str) -> Vec<Command<u32>> {
    pg.handle(Event::Read {
        op,
        object: object.into(),
        now_ms: 0,
    })
}

fn durable(pg: &mut Pg, version: Version, from: OsdId) -> Vec<Command<u32>> {
    pg.handle(Event::Durable { version, from })
}

fn applies(cmds: &[Command<u32>]) -> Vec<(OsdId, Version)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Apply { to, version, .. } => Some((*to, *version)),
            _ => None,
        })
        .collect()
}

fn v(epoch: u64, seq: u64) -> Version {
    Version { epoch, seq }
}

fn head(p: &mut Pg, from: OsdId, interval: u64, h: Option<Version>) -> Vec<Command<u32>> {
    p.handle(Event::Head {
        from,
        interval,
        head: h,
        complete: true,
    })
}

/// Answers a plan for `to` with fixes (object, have, want).
fn planned(
    p: &mut Pg,
    to: OsdId,
    interval: u64,
    fixes: &[(&str, Option<Version>, Option<Version>)],
) -> Vec<Command<u32>> {
    p.handle(Event::Planned {
        to,
        interval,
        fixes: fixes
            .iter()
            .map(|(o, have, want)| {
                let fix = Fix {
                    have: *have,
                    want: *want,
                };
                (o.to_string(), fix)
            })
            .collect(),
        mode: RecoveryMode::Log,
    })
}

/// The objects of RecoverObject commands, with whether each is background work.
fn recoveries(cmds: &[Command<u32>]) -> Vec<(String, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::RecoverObject {
                object, background, ..
            } => Some((object.clone(), *background)),
            _ => None,
        })
        .collect()
}

fn map_event(epoch: u64, acting: &[OsdId], pause: RecoveryPause) -> Event<u32> {
    Event::Map {
        epoch,
        history: acting.to_vec(),
        size: 3,
        acting: acting.to_vec(),
        min_size: 2,
        incarnation: 0,
        pause,
    }
}

/// Answers the head queries among `cmds` with the given heads (complete copies); returns
/// the other commands.
fn settle_heads_with(
    p: &mut Pg,
    cmds: Vec<Command<u32>>,
    heads: &[(OsdId, Option<Version>)],
) -> Vec<Command<u32>> {
    let mut out = Vec::new();
    for c in cmds {
        match c {
            Command::QueryHead { to, interval } => {
                let h = heads.iter().find(|(o, _)| *o == to).and_then(|(_, h)| *h);
                out.extend(head(p, to, interval, h));
            }
            other => out.push(other),
        }
    }
    out
}

/// Every operation of a schedule was answered, and the engine holds none.
fn assert_all_answered(seed: u64, ops: &HashMap<OpId, (bool, String, bool)>, p: &Pg) {
    let unanswered: Vec<_> = ops
        .iter()
        .filter(|(_, (_, _, done))| !done)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        unanswered.is_empty(),
        "seed {seed}: unanswered ops {unanswered:?}"
    );
    assert_eq!(p.outstanding(), 0, "seed {seed}");
}

fn map_with_history(epoch: u64, acting: &[OsdId], history: &[OsdId]) -> Event<u32> {
    Event::Map {
        epoch,
        history: history.to_vec(),
        size: 3,
        acting: acting.to_vec(),
        min_size: 2,
        incarnation: 0,
        pause: RecoveryPause::default(),
    }
}

/// An active PG with one replica (osd.1) missing "x" at v(2,5); returns the PG.
fn active_with_x_missing_on(missing_on: OsdId) -> Pg {
    let mut p = pg();
    let c = p.handle(map_event(2, &[0, 1], RecoveryPause::default()));
    let heads: &[(OsdId, Option<Version>)] = if missing_on == 0 {
        &[(0, Some(v(1, 1))), (1, Some(v(2, 5)))]
    } else {
        &[(0, Some(v(2, 5))), (1, Some(v(1, 1)))]
    };
    settle_heads_with(&mut p, c, heads);
    planned(
        &mut p,
        missing_on,
        1,
        &[("x", Some(v(1, 1)), Some(v(2, 5)))],
    );
    assert!(p.is_active());
    p
}

fn rejects(cmds: &[Command<u32>]) -> Vec<(OpId, PgError)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Reject { op, error } => Some((*op, error.clone())),
            _ => None,
        })
        .collect()
}
