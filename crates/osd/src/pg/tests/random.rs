//! Random schedules (with and without recovery) that check the engine's promises on
//! every step.

use super::*;

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
                    | Command::ReadFrom { .. }
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
    /// The liveness phase: copies never answer, recoveries keep failing.
    stuck: bool,
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
            stuck: false,
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
                Command::ReadFrom { op, from } => {
                    let e = self.ops.get_mut(op).expect("known op");
                    assert!(!e.2, "seed {seed}: read {op} released twice");
                    e.2 = true;
                    let object = e.1.clone();
                    assert!(
                        !self.recovering.contains(&object)
                            && !self.missing.get(&object).is_some_and(|m| m.contains(from))
                            && self.acting.contains(from),
                        "seed {seed}: read of {object} sent to osd.{from}, which misses it"
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
                let fail = fail || self.stuck;
                if interval == self.round && self.recovering.remove(&object) && !fail {
                    self.missing.remove(&object);
                }
                if fail || self.stuck {
                    // Any cause: a passing fault, a stale plan, or an OSD that cannot
                    // take the object; while stuck, always a passing fault.
                    let cause = match (self.stuck, self.rnd(3)) {
                        (false, 1) => RecoveryFailure::StalePlan,
                        (false, 2) => RecoveryFailure::Refused(StoreError::new(
                            store_types::ErrorCode::NoSpace,
                            "full",
                        )),
                        _ => RecoveryFailure::Transient,
                    };
                    Event::ObjectFailed {
                        object,
                        interval,
                        cause,
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

    /// No new interval comes, no copy answers a mutation, every recovery fails: still,
    /// within the op timeout (and a few ticks) every operation has its answer. This is
    /// the chaos test's hung write: a gated write waiting for a recovery that failed on
    /// every retry, in an interval that did not change.
    fn liveness(&mut self) {
        self.stuck = true;
        let deadline = self.now + 40 * 3;
        let mut held = Vec::new();
        while self.now < deadline {
            if let Some(&op) = self.running_reads.keys().next() {
                self.running_reads.remove(&op);
                self.feed(Event::ReadDone { op });
            }
            while let Some(c) = self.bag.pop() {
                match c {
                    // Copies that never answer.
                    Command::Apply { .. } => held.push(c),
                    c => self.answer(c),
                }
            }
            self.now += 5;
            let now_ms = self.now;
            self.feed(Event::Tick { now_ms });
        }
        let seed = self.seed;
        let waiting: Vec<&OpId> = self
            .ops
            .iter()
            .filter(|(_, e)| !e.2)
            .map(|(op, _)| op)
            .collect();
        assert!(
            waiting.is_empty(),
            "seed {seed}: ops {waiting:?} unanswered past the op timeout in a stuck interval"
        );
        self.stuck = false;
        self.bag.extend(held);
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
        self.liveness();
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
