use super::*;

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

#[test]
fn acknowledged_only_when_every_acting_osd_is_durable() {
    let mut p = pg();
    assert!(map(&mut p, 1, &[0, 1, 2], 2).is_empty());
    let c = mutate(&mut p, 7, "a", 0);
    assert_eq!(applies(&c), vec![(0, v(1, 1)), (1, v(1, 1)), (2, v(1, 1))]);
    assert!(durable(&mut p, v(1, 1), 0).is_empty());
    assert!(durable(&mut p, v(1, 1), 2).is_empty());
    // A failure report never acknowledges: the PG peers again instead.
    let c = p.handle(Event::Failed {
        version: v(1, 1),
        from: 1,
    });
    assert!(!c.iter().any(|c| matches!(c, Command::Acked { .. })));
    // After peering, the write runs again (new version) and is acknowledged by all three.
    let c = settle_heads(&mut p, c);
    assert_eq!(applies(&c), vec![(0, v(1, 2)), (1, v(1, 2)), (2, v(1, 2))]);
    durable(&mut p, v(1, 2), 0);
    durable(&mut p, v(1, 2), 2);
    assert_eq!(
        durable(&mut p, v(1, 2), 1),
        vec![Command::Acked {
            op: 7,
            version: v(1, 2)
        }]
    );
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn non_primary_refuses() {
    let mut p = pg();
    map(&mut p, 3, &[1, 0, 2], 2);
    let c = mutate(&mut p, 1, "a", 0);
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 1,
            error: PgError::NotPrimary { epoch: 3 }
        }]
    );
    let c = read(&mut p, 2, "a");
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 2,
            error: PgError::NotPrimary { epoch: 3 }
        }]
    );
}

#[test]
fn inactive_pg_queues_then_times_out_or_resumes() {
    let mut p = pg();
    map(&mut p, 1, &[0], 2);
    assert!(mutate(&mut p, 1, "a", 0).is_empty());
    assert!(mutate(&mut p, 2, "b", 500).is_empty());
    assert!(p.handle(Event::Tick { now_ms: 900 }).is_empty());
    let c = p.handle(Event::Tick { now_ms: 1200 });
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 1,
            error: PgError::Inactive {
                up: 1,
                min_size: 2,
                waited_ms: 1200
            }
        }]
    );
    // A second OSD comes up: the waiting op runs, in a new interval.
    let c = map(&mut p, 2, &[0, 1], 2);
    assert_eq!(applies(&c), vec![(0, v(2, 1)), (1, v(2, 1))]);
}

#[test]
fn interval_change_redrives_unacknowledged_mutations() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1, 2], 2);
    mutate(&mut p, 1, "a", 0);
    mutate(&mut p, 2, "a", 0);
    durable(&mut p, v(1, 1), 0);
    durable(&mut p, v(1, 1), 1);
    // osd.2 dies before acknowledging: the next map drops it.
    let c = map(&mut p, 2, &[0, 1], 2);
    assert_eq!(
        applies(&c),
        vec![(0, v(2, 3)), (1, v(2, 3)), (0, v(2, 4)), (1, v(2, 4))]
    );
    // Late acknowledgements of the old versions change nothing.
    assert!(durable(&mut p, v(1, 1), 2).is_empty());
    durable(&mut p, v(2, 3), 0);
    assert_eq!(
        durable(&mut p, v(2, 3), 1),
        vec![Command::Acked {
            op: 1,
            version: v(2, 3)
        }]
    );
    // A map with the same acting set is the same interval: nothing re-driven.
    assert!(map(&mut p, 3, &[0, 1], 2).is_empty());
    durable(&mut p, v(2, 4), 1);
    assert_eq!(
        durable(&mut p, v(2, 4), 0),
        vec![Command::Acked {
            op: 2,
            version: v(2, 4)
        }]
    );
}

#[test]
fn losing_primacy_rejects_everything_outstanding() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1], 1);
    mutate(&mut p, 1, "a", 0);
    read(&mut p, 2, "a");
    let c = map(&mut p, 2, &[1, 0], 1);
    let rejected: BTreeSet<OpId> = c
        .iter()
        .filter_map(|c| match c {
            Command::Reject {
                op,
                error: PgError::NotPrimary { epoch: 2 },
            } => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, BTreeSet::from([1, 2]));
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn reads_wait_for_mutations_of_their_object_and_vice_versa() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1], 2);
    mutate(&mut p, 1, "a", 0);
    assert!(
        read(&mut p, 2, "a").is_empty(),
        "read waits for the in-flight mutation"
    );
    assert_eq!(read(&mut p, 3, "b"), vec![Command::Read { op: 3 }]);
    // A mutation behind the waiting read waits too (order per object).
    assert!(applies(&mutate(&mut p, 4, "a", 0)).is_empty());
    durable(&mut p, v(1, 1), 0);
    let c = durable(&mut p, v(1, 1), 1);
    assert_eq!(
        c,
        vec![
            Command::Acked {
                op: 1,
                version: v(1, 1)
            },
            Command::Read { op: 2 }
        ]
    );
    // Mutation 4 starts only once read 2 is done.
    let c = p.handle(Event::ReadDone { op: 2 });
    assert_eq!(applies(&c), vec![(0, v(1, 2)), (1, v(1, 2))]);
}

#[test]
fn bounded_waiting() {
    let mut p = pg();
    map(&mut p, 1, &[0], 2);
    for op in 0..8 {
        assert!(mutate(&mut p, op, "a", 0).is_empty());
    }
    assert_eq!(
        mutate(&mut p, 99, "a", 0),
        vec![Command::Reject {
            op: 99,
            error: PgError::QueueFull { limit: 8 }
        }]
    );
}

/// Random interleavings of maps, operations, acknowledgements and failures, checking the
/// engine's promises on every step.
#[test]
fn random_schedules_keep_the_promises() {
    for seed in 0..300u64 {
        run_schedule(seed);
    }
}

