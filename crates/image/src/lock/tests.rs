//! The lock machine without sockets: directed cases, then random schedules of two sessions
//! against a model of the monitors' rules, checking that no write ever runs under a
//! generation the map does not grant, and that every write finishes.

use super::*;
use proptest::prelude::*;

fn view(holder_is_me: bool, free: bool, generation: u64, requested: bool) -> LockView {
    LockView {
        holder_is_me,
        free,
        generation,
        requested_by_other: requested,
        me_blocklisted: None,
    }
}

/// A machine that holds the lock at generation 1.
fn locked() -> LockMachine {
    let mut m = LockMachine::new();
    m.begin();
    m.handle(Event::AcquireAnswered { granted: true });
    m.handle(Event::Map(view(true, false, 1, false)));
    m
}

#[test]
fn first_write_acquires_then_goes() {
    let mut m = LockMachine::new();
    let (b, cmds) = m.begin();
    assert_eq!(b, Begin::Wait);
    assert_eq!(cmds, vec![Command::Acquire]);
    // A second writer does not ask again.
    assert_eq!(m.begin(), (Begin::Wait, vec![]));
    m.handle(Event::AcquireAnswered { granted: true });
    assert_eq!(
        m.handle(Event::Map(view(true, false, 3, false))),
        vec![Command::Wake]
    );
    assert_eq!(m.begin().0, Begin::Go { generation: 3 });
}

#[test]
fn a_request_drains_writes_then_releases_and_asks_back() {
    let mut m = locked();
    assert_eq!(m.begin().0, Begin::Go { generation: 1 });
    // Another session asks: no new writes start, the one in flight finishes first.
    m.handle(Event::Map(view(true, false, 1, true)));
    assert_eq!(m.state(), &LockState::Releasing { generation: 1 });
    assert_eq!(m.begin().0, Begin::Wait);
    assert_eq!(
        m.handle(Event::WriteDone),
        vec![Command::Release { generation: 1 }]
    );
    // The map shows it handed over before the answer comes: only the answer ends
    // Releasing (it tells a release that applied from a lock taken first).
    m.handle(Event::Map(view(false, false, 2, false)));
    assert_eq!(m.state(), &LockState::Releasing { generation: 1 });
    m.handle(Event::ReleaseAnswered);
    assert_eq!(m.state(), &LockState::Unlocked);
    // A map older than the release (still ours at generation 1) is not a hand-back.
    m.handle(Event::Map(view(true, false, 1, false)));
    assert_eq!(m.state(), &LockState::Unlocked);
    assert_eq!(m.begin(), (Begin::Wait, vec![Command::Acquire]));
}

#[test]
fn blocklisting_fences_for_good() {
    let mut m = LockMachine::new();
    m.begin();
    m.handle(Event::Map(view(true, false, 1, false)));
    let mut v = view(true, false, 1, false);
    v.me_blocklisted = Some("operator".into());
    m.handle(Event::Map(v));
    assert!(matches!(m.begin().0, Begin::Fail(e) if e.code == ErrorCode::Blocklisted));
    m.handle(Event::Map(view(true, false, 1, false)));
    assert!(matches!(m.state(), LockState::Fenced { .. }));
    let mut m = LockMachine::new();
    m.begin();
    m.handle(Event::AcquireFailed(StoreError::new(
        ErrorCode::Blocklisted,
        "x",
    )));
    assert!(matches!(m.begin().0, Begin::Fail(_)));
}

#[test]
fn a_lock_taken_without_a_release_fences_even_once_the_blocklist_entry_is_gone() {
    // Hung for longer than the blocklist entry lived: the first map seen after waking
    // shows another holder and no entry. The queued write must fail, not re-acquire.
    let mut m = locked();
    assert_eq!(m.begin().0, Begin::Go { generation: 1 });
    m.handle(Event::Map(view(false, false, 2, false)));
    assert!(matches!(m.state(), LockState::Fenced { .. }));
    assert!(matches!(m.begin().0, Begin::Fail(e) if e.code == ErrorCode::Blocklisted));
    // And stays so, whatever the map says later.
    m.handle(Event::Map(view(false, true, 2, false)));
    assert!(matches!(m.begin().0, Begin::Fail(_)));
}

#[test]
fn a_release_refused_because_the_lock_was_taken_fences() {
    // Hung while another session asked: the queued map says "release", the release is
    // refused (the lock was broken meanwhile), and the next map shows it gone.
    let mut m = locked();
    assert!(m
        .handle(Event::Map(view(true, false, 1, true)))
        .contains(&Command::Release { generation: 1 }));
    m.handle(Event::Map(view(false, true, 2, false)));
    assert_eq!(m.begin().0, Begin::Wait, "no acquire before the answer");
    m.handle(Event::ReleaseRefused(StoreError::new(
        ErrorCode::LockLost,
        "taken",
    )));
    assert!(matches!(m.begin().0, Begin::Fail(e) if e.code == ErrorCode::Blocklisted));
    // A lost answer is retried, and a map in between does not fence: it may have applied.
    let mut m = locked();
    m.handle(Event::Map(view(true, false, 1, true)));
    assert_eq!(m.handle(Event::ReleaseFailed), vec![Command::RetryLater]);
    m.handle(Event::Map(view(false, false, 2, false)));
    assert_eq!(m.state(), &LockState::Releasing { generation: 1 });
    assert_eq!(
        m.handle(Event::Retry),
        vec![Command::Release { generation: 1 }]
    );
    m.handle(Event::ReleaseAnswered);
    assert_eq!(m.state(), &LockState::Unlocked);
}

