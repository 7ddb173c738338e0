//! Peering: choosing the authoritative copy, planning the others, recording the last
//! active set, and the incomplete and down phases.

use super::*;

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