fn run_schedule(seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut p: Pg = PgPrimary::new(
        0,
        0,
        PgLimits {
            op_timeout_ms: 50,
            max_waiting: 16,
        },
    );
    let osds = [0u32, 1, 2, 3];
    let mut epoch = 1;
    let mut acting = vec![0, 1, 2];
    let min_size = 2;
    let mut pending_acks: Vec<(Version, OsdId)> = Vec::new();
    let mut applied: HashMap<Version, (BTreeSet<OsdId>, BTreeSet<OsdId>, String)> = HashMap::new();
    let mut ops: HashMap<OpId, (bool, String, bool)> = HashMap::new(); // (is_mutation, object, answered)
    let mut running_reads: HashMap<OpId, String> = HashMap::new();
    let mut last_seq = 0;
    let mut next_op = 0;
    let mut now = 0;
    let mut check =
        |cmds: Vec<Command<u32>>,
         pending_acks: &mut Vec<(Version, OsdId)>,
         ops: &mut HashMap<OpId, (bool, String, bool)>,
         running_reads: &mut HashMap<OpId, String>,
         applied: &mut HashMap<Version, (BTreeSet<OsdId>, BTreeSet<OsdId>, String)>| {
            for c in cmds {
                match c {
                    Command::Apply {
                        to,
                        version,
                        object,
                        ..
                    } => {
                        assert!(version.seq >= last_seq, "seq went backwards");
                        last_seq = version.seq;
                        assert!(
                            !running_reads.values().any(|o| *o == object),
                            "seed {seed}: mutation of {object} started during a read of it"
                        );
                        let e = applied
                            .entry(version)
                            .or_insert_with(|| (BTreeSet::new(), BTreeSet::new(), object.clone()));
                        e.0.insert(to);
                        pending_acks.push((version, to));
                    }
                    Command::Acked { op, version } => {
                        let (sent, durable, _) = &applied[&version];
                        assert_eq!(
                            sent, durable,
                            "seed {seed}: acked {version:?} before every copy was durable"
                        );
                        assert!(
                            sent.len() >= min_size as usize,
                            "seed {seed}: acked below min_size"
                        );
                        let e = ops.get_mut(&op).expect("known op");
                        assert!(!e.2, "seed {seed}: op {op} answered twice");
                        e.2 = true;
                    }
                    Command::Reject { op, .. } => {
                        let e = ops.get_mut(&op).expect("known op");
                        assert!(!e.2, "seed {seed}: op {op} answered twice");
                        e.2 = true;
                    }
                    Command::QueryHead { .. }
                    | Command::Plan { .. }
                    | Command::RecoverObject { .. }
                    | Command::MarkComplete { .. }
                    | Command::WantGrant { .. }
                    | Command::ReleaseGrant { .. }
                    | Command::RecordActive { .. } => {
                        unreachable!("no recovery: every head is equal, every interval recorded")
                    }
                    Command::Read { op } => {
                        let e = ops.get_mut(&op).expect("known op");
                        assert!(!e.2, "seed {seed}: read {op} released twice");
                        e.2 = true;
                        let object = e.1.clone();
                        // No earlier mutation of the object is still unanswered.
                        assert!(
                        !ops.iter().any(|(id, (m, o, done))| *m && !done && *o == object && *id < op),
                        "seed {seed}: read {op} of {object} released before an earlier mutation finished"
                    );
                        running_reads.insert(op, object);
                    }
                }
            }
        };
    let c = map(&mut p, epoch, &acting, min_size);
    check(
        c,
        &mut pending_acks,
        &mut ops,
        &mut running_reads,
        &mut applied,
    );
    for _ in 0..200 {
        now += rnd(5);
        let c = match rnd(10) {
            0..=2 => {
                next_op += 1;
                let object = format!("o{}", rnd(3));
                ops.insert(next_op, (true, object.clone(), false));
                p.handle(Event::Mutate {
                    op: next_op,
                    object,
                    payload: 0,
                    now_ms: now,
                })
            }
            3 => {
                next_op += 1;
                let object = format!("o{}", rnd(3));
                ops.insert(next_op, (false, object.clone(), false));
                p.handle(Event::Read {
                    op: next_op,
                    object,
                    now_ms: now,
                })
            }
            4 if !running_reads.is_empty() => {
                let op = *running_reads.keys().next().expect("non-empty");
                running_reads.remove(&op);
                p.handle(Event::ReadDone { op })
            }
            5..=7 if !pending_acks.is_empty() => {
                let (version, from) = pending_acks.remove(rnd(pending_acks.len() as u64) as usize);
                if rnd(8) == 0 {
                    let c = p.handle(Event::Failed { version, from });
                    settle_heads(&mut p, c)
                } else {
                    if let Some(e) = applied.get_mut(&version) {
                        e.1.insert(from);
                    }
                    p.handle(Event::Durable { version, from })
                }
            }
            8 => {
                epoch += 1;
                acting = osds.iter().copied().filter(|_| rnd(3) != 0).collect();
                if rnd(2) == 0 {
                    acting.sort_unstable_by_key(|o| *o != 0);
                }
                let c = p.handle(Event::Map {
                    epoch,
                    history: acting.clone(),
                    size: 3,
                    acting: acting.clone(),
                    min_size,
                    incarnation: 0,
                    pause: RecoveryPause::default(),
                });
                settle_heads(&mut p, c)
            }
            _ => p.handle(Event::Tick { now_ms: now }),
        };
        check(
            c,
            &mut pending_acks,
            &mut ops,
            &mut running_reads,
            &mut applied,
        );
    }
    // Settle: a healthy interval with this OSD primary, every read finished, every ack
    // delivered. Then every operation has an answer.
    // A failed OSD leaves its op pending until the OSD leaves the acting set: go through
    // an interval without the old set before the healthy one.
    for a in [vec![0, 3], vec![0, 1, 2]] {
        epoch += 1;
        let c = p.handle(Event::Map {
            epoch,
            history: a.clone(),
            size: 3,
            acting: a,
            min_size,
            incarnation: 0,
            pause: RecoveryPause::default(),
        });
        let c = settle_heads(&mut p, c);
        check(
            c,
            &mut pending_acks,
            &mut ops,
            &mut running_reads,
            &mut applied,
        );
    }
    for _ in 0..10_000 {
        if let Some(&op) = running_reads.keys().next() {
            running_reads.remove(&op);
            let c = p.handle(Event::ReadDone { op });
            check(
                c,
                &mut pending_acks,
                &mut ops,
                &mut running_reads,
                &mut applied,
            );
            continue;
        }
        let Some((version, from)) = pending_acks.pop() else {
            break;
        };
        if let Some(e) = applied.get_mut(&version) {
            e.1.insert(from);
        }
        let c = p.handle(Event::Durable { version, from });
        check(
            c,
            &mut pending_acks,
            &mut ops,
            &mut running_reads,
            &mut applied,
        );
    }
    assert_all_answered(seed, &ops, &p);
}