#[test]
fn a_claim_refused_because_the_lock_was_taken_from_us_fences() {
    let mut m = LockMachine::new();
    m.begin();
    m.handle(Event::AcquireFailed(StoreError::new(
        ErrorCode::LockLost,
        "taken",
    )));
    assert!(matches!(m.begin().0, Begin::Fail(e) if e.code == ErrorCode::Blocklisted));
}

#[test]
fn failed_claims_are_retried() {
    let mut m = LockMachine::new();
    m.begin();
    let cmds = m.handle(Event::AcquireFailed(StoreError::new(
        ErrorCode::NoQuorum,
        "x",
    )));
    assert_eq!(cmds, vec![Command::RetryLater]);
    assert_eq!(m.handle(Event::Retry), vec![Command::Acquire]);
    assert_eq!(
        m.handle(Event::AcquireAnswered { granted: false }),
        vec![Command::RetryLater]
    );
}

/// The monitors' lock rules, as a model.
#[derive(Clone, Debug, Default)]
struct Model {
    holder: Option<usize>,
    generation: u64,
    requested_by: Option<usize>,
}

impl Model {
    fn view(&self, me: usize) -> LockView {
        view(
            self.holder == Some(me),
            self.holder.is_none(),
            self.generation,
            self.requested_by.is_some_and(|r| r != me),
        )
    }
    fn acquire(&mut self, me: usize) -> bool {
        match self.holder {
            Some(h) if h == me => true,
            Some(_) => {
                self.requested_by = Some(me);
                false
            }
            None => {
                self.holder = Some(me);
                self.generation += 1;
                self.requested_by = None;
                true
            }
        }
    }
    fn release(&mut self, me: usize, generation: u64) {
        if self.holder != Some(me) || self.generation != generation {
            return;
        }
        self.holder = self.requested_by.take().filter(|r| *r != me);
        if self.holder.is_some() {
            self.generation += 1;
        }
    }
}

/// Pending work in the simulated world.
#[derive(Clone, Debug)]
enum Pending {
    Acquire(usize),
    Release(usize, u64),
    Retry(usize),
    MapTo(usize),
    /// A write running under the given lock generation finishes.
    Finish(usize, u64),
}

fn run(seed: u64, writes_per_session: usize) {
    let mut model = Model::default();
    let mut ms = [LockMachine::new(), LockMachine::new()];
    let mut todo = [writes_per_session, writes_per_session];
    let mut pending: Vec<Pending> = Vec::new();
    let mut done = [0usize, 0usize];
    let exec = |who: usize, cmds: Vec<Command>, pending: &mut Vec<Pending>| {
        for c in cmds {
            match c {
                Command::Acquire => pending.push(Pending::Acquire(who)),
                Command::Release { generation } => pending.push(Pending::Release(who, generation)),
                Command::RetryLater => pending.push(Pending::Retry(who)),
                Command::Wake => {}
            }
        }
    };
    let mut step = 0usize;
    let mut rng = seed | 1;
    while done.iter().sum::<usize>() < 2 * writes_per_session {
        step += 1;
        assert!(step < 100_000, "no progress: {ms:?} {model:?} {pending:?}");
        // xorshift64: a random but reproducible schedule.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pick = (rng >> 8) as usize;
        // Writers try to start (one per session at a time, as a guest with QD1).
        let who = pick % 2;
        if todo[who] > 0 && pick % 4 < 2 {
            let (b, cmds) = ms[who].begin();
            exec(who, cmds, &mut pending);
            match b {
                Begin::Go { generation } => {
                    // The invariant: a write only runs under the generation the map grants
                    // to its session, so OSDs never refuse it.
                    assert_eq!(model.holder, Some(who), "write by non-holder {ms:?}");
                    assert_eq!(model.generation, generation);
                    todo[who] -= 1;
                    pending.push(Pending::Finish(who, generation));
                }
                Begin::Wait => {}
                Begin::Fail(e) => panic!("write failed: {e}"),
            }
            continue;
        }
        if pending.is_empty() {
            // Maps reach everybody eventually.
            pending.push(Pending::MapTo(who));
            continue;
        }
        let p = pending.remove(pick % pending.len());
        match p {
            Pending::Acquire(w) => {
                let granted = model.acquire(w);
                pending.push(Pending::MapTo(0));
                pending.push(Pending::MapTo(1));
                let cmds = ms[w].handle(Event::AcquireAnswered { granted });
                exec(w, cmds, &mut pending);
            }
            Pending::Release(w, g) => {
                // Only whoever holds no writes releases: check it.
                assert_eq!(ms[w].in_flight(), 0);
                model.release(w, g);
                pending.push(Pending::MapTo(0));
                pending.push(Pending::MapTo(1));
                let cmds = ms[w].handle(Event::ReleaseAnswered);
                exec(w, cmds, &mut pending);
            }
            Pending::Retry(w) => {
                let cmds = ms[w].handle(Event::Retry);
                exec(w, cmds, &mut pending);
            }
            Pending::MapTo(w) => {
                let cmds = ms[w].handle(Event::Map(model.view(w)));
                exec(w, cmds, &mut pending);
            }
            Pending::Finish(w, generation) => {
                // Still the holder at the same generation while the write runs.
                assert_eq!(model.holder, Some(w));
                assert_eq!(model.generation, generation, "the lock moved under a write");
                done[w] += 1;
                let cmds = ms[w].handle(Event::WriteDone);
                exec(w, cmds, &mut pending);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn two_writers_never_overlap_and_always_finish(seed in any::<u64>()) {
        run(seed, 6);
    }
}
