//! Recovery while active: objects a client touches first, recovery flags, misplaced
//! copies, stale plans, refusals, and gated operations at the op timeout.

use super::*;

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

/// When an OSD refuses the recovery of an object this OSD misses (its device is full), the
/// operations waiting for it do not wait for a recovery that cannot finish: a mutation
/// fails at once with that error, a read is served from a copy that has the object (the
/// round's source), and so are later reads, until a retry recovers the object.
#[test]
fn a_refused_recovery_fails_waiting_writes_and_serves_reads_from_a_good_copy() {
    let mut p = active_with_x_missing_on(0);
    let c = read(&mut p, 1, "x");
    assert_eq!(
        recoveries(&c),
        vec![("x".to_string(), false)],
        "waits for the recovery"
    );
    assert!(mutate(&mut p, 2, "x", 0).is_empty());
    let full = StoreError::new(store_types::ErrorCode::NoSpace, "device full");
    let c = p.handle(Event::ObjectFailed {
        object: "x".into(),
        interval: 1,
        cause: RecoveryFailure::Refused(full.clone()),
    });
    assert_eq!(
        rejects(&c),
        vec![(
            2,
            PgError::RecoveryFailed {
                object: "x".into(),
                error: full
            }
        )]
    );
    assert!(c.contains(&Command::ReadFrom { op: 1, from: 1 }), "{c:?}");
    assert_eq!(p.outstanding(), 0);
    // Later reads go there at once, without a recovery attempt first.
    p.handle(Event::ReadDone { op: 1 });
    assert_eq!(
        read(&mut p, 3, "x"),
        vec![Command::ReadFrom { op: 3, from: 1 }]
    );
    p.handle(Event::ReadDone { op: 3 });
    // Once a retry recovers it, reads are local again.
    let c = p.handle(Event::Tick { now_ms: 10 });
    let c = if recoveries(&c).is_empty() {
        p.handle(Event::Granted { interval: 1 })
    } else {
        c
    };
    assert_eq!(recoveries(&c).len(), 1, "{c:?}");
    p.handle(Event::ObjectRecovered {
        object: "x".into(),
        interval: 1,
    });
    assert_eq!(read(&mut p, 4, "x"), vec![Command::Read { op: 4 }]);
}