#[test]
fn a_restarted_replica_is_a_new_interval() {
    let mut p = pg();
    let c = p.handle(Event::Map {
        epoch: 1,
        history: vec![0, 1].clone(),
        size: 3,
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 7,
        pause: RecoveryPause::default(),
    });
    settle_heads(&mut p, c);
    mutate(&mut p, 1, "a", 0);
    durable(&mut p, v(1, 1), 0);
    p.handle(Event::Failed {
        version: v(1, 1),
        from: 1,
    });
    // osd.1 restarts: same acting set, new incarnation: the write is sent again.
    let c = p.handle(Event::Map {
        epoch: 2,
        history: vec![0, 1].clone(),
        size: 3,
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 8,
        pause: RecoveryPause::default(),
    });
    let c = settle_heads(&mut p, c);
    assert_eq!(applies(&c), vec![(0, v(2, 2)), (1, v(2, 2))]);
    // The same incarnation at a later epoch is the same interval.
    assert!(p
        .handle(Event::Map {
            epoch: 3,
            history: vec![0, 1].clone(),
            size: 3,
            acting: vec![0, 1],
            min_size: 2,
            incarnation: 8,
            pause: RecoveryPause::default(),
        })
        .is_empty());
}

#[test]
fn a_failed_write_makes_the_pg_peer_again_and_redrives_it() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1], 2);
    mutate(&mut p, 1, "a", 100);
    assert!(read(&mut p, 2, "a").is_empty());
    durable(&mut p, v(1, 1), 0);
    // osd.1 lost the write (a connection blip): never acknowledged; the PG peers again.
    let c = p.handle(Event::Failed {
        version: v(1, 1),
        from: 1,
    });
    let queries: Vec<OsdId> = c
        .iter()
        .filter_map(|c| match c {
            Command::QueryHead { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(queries, vec![0, 1]);
    // osd.1 is behind: it is recovered from this OSD before the write runs again.
    let interval = match &c[0] {
        Command::QueryHead { interval, .. } => *interval,
        other => panic!("{other:?}"),
    };
    head(&mut p, 0, interval, Some(v(1, 1)));
    let c = head(&mut p, 1, interval, None);
    assert_eq!(
        c,
        vec![Command::Plan {
            from: 0,
            to: 1,
            interval,
            auth_head: Some(v(1, 1)),
        }]
    );
    let c = planned(&mut p, 1, interval, &[("a", None, Some(v(1, 1)))]);
    // Active again; the write's object is missing on osd.1: it is recovered first.
    assert_eq!(recoveries(&c), vec![("a".to_string(), false)]);
    assert!(applies(&c).is_empty());
    let c = p.handle(Event::ObjectRecovered {
        object: "a".into(),
        interval,
    });
    assert_eq!(applies(&c), vec![(0, v(1, 2)), (1, v(1, 2))]);
    // Nobody answers: the waiting operations fail after the op timeout.
    let c = p.handle(Event::Failed {
        version: v(1, 2),
        from: 1,
    });
    assert!(c.iter().all(|c| matches!(c, Command::QueryHead { .. })));
    let c = p.handle(Event::Tick { now_ms: 1200 });
    let rejected: Vec<OpId> = c
        .iter()
        .filter_map(|c| match c {
            Command::Reject {
                op,
                error: PgError::Peering { .. },
            } => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, vec![1, 2]);
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn a_refusal_fails_the_write_at_once() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1], 2);
    mutate(&mut p, 1, "a", 0);
    durable(&mut p, v(1, 1), 0);
    let error = StoreError::new(store_types::ErrorCode::NoSpace, "full");
    let c = p.handle(Event::Refused {
        version: v(1, 1),
        from: 1,
        error: error.clone(),
    });
    assert_eq!(
        c[0],
        Command::Reject {
            op: 1,
            error: PgError::Refused { osd: 1, error }
        }
    );
    // The copies may now differ (osd.0 applied it): the PG peers again.
    assert!(
        c.len() > 1
            && c[1..]
                .iter()
                .all(|c| matches!(c, Command::QueryHead { .. }))
    );
    // A late acknowledgement of the refused version changes nothing.
    assert!(durable(&mut p, v(1, 1), 1).is_empty());
    assert_eq!(p.outstanding(), 0);
}

#[test]
fn a_replica_with_a_newer_map_sends_the_client_to_the_new_primary() {
    // The replica's map no longer makes this OSD primary: the client is told NotPrimary
    // (it waits for that map and resends), not given an error.
    let mut p = pg();
    map(&mut p, 1, &[0, 1], 2);
    mutate(&mut p, 1, "a", 0);
    durable(&mut p, v(1, 1), 0);
    let c = p.handle(Event::Superseded {
        version: v(1, 1),
        from: 1,
        epoch: 2,
    });
    assert_eq!(
        c[0],
        Command::Reject {
            op: 1,
            error: PgError::NotPrimary { epoch: 2 }
        }
    );
    assert!(durable(&mut p, v(1, 1), 1).is_empty());
    assert_eq!(p.outstanding(), 0);
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

#[test]
fn peering_picks_the_newest_complete_copy_and_plans_every_other() {
    let mut p = pg();
    let c = p.handle(map_event(5, &[0, 1, 2], RecoveryPause::default()));
    let queries: Vec<OsdId> = c
        .iter()
        .filter_map(|c| match c {
            Command::QueryHead { to, interval: 1 } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(queries, vec![0, 1, 2]);
    // I/O waits while peering.
    assert!(mutate(&mut p, 1, "a", 0).is_empty());
    assert!(head(&mut p, 0, 1, Some(v(3, 7))).is_empty());
    // osd.2 is newer but incomplete (a recovery into it was cut short): never the source.
    assert!(p
        .handle(Event::Head {
            from: 2,
            interval: 1,
            head: Some(v(9, 9)),
            complete: false,
        })
        .is_empty());
    // A stale answer from another round is ignored.
    assert!(head(&mut p, 1, 99, Some(v(9, 9))).is_empty());
    let c = head(&mut p, 1, 1, Some(v(4, 2)));
    let plan = |to| Command::Plan {
        from: 1,
        to,
        interval: 1,
        auth_head: Some(v(4, 2)),
    };
    assert_eq!(c, vec![plan(0), plan(2)]);
    // A failed plan is retried on the next tick.
    p.handle(Event::PeerFailed {
        osd: 2,
        interval: 1,
    });
    assert_eq!(p.handle(Event::Tick { now_ms: 10 }), vec![plan(2)]);
    assert!(planned(&mut p, 0, 1, &[("b", Some(v(3, 7)), Some(v(4, 2)))]).is_empty());
    // Every plan is in: active at once, with a sequence after every head's (incomplete
    // ones too, so no version is used twice). The queued write's object is missing
    // nowhere: it runs now.
    let c = planned(
        &mut p,
        2,
        1,
        &[("b", None, Some(v(4, 2))), ("c", Some(v(9, 9)), None)],
    );
    assert_eq!(
        applies(&c),
        vec![(0, v(5, 10)), (1, v(5, 10)), (2, v(5, 10))]
    );
    assert!(c.contains(&Command::WantGrant { interval: 1 }));
    assert_eq!(p.phase(), Some((PgPhase::Recovering, 5)));
    assert_eq!(p.recovery_left(), (3, 0));
    // Background recovery takes one object per grant; "b" misses on this OSD and osd.2.
    let c = p.handle(Event::Granted { interval: 1 });
    assert_eq!(
        c,
        vec![Command::RecoverObject {
            object: "b".into(),
            source: 1,
            fixes: vec![
                (
                    0,
                    Fix {
                        have: Some(v(3, 7)),
                        want: Some(v(4, 2))
                    }
                ),
                (
                    2,
                    Fix {
                        have: None,
                        want: Some(v(4, 2))
                    }
                )
            ],
            interval: 1,
            background: true,
        }]
    );
    // A read of "b" waits: this OSD misses it.
    assert!(read(&mut p, 2, "b").is_empty());
    let c = p.handle(Event::ObjectRecovered {
        object: "b".into(),
        interval: 1,
    });
    assert!(c.contains(&Command::Read { op: 2 }));
    // osd.0 misses nothing more: marked complete. osd.2 still misses "c".
    assert!(c.contains(&Command::MarkComplete {
        to: 0,
        interval: 1,
        log_from: Some(v(4, 2))
    }));
    assert!(c.contains(&Command::WantGrant { interval: 1 }));
    let c = p.handle(Event::Granted { interval: 1 });
    assert_eq!(recoveries(&c), vec![("c".to_string(), true)]);
    let c = p.handle(Event::ObjectRecovered {
        object: "c".into(),
        interval: 1,
    });
    assert_eq!(
        c,
        vec![Command::MarkComplete {
            to: 2,
            interval: 1,
            log_from: Some(v(4, 2))
        }]
    );
    p.handle(Event::Completed { to: 0, interval: 1 });
    assert_eq!(p.phase(), Some((PgPhase::Recovering, 5)));
    p.handle(Event::Completed { to: 2, interval: 1 });
    assert_eq!(p.phase(), Some((PgPhase::Active, 5)));
    assert_eq!(p.recovery_left(), (0, 0));
}

#[test]
fn a_touched_missing_object_is_recovered_first_and_nothing_runs_on_it_meanwhile() {
    let mut p = pg();
    let c = p.handle(map_event(2, &[0, 1], RecoveryPause::default()));
    let c = settle_heads_with(&mut p, c, &[(0, Some(v(2, 5))), (1, Some(v(1, 1)))]);
    assert_eq!(c.len(), 1);
    let c = planned(
        &mut p,
        1,
        1,
        &[
            ("x", Some(v(1, 1)), Some(v(2, 5))),
            ("y", Some(v(1, 1)), None),
        ],
    );
    assert_eq!(c, vec![Command::WantGrant { interval: 1 }]);
    assert_eq!(p.phase(), Some((PgPhase::Recovering, 2)));
    // A read of "x" runs: only the replica misses it.
    assert_eq!(read(&mut p, 1, "x"), vec![Command::Read { op: 1 }]);
    // A write of "x" waits for the read, then for the object's recovery.
    assert!(mutate(&mut p, 2, "x", 0).is_empty());
    let c = p.handle(Event::ReadDone { op: 1 });
    assert_eq!(recoveries(&c), vec![("x".to_string(), false)]);
    // The background grant now goes to "y", not to "x" (being recovered).
    let c = p.handle(Event::Granted { interval: 1 });
    assert_eq!(recoveries(&c), vec![("y".to_string(), true)]);
    // Another write of "x" and a read queue behind; nothing runs on "x" yet.
    assert!(mutate(&mut p, 3, "x", 0).is_empty());
    assert!(read(&mut p, 4, "x").is_empty());
    // A failed recovery is retried on the next tick (it is urgent).
    let c = p.handle(Event::ObjectFailed {
        object: "x".into(),
        interval: 1,
        cause: RecoveryFailure::Transient,
    });
    assert!(applies(&c).is_empty());
    let c = p.handle(Event::Tick { now_ms: 5 });
    assert_eq!(recoveries(&c), vec![("x".to_string(), false)]);
    // Results of another round change nothing.
    assert!(p
        .handle(Event::ObjectRecovered {
            object: "x".into(),
            interval: 7,
        })
        .is_empty());
    let c = p.handle(Event::ObjectRecovered {
        object: "x".into(),
        interval: 1,
    });
    assert_eq!(
        applies(&c),
        vec![(0, v(2, 6)), (1, v(2, 6)), (0, v(2, 7)), (1, v(2, 7))]
    );
    assert_eq!(p.outstanding(), 3);
}

#[test]
fn recovery_flags_hold_background_work_but_not_touched_objects() {
    let mut p = pg();
    let hold = RecoveryPause {
        norecover: true,
        nobackfill: false,
    };
    let c = p.handle(map_event(2, &[0, 1], hold));
    settle_heads_with(&mut p, c, &[(0, Some(v(2, 5))), (1, Some(v(1, 1)))]);
    let c = planned(
        &mut p,
        1,
        1,
        &[
            ("x", Some(v(1, 1)), Some(v(2, 5))),
            ("y", None, Some(v(2, 4))),
        ],
    );
    assert!(
        c.is_empty(),
        "no background recovery under norecover: {c:?}"
    );
    assert_eq!(p.phase(), Some((PgPhase::RecoveryWait, 2)));
    // A client write still gets its object recovered.
    mutate(&mut p, 1, "y", 0);
    let c = p.handle(Event::ObjectRecovered {
        object: "y".into(),
        interval: 1,
    });
    assert_eq!(applies(&c).len(), 2);
    // Unsetting the flag (same interval, new epoch) resumes it.
    let c = p.handle(map_event(3, &[0, 1], RecoveryPause::default()));
    assert_eq!(c, vec![Command::WantGrant { interval: 1 }]);
    assert_eq!(p.phase(), Some((PgPhase::Recovering, 3)));
    // A grant that arrives after the flag is set again is given back.
    p.handle(map_event(4, &[0, 1], hold));
    assert_eq!(
        p.handle(Event::Granted { interval: 1 }),
        vec![Command::ReleaseGrant { interval: 1 }]
    );
}

#[test]
fn no_complete_copy_makes_the_pg_incomplete() {
    let mut p = pg();
    p.handle(map_event(3, &[0, 1], RecoveryPause::default()));
    mutate(&mut p, 1, "a", 0);
    for from in [0, 1] {
        p.handle(Event::Head {
            from,
            interval: 1,
            head: Some(v(2, from as u64 + 1)),
            complete: false,
        });
    }
    assert_eq!(p.phase(), Some((PgPhase::Incomplete, 3)));
    let c = p.handle(Event::Tick { now_ms: 1500 });
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 1,
            error: PgError::Incomplete { waited_ms: 1500 }
        }]
    );
    // A map that brings an OSD with a complete copy peers again.
    let c = p.handle(map_event(4, &[0, 1, 2], RecoveryPause::default()));
    assert_eq!(c.len(), 3);
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

#[test]
fn peering_that_never_finishes_fails_waiting_operations() {
    let mut p = pg();
    p.handle(Event::Map {
        epoch: 1,
        history: vec![0, 1].clone(),
        size: 3,
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 0,
        pause: RecoveryPause::default(),
    });
    mutate(&mut p, 1, "a", 0);
    head(&mut p, 0, 1, None);
    let c = p.handle(Event::Tick { now_ms: 1500 });
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 1,
            error: PgError::Peering { waited_ms: 1500 }
        }]
    );
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

