//! Client operations: acknowledgement on every acting OSD, queueing while inactive,
//! object gates, bounded waiting, re-driving across intervals, refusals and op timeouts.

use super::*;

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
