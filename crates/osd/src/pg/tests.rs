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
        acting: acting.to_vec(),
        min_size,
        incarnation: 0,
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
                    Command::QueryHead { .. } | Command::Recover { .. } => {
                        unreachable!("answered by settle_heads")
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
                    acting: acting.clone(),
                    min_size,
                    incarnation: 0,
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
            acting: a,
            min_size,
            incarnation: 0,
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
fn a_restarted_replica_is_a_new_interval() {
    let mut p = pg();
    let c = p.handle(Event::Map {
        epoch: 1,
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 7,
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
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 8,
    });
    let c = settle_heads(&mut p, c);
    assert_eq!(applies(&c), vec![(0, v(2, 2)), (1, v(2, 2))]);
    // The same incarnation at a later epoch is the same interval.
    assert!(p
        .handle(Event::Map {
            epoch: 3,
            acting: vec![0, 1],
            min_size: 2,
            incarnation: 8
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
        vec![Command::Recover {
            from: 0,
            to: 1,
            interval
        }]
    );
    let c = p.handle(Event::Recovered { to: 1, interval });
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

fn head(p: &mut Pg, from: OsdId, interval: u64, h: Option<Version>) -> Vec<Command<u32>> {
    p.handle(Event::Head {
        from,
        interval,
        head: h,
    })
}

#[test]
fn peering_brings_a_stale_primary_up_first_then_stale_replicas() {
    let mut p = pg();
    let c = p.handle(Event::Map {
        epoch: 5,
        acting: vec![0, 1, 2],
        min_size: 2,
        incarnation: 0,
    });
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
    assert!(head(&mut p, 2, 1, None).is_empty());
    // A stale answer from another interval is ignored.
    assert!(head(&mut p, 1, 99, Some(v(9, 9))).is_empty());
    // osd.1 has the newest log: this (primary) OSD recovers from it first.
    let c = head(&mut p, 1, 1, Some(v(4, 2)));
    assert_eq!(
        c,
        vec![Command::Recover {
            from: 1,
            to: 0,
            interval: 1
        }]
    );
    // A failure is retried on the next tick.
    p.handle(Event::PeerFailed {
        osd: 0,
        interval: 1,
    });
    let c = p.handle(Event::Tick { now_ms: 10 });
    assert_eq!(
        c,
        vec![Command::Recover {
            from: 1,
            to: 0,
            interval: 1
        }]
    );
    // Then osd.2 (empty) is brought up from this OSD.
    let c = p.handle(Event::Recovered { to: 0, interval: 1 });
    assert_eq!(
        c,
        vec![Command::Recover {
            from: 0,
            to: 2,
            interval: 1
        }]
    );
    // When everyone is current the PG goes active and the queued write runs, with a
    // sequence after the newest head's.
    let c = p.handle(Event::Recovered { to: 2, interval: 1 });
    assert_eq!(applies(&c), vec![(0, v(5, 3)), (1, v(5, 3)), (2, v(5, 3))]);
}

#[test]
fn peering_that_never_finishes_fails_waiting_operations() {
    let mut p = pg();
    p.handle(Event::Map {
        epoch: 1,
        acting: vec![0, 1],
        min_size: 2,
        incarnation: 0,
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