#[test]
fn random_schedules_with_recovery_keep_the_promises() {
    for seed in 0..300u64 {
        RecoverySim::new(seed).run();
    }
}

/// A PG under random interleavings of client operations, map changes, peering answers,
/// recovery results and failures. Checks: no mutation or recovery of an object while the
/// current round misses it or recovers it (as the plans told), no read of an object this
/// OSD misses, every operation answered exactly once, and all answered after a settle.
struct RecoverySim {
    seed: u64,
    x: u64,
    p: Pg,
    epoch: u64,
    round: u64,
    /// Per round: OSDs whose plan was accepted.
    planned: BTreeSet<(u64, OsdId)>,
    /// The current round's missing objects (object → OSDs).
    missing: BTreeMap<String, BTreeSet<OsdId>>,
    recovering: BTreeSet<String>,
    /// Commands waiting for an answer from the "cluster".
    bag: Vec<Command<u32>>,
    ops: HashMap<OpId, (bool, String, bool)>,
    running_reads: HashMap<OpId, String>,
    next_op: OpId,
    now: u64,
    settling: bool,
    /// The monitors' model: the acting set of the newest map, and the PG's last active
    /// set with the epoch its interval started at.
    acting: Vec<OsdId>,
    history: Vec<OsdId>,
    history_since: u64,
}

impl RecoverySim {
    fn new(seed: u64) -> Self {
        let p = PgPrimary::new(
            0,
            0,
            PgLimits {
                op_timeout_ms: 40,
                max_waiting: 16,
            },
        );
        RecoverySim {
            seed,
            x: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            p,
            epoch: 0,
            round: 0,
            planned: BTreeSet::new(),
            missing: BTreeMap::new(),
            recovering: BTreeSet::new(),
            bag: Vec::new(),
            ops: HashMap::new(),
            running_reads: HashMap::new(),
            next_op: 0,
            now: 0,
            settling: false,
            acting: Vec::new(),
            history: vec![0, 1, 2],
            history_since: 0,
        }
    }

    fn feed_map(&mut self, acting: Vec<OsdId>, pause: RecoveryPause) {
        self.epoch += 1;
        self.acting = acting.clone();
        let e = Event::Map {
            epoch: self.epoch,
            history: self.history.clone(),
            size: 3,
            acting,
            min_size: 2,
            incarnation: 0,
            pause,
        };
        self.feed(e);
    }

    fn rnd(&mut self, n: u64) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x % n
    }

    fn feed(&mut self, e: Event<u32>) {
        let cmds = self.p.handle(e);
        let seed = self.seed;
        for c in cmds {
            match &c {
                Command::Apply { object, .. } => {
                    assert!(
                        !self.missing.contains_key(object) && !self.recovering.contains(object),
                        "seed {seed}: mutation of {object}, which the round misses"
                    );
                    assert!(
                        same_osds(&self.history, &self.acting),
                        "seed {seed}: a write in an interval the map does not record as last active ({:?} vs {:?})",
                        self.history,
                        self.acting
                    );
                    self.bag.push(c);
                }
                Command::Read { op } => {
                    let e = self.ops.get_mut(op).expect("known op");
                    assert!(!e.2, "seed {seed}: read {op} released twice");
                    e.2 = true;
                    let object = e.1.clone();
                    assert!(
                        !self.recovering.contains(&object)
                            && !self.missing.get(&object).is_some_and(|m| m.contains(&0)),
                        "seed {seed}: read of {object}, which this OSD misses"
                    );
                    self.running_reads.insert(*op, object);
                }
                Command::Acked { op, .. } | Command::Reject { op, .. } => {
                    let e = self.ops.get_mut(op).expect("known op");
                    assert!(!e.2, "seed {seed}: op {op} answered twice");
                    e.2 = true;
                }
                Command::QueryHead { interval, .. } => {
                    if *interval != self.round {
                        self.round = *interval;
                        self.missing.clear();
                        self.recovering.clear();
                    }
                    self.bag.push(c);
                }
                Command::RecoverObject {
                    object, interval, ..
                } => {
                    assert_eq!(*interval, self.round, "seed {seed}");
                    assert!(
                        self.missing.contains_key(object) && self.recovering.insert(object.clone()),
                        "seed {seed}: recovery of {object}: not missing, or already running"
                    );
                    assert!(
                        !self.running_reads.values().any(|o| o == object),
                        "seed {seed}: recovery of {object} during a read of it"
                    );
                    self.bag.push(c);
                }
                Command::Plan { .. }
                | Command::MarkComplete { .. }
                | Command::WantGrant { .. }
                | Command::RecordActive { .. } => self.bag.push(c),
                Command::ReleaseGrant { .. } => {}
            }
        }
    }

    fn answer(&mut self, c: Command<u32>) {
        let fail = !self.settling && self.rnd(6) == 0;
        let e = match c {
            Command::Apply { to, version, .. } if fail => Event::Failed { version, from: to },
            Command::Apply { to, version, .. } => Event::Durable { version, from: to },
            Command::QueryHead { to, interval } if fail => Event::PeerFailed { osd: to, interval },
            Command::QueryHead { to, interval } => {
                let head = [None, Some(v(1, 1)), Some(v(1, 2))][self.rnd(3) as usize];
                let complete = self.settling || self.rnd(5) != 0;
                Event::Head {
                    from: to,
                    interval,
                    head,
                    complete,
                }
            }
            Command::Plan { to, interval, .. } if fail => Event::PeerFailed { osd: to, interval },
            Command::Plan { to, interval, .. } => {
                let mut fixes = Vec::new();
                for o in 0..3 {
                    if self.rnd(2) == 0 {
                        let fix = Fix {
                            have: None,
                            want: Some(v(1, 1)),
                        };
                        fixes.push((format!("o{o}"), fix));
                    }
                }
                if interval == self.round && self.planned.insert((interval, to)) {
                    for (o, _) in &fixes {
                        self.missing.entry(o.clone()).or_default().insert(to);
                    }
                }
                let mode = if self.rnd(2) == 0 {
                    RecoveryMode::Log
                } else {
                    RecoveryMode::Backfill
                };
                Event::Planned {
                    to,
                    interval,
                    fixes,
                    mode,
                }
            }
            Command::RecoverObject {
                object, interval, ..
            } => {
                if interval == self.round && self.recovering.remove(&object) && !fail {
                    self.missing.remove(&object);
                }
                if fail {
                    Event::ObjectFailed {
                        object,
                        interval,
                        cause: RecoveryFailure::Transient,
                    }
                } else {
                    Event::ObjectRecovered { object, interval }
                }
            }
            Command::MarkComplete { to, interval, .. } if fail => {
                Event::PeerFailed { osd: to, interval }
            }
            Command::MarkComplete { to, interval, .. } => Event::Completed { to, interval },
            Command::WantGrant { interval } => Event::Granted { interval },
            // Lost on the way (repeated on a tick), or committed: a new map records it
            // (the monitors keep the newest interval's record).
            Command::RecordActive { .. } if fail => return,
            Command::RecordActive { since_epoch, osds } => {
                if since_epoch >= self.history_since {
                    self.history = osds;
                    self.history_since = since_epoch;
                }
                let acting = self.acting.clone();
                return self.feed_map(acting, self.p.pause);
            }
            other => unreachable!("not an external command: {other:?}"),
        };
        self.feed(e);
    }

    fn step(&mut self) {
        self.now += self.rnd(5);
        match self.rnd(14) {
            0..=2 => {
                self.next_op += 1;
                let object = format!("o{}", self.rnd(3));
                let op = self.next_op;
                let mutate = self.rnd(3) != 0;
                self.ops.insert(op, (mutate, object.clone(), false));
                let now_ms = self.now;
                self.feed(if mutate {
                    Event::Mutate {
                        op,
                        object,
                        payload: 0,
                        now_ms,
                    }
                } else {
                    Event::Read { op, object, now_ms }
                });
            }
            3 if !self.running_reads.is_empty() => {
                let op = *self.running_reads.keys().next().expect("non-empty");
                self.running_reads.remove(&op);
                self.feed(Event::ReadDone { op });
            }
            4 => {
                self.epoch += 1;
                let mut acting: Vec<OsdId> = [0, 1, 2, 3]
                    .into_iter()
                    .filter(|_| self.rnd(3) != 0)
                    .collect();
                if self.rnd(2) == 0 {
                    acting.sort_unstable_by_key(|o| *o != 0);
                }
                let pause = RecoveryPause {
                    norecover: self.rnd(4) == 0,
                    nobackfill: self.rnd(4) == 0,
                };
                self.epoch -= 1;
                self.feed_map(acting, pause);
            }
            5 => {
                let now_ms = self.now;
                self.feed(Event::Tick { now_ms });
            }
            _ if !self.bag.is_empty() => {
                let i = self.rnd(self.bag.len() as u64) as usize;
                let c = self.bag.swap_remove(i);
                self.answer(c);
            }
            _ => {}
        }
    }

    fn run(mut self) {
        for _ in 0..300 {
            self.step();
        }
        // Settle: a healthy interval with this OSD primary and no flags; every answer a
        // success. Then every operation has an answer.
        self.settling = true;
        for acting in [vec![0, 3], vec![0, 1, 2]] {
            self.feed_map(acting, RecoveryPause::default());
        }
        for _ in 0..20_000 {
            if let Some(&op) = self.running_reads.keys().next() {
                self.running_reads.remove(&op);
                self.feed(Event::ReadDone { op });
            } else if let Some(c) = self.bag.pop() {
                self.answer(c);
            } else {
                break;
            }
            if self.bag.is_empty() {
                self.now += 1;
                let now_ms = self.now;
                self.feed(Event::Tick { now_ms });
            }
        }
        let seed = self.seed;
        assert_all_answered(seed, &self.ops, &self.p);
        assert_eq!(
            self.p.phase().map(|(ph, _)| ph),
            Some(PgPhase::Active),
            "seed {seed}"
        );
    }
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

#[test]
fn a_new_acting_set_is_recorded_before_any_write_and_repeated_until_the_map_has_it() {
    let mut p = pg();
    // Last active set {0, 1, 2}; osd.2 is gone: interval {0, 1}, equal heads.
    let c = p.handle(map_with_history(7, &[0, 1], &[0, 1, 2]));
    assert_eq!(c.len(), 2);
    assert!(head(&mut p, 0, 1, Some(v(6, 4))).is_empty());
    let c = head(&mut p, 1, 1, Some(v(6, 4)));
    let record = Command::RecordActive {
        since_epoch: 7,
        osds: vec![0, 1],
    };
    assert_eq!(c, vec![record.clone()]);
    // Not active yet: a write waits, and the record is asked for again on ticks.
    assert!(mutate(&mut p, 1, "a", 0).is_empty());
    assert_eq!(p.phase(), Some((PgPhase::Peering, 7)));
    assert_eq!(p.handle(Event::Tick { now_ms: 5 }), vec![record]);
    // A map that records it (same interval): active, and the write goes out.
    let c = p.handle(map_with_history(8, &[0, 1], &[1, 0]));
    assert_eq!(applies(&c), vec![(0, v(8, 5)), (1, v(8, 5))]);
    assert_eq!(p.phase(), Some((PgPhase::Active, 8)));
}

#[test]
fn only_a_copy_of_the_last_active_set_is_authoritative() {
    let mut p = pg();
    // osd.1 and osd.2 held the PG last; osd.0 (this one) and osd.3 have older copies
    // that look complete, osd.3's even with a newer (never acknowledged) head.
    p.handle(map_with_history(9, &[0, 1, 3], &[1, 2]));
    assert!(head(&mut p, 0, 1, Some(v(2, 2))).is_empty());
    assert!(head(&mut p, 3, 1, Some(v(8, 8))).is_empty());
    let c = head(&mut p, 1, 1, Some(v(7, 3)));
    let plan = |to| Command::Plan {
        from: 1,
        to,
        interval: 1,
        auth_head: Some(v(7, 3)),
    };
    assert_eq!(c, vec![plan(0), plan(3)]);
}

#[test]
fn without_the_last_active_set_the_pg_is_down_until_one_returns_or_is_lost() {
    let mut p = pg();
    // osd.1 and osd.2 held it last and are both gone; osd.0 and osd.3 have complete
    // but possibly stale copies: nothing is served.
    p.handle(map_with_history(9, &[0, 3], &[1, 2]));
    head(&mut p, 0, 1, Some(v(5, 5)));
    assert!(head(&mut p, 3, 1, Some(v(5, 5))).is_empty());
    assert_eq!(p.phase(), Some((PgPhase::Down, 9)));
    assert!(mutate(&mut p, 1, "a", 0).is_empty());
    let c = p.handle(Event::Tick { now_ms: 2000 });
    assert_eq!(
        c,
        vec![Command::Reject {
            op: 1,
            error: PgError::Down {
                waiting_for: vec![1, 2],
                waited_ms: 2000
            }
        }]
    );
    // osd.1 declared lost: the record still names osd.2. osd.2 declared lost too: the
    // PG peers again and goes active from the copies that are left.
    let c = p.handle(map_with_history(10, &[0, 3], &[2]));
    assert_eq!(c.len(), 2, "{c:?}");
    head(&mut p, 0, 2, Some(v(5, 5)));
    head(&mut p, 3, 2, Some(v(5, 5)));
    assert_eq!(p.phase(), Some((PgPhase::Down, 10)));
    let c = p.handle(map_with_history(11, &[0, 3], &[]));
    assert_eq!(c.len(), 2, "{c:?}");
    head(&mut p, 0, 3, Some(v(5, 5)));
    let c = head(&mut p, 3, 3, Some(v(5, 5)));
    assert_eq!(
        c,
        vec![Command::RecordActive {
            since_epoch: 11,
            osds: vec![0, 3]
        }]
    );
    p.handle(map_with_history(12, &[0, 3], &[0, 3]));
    assert_eq!(p.phase(), Some((PgPhase::Active, 12)));
}

#[test]
fn members_of_the_last_active_set_that_are_all_incomplete_make_the_pg_incomplete() {
    let mut p = pg();
    p.handle(map_with_history(4, &[0, 1], &[0, 1]));
    p.handle(Event::Head {
        from: 0,
        interval: 1,
        head: Some(v(3, 3)),
        complete: false,
    });
    p.handle(Event::Head {
        from: 1,
        interval: 1,
        head: Some(v(3, 3)),
        complete: false,
    });
    assert_eq!(p.phase(), Some((PgPhase::Incomplete, 4)));
}

#[test]
fn copies_missing_beyond_the_pool_size_are_misplaced_not_degraded() {
    let mut p = pg();
    // A remapped PG: the three old OSDs plus osd.3, which CRUSH moved it to.
    p.handle(map_with_history(5, &[0, 1, 2, 3], &[0, 1, 2, 3]));
    for o in [0, 1, 2] {
        head(&mut p, o, 1, Some(v(4, 4)));
    }
    let c = head(&mut p, 3, 1, None);
    assert_eq!(c.len(), 1, "{c:?}");
    planned(
        &mut p,
        3,
        1,
        &[("a", None, Some(v(4, 1))), ("b", None, Some(v(4, 2)))],
    );
    // Three complete copies of each object exist: both missing copies are misplaced.
    assert_eq!(p.recovery_left(), (2, 2));
    assert_eq!(p.phase(), Some((PgPhase::Recovering, 5)));
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

/// The chaos test's hung write: an operation waits at its object's gate for a recovery
/// whose plan went stale (a write of the previous interval landed after the heads were
/// read), so the same recovery fails on every retry. Before: the write waited forever
/// (no new interval came). Now a stale plan makes the PG peer again, and the replan
/// lets the write run.
#[test]
fn a_stale_recovery_plan_is_replanned_not_retried_forever() {
    let mut p = active_with_x_missing_on(1);
    let c = mutate(&mut p, 1, "x", 0);
    assert!(applies(&c).is_empty(), "waits for the recovery");
    assert_eq!(recoveries(&c), vec![("x".to_string(), false)]);
    let c = p.handle(Event::ObjectFailed {
        object: "x".into(),
        interval: 1,
        cause: RecoveryFailure::StalePlan,
    });
    // Peering again: every acting OSD is asked for its head.
    let queried: Vec<OsdId> = c
        .iter()
        .filter_map(|c| match c {
            Command::QueryHead { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(queried, vec![0, 1]);
    // The replica has it now (the late write landed): nothing to recover, the write runs.
    let c = settle_heads_with(&mut p, c, &[(0, Some(v(2, 6))), (1, Some(v(2, 6)))]);
    assert!(!c.iter().any(|c| matches!(c, Command::Plan { .. })));
    assert_eq!(applies(&c), vec![(0, v(2, 7)), (1, v(2, 7))]);
    durable(&mut p, v(2, 7), 0);
    let c = durable(&mut p, v(2, 7), 1);
    assert_eq!(
        c,
        vec![Command::Acked {
            op: 1,
            version: v(2, 7)
        }]
    );
    assert_eq!(p.outstanding(), 0);
}

/// A recovery that keeps failing for a passing reason never holds an operation past the
/// op timeout while the PG stays active in the same interval: it is answered with what it
/// waited for.
#[test]
fn an_active_pg_answers_every_gated_op_within_the_op_timeout() {
    let mut p = active_with_x_missing_on(1);
    let mut c = mutate(&mut p, 1, "x", 10);
    assert!(applies(&c).is_empty());
    let mut answered = Vec::new();
    for t in (0..=2000).step_by(250) {
        c.extend(p.handle(Event::Tick { now_ms: t }));
        for c in &c {
            if let Command::RecoverObject { interval, .. } = c {
                let failed = p.handle(Event::ObjectFailed {
                    object: "x".into(),
                    interval: *interval,
                    cause: RecoveryFailure::Transient,
                });
                answered.extend(rejects(&failed));
            }
        }
        answered.extend(rejects(&c));
        c.clear();
    }
    assert_eq!(answered.len(), 1, "{answered:?}");
    let (op, error) = &answered[0];
    assert_eq!(*op, 1);
    assert!(
        matches!(error, PgError::Blocked { waiting_for, waited_ms }
            if waiting_for.contains("recovery of x") && *waited_ms >= 1000),
        "{error}"
    );
    assert_eq!(p.outstanding(), 0);
}

/// A mutation whose copy never answers is answered (not acknowledged) at the op timeout;
/// a late durable report does not acknowledge it any more.
#[test]
fn an_in_flight_mutation_is_answered_at_the_op_timeout_and_never_acked_after() {
    let mut p = pg();
    map(&mut p, 1, &[0, 1, 2], 2);
    mutate(&mut p, 7, "a", 0);
    durable(&mut p, v(1, 1), 0);
    durable(&mut p, v(1, 1), 1);
    assert!(rejects(&p.handle(Event::Tick { now_ms: 500 })).is_empty());
    let r = rejects(&p.handle(Event::Tick { now_ms: 1000 }));
    assert_eq!(r.len(), 1);
    assert!(
        matches!(&r[0].1, PgError::Blocked { waiting_for, .. } if waiting_for.contains("osd.2"))
    );
    assert!(
        rejects(&p.handle(Event::Tick { now_ms: 1500 })).is_empty(),
        "answered once"
    );
    let c = durable(&mut p, v(1, 1), 2);
    assert!(!c.iter().any(|c| matches!(c, Command::Acked { op: 7, .. })));
}

/// A read waiting for the recovery of an object this OSD misses fails at once when an OSD
/// refuses the recovery (its device is full), instead of waiting for a recovery that
/// cannot finish.
#[test]
fn a_refused_recovery_fails_its_waiting_ops_at_once() {
    let mut p = active_with_x_missing_on(0);
    let c = read(&mut p, 1, "x");
    assert_eq!(
        recoveries(&c),
        vec![("x".to_string(), false)],
        "waits for the recovery"
    );
    let full = StoreError::new(store_types::ErrorCode::NoSpace, "device full");
    let c = p.handle(Event::ObjectFailed {
        object: "x".into(),
        interval: 1,
        cause: RecoveryFailure::Refused(full.clone()),
    });
    assert_eq!(
        rejects(&c),
        vec![(
            1,
            PgError::RecoveryFailed {
                object: "x".into(),
                error: full
            }
        )]
    );
    assert_eq!(p.outstanding(), 0);
}
