//! A bounded chaos run on 3 monitors and 4 OSDs: writers keep overwriting objects (and
//! checking what they read) while a driver SIGKILLs and restarts random OSDs, one at a
//! time (size − min_size = 1), adds an OSD half-way, and once SIGKILLs the monitor leader
//! (while an OSD is down: one monitor of 3 and one OSD of a PG's 3 are within what the
//! cluster tolerates), restarting it once another monitor leads. No write or read may fail
//! or take longer than a bound; afterwards the cluster must be HEALTH_OK within a bound,
//! and every object must hold its last acknowledged content on every OSD of its PG, read
//! directly from each.
//!
//! Every random choice (victims, down times, in which round the OSD is added and the leader
//! dies) comes from one seed, printed at the start; the environment can set it and the
//! run's length:
//!
//! - `CHAOS_SEED=0x...`: replay a run's choices, round by round (the timing of the
//!   processes still varies, and with it how many rounds fit in the run);
//! - `CHAOS_SECS=N`: run the faults for N seconds (default 30; nextest kills a test
//!   after 5 minutes, so longer runs call the test binary directly, as `benches/chaos-soak`);
//! - `CHAOS_OP_BOUND_SECS=N`: the longest a client write or read may take (default 45: an
//!   OSD answers every op within osd_op_timeout = 30 s).
//!
//! The last line is `FIGURE chaos: seed ..., ...` with what was injected and verified.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use store_integration::{check_replicas, wait_for, xorshift, ClusterOpts, TestCluster};

const OBJECTS: u64 = 120;
const WRITERS: u64 = 4;
const MONS: usize = 3;
const OSDS: usize = 4;
const POOL_SIZE: u64 = 3;
/// About how long a round takes beyond its OSD's down time (restart, PGs settling): the
/// planned clock's step.
const ROUND_SETTLE: Duration = Duration::from_secs(1);

/// Fixed length per object (an overwrite replaces it whole); content varies by round.
fn content(i: u64, round: u64) -> Bytes {
    let len = 700 + (i * 7919) % 12_000;
    Bytes::from(
        (0..len)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(29) ^ (round as u8).wrapping_mul(101))
            .collect::<Vec<u8>>(),
    )
}

/// `CHAOS_SEED` (hex with or without `0x`, or decimal), else a fresh one.
fn chaos_seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => {
            let t = s.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse::<u64>().or_else(|_| u64::from_str_radix(t, 16)),
            };
            let seed = parsed.unwrap_or_else(|e| panic!("CHAOS_SEED={s:?}: not a number ({e})"));
            assert_ne!(seed, 0, "CHAOS_SEED must not be 0");
            seed
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            // Spread, so that runs started close together do not get similar seeds.
            Rng::new(nanos ^ (u64::from(std::process::id()) << 32)).0
        }
    }
}

fn env_secs(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={s:?}: not a number of seconds ({e})")),
        Err(_) => default,
    }
}

/// The random stream of a run: splitmix64 spreads the seed (so that nearby seeds, such
/// as 1 and 2, give unrelated runs), then xorshift64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }
    fn below(&mut self, n: u64) -> u64 {
        xorshift(&mut self.0) % n
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// What the writers share with the driver.
struct Shared {
    stop: AtomicBool,
    /// The first writer failure (with the seed); the driver stops at it.
    failure: Mutex<Option<String>>,
    writes: AtomicU64,
    reads: AtomicU64,
    /// The slowest acknowledged client op, µs.
    slowest_us: AtomicU64,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            eprintln!("writer failure: {msg}");
            *f = Some(msg);
        }
        self.stop.store(true, Ordering::Relaxed);
    }
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Runs one client op under `bound`, and records its time if it succeeded.
async fn timed<T, E: std::fmt::Display>(
    shared: &Shared,
    bound: Duration,
    what: &str,
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    let t0 = Instant::now();
    match tokio::time::timeout(bound, op).await {
        Ok(Ok(v)) => {
            let us = t0.elapsed().as_micros() as u64;
            shared.slowest_us.fetch_max(us, Ordering::Relaxed);
            Ok(v)
        }
        Ok(Err(e)) => Err(format!("{what} failed after {:?}: {e}", t0.elapsed())),
        Err(_) => Err(format!("{what} took longer than the {bound:?} bound")),
    }
}

/// Writer `w` owns the objects i ≡ w (mod WRITERS), so per-object order is known. It
/// looks at `stop` before every op: an op in flight is awaited (its outcome decides what
/// the object holds), so a writer notices `stop` within one op, at most `bound`.
async fn writer(
    w: u64,
    client: Arc<store_client::ObjectClient>,
    pool: u32,
    model: Arc<Mutex<BTreeMap<String, Bytes>>>,
    shared: Arc<Shared>,
    bound: Duration,
    seed: u64,
) {
    let mut round = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        round += 1;
        for i in (w..OBJECTS).step_by(WRITERS as usize) {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let name = format!("obj-{i}");
            let data = content(i, round);
            let what = format!("write {name} round {round}");
            if let Err(e) = timed(
                &shared,
                bound,
                &what,
                client.write(pool, &name, 0, data.clone()),
            )
            .await
            {
                return shared.fail(format!("chaos seed {seed:#018x}: {e}"));
            }
            model
                .lock()
                .expect("model")
                .insert(name.clone(), data.clone());
            shared.writes.fetch_add(1, Ordering::Relaxed);
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            // Read-your-write through whatever primary serves it now.
            let what = format!("read {name} round {round}");
            match timed(
                &shared,
                bound,
                &what,
                client.read(pool, &name, 0, data.len() as u32),
            )
            .await
            {
                Err(e) => return shared.fail(format!("chaos seed {seed:#018x}: {e}")),
                Ok(got) if got != data => {
                    return shared.fail(format!(
                        "chaos seed {seed:#018x}: {name} round {round}: read differs from the \
                         acknowledged write ({} bytes read, {} written)",
                        got.len(),
                        data.len()
                    ))
                }
                Ok(_) => {
                    shared.reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Sleeps `d` in short steps; false if a writer failed meanwhile.
fn pause(shared: &Shared, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if shared.failure.lock().map(|f| f.is_some()).unwrap_or(true) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// The monitor leader, as the answering monitor sees it.
fn leader(c: &TestCluster) -> String {
    wait_for(Duration::from_secs(30), "a monitor leader", || {
        c.try_status()?["quorum_leader_name"]
            .as_str()
            .map(String::from)
    })
}

#[test]
fn osds_and_mon_leader_killed_and_osd_added_under_writes_lose_nothing() {
    let seed = chaos_seed();
    let run = Duration::from_secs(env_secs("CHAOS_SECS", 30));
    let bound = Duration::from_secs(env_secs("CHAOS_OP_BOUND_SECS", 45));
    let replay = format!(
        "replay: CHAOS_SEED={seed:#018x} cargo nextest run -p store-integration --test chaos"
    );
    eprintln!("chaos seed {seed:#018x} ({replay})");
    eprintln!("chaos run {run:?}, op bound {bound:?}");
    // Whatever fails (a wait below timing out, a replica differing), name the seed.
    let hook = std::panic::take_hook();
    let note = format!("chaos seed {seed:#018x} ({replay})");
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        eprintln!("{note}");
    }));
    let mut rng = Rng::new(seed);

    let mut c = TestCluster::start(ClusterOpts {
        mons: MONS,
        osds: OSDS,
        grace_secs: 2.0,
        op_timeout_secs: 30.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 32);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let model: Arc<Mutex<BTreeMap<String, Bytes>>> = Arc::default();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        writes: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        slowest_us: AtomicU64::new(0),
    });

    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            rt.spawn(writer(
                w,
                client.clone(),
                pool,
                model.clone(),
                shared.clone(),
                bound,
                seed,
            ))
        })
        .collect();

    // When the OSD is added and the leader dies is decided on a planned clock (each round
    // its OSD's down time plus ROUND_SETTLE), not the wall clock: a seed then gives the same
    // rounds whatever the timing; only how many rounds fit in the run varies.
    let leader_at = run.mul_f64(0.1 + 0.7 * rng.below(1000) as f64 / 1000.0);
    eprintln!(
        "the OSD is added in the first round planned after {:?}, the monitor leader dies in \
         the first planned after {leader_at:?}",
        run / 2
    );
    let mut planned = Duration::ZERO;
    let t0 = Instant::now();
    let (mut rounds, mut osd_kills, mut leader_kills) = (0u64, 0u64, 0u64);
    let mut added = false;
    // Kill → another monitor reported as leader (polled from the restart time on, so at
    // least that monitor's down time).
    let mut failover = Duration::ZERO;
    while shared.failure().is_none() && (t0.elapsed() < run || !added || leader_kills == 0) {
        rounds += 1;
        if !added && (planned >= run / 2 || t0.elapsed() >= run) {
            c.start_osd(OSDS);
            added = true;
            eprintln!(
                "added {} at {:?}",
                TestCluster::osd_name(OSDS),
                t0.elapsed()
            );
        }
        let n = if added { OSDS + 1 } else { OSDS };
        let victim = rng.below(n as u64) as usize;
        let osd_down = rng.millis(1000, 4000);
        let kill_leader = leader_kills == 0 && (planned >= leader_at || t0.elapsed() >= run);
        planned += osd_down + ROUND_SETTLE;
        // Drawn every round, so that the rounds' choices do not depend on each other.
        let (leader_delay, mon_down) = (rng.millis(0, 1000), rng.millis(1000, 4000));

        let osd_killed = Instant::now();
        c.kill(&TestCluster::osd_name(victim));
        osd_kills += 1;
        eprintln!(
            "round {rounds}: killed {} at {:?}, down {osd_down:?}",
            TestCluster::osd_name(victim),
            t0.elapsed()
        );
        let mut mon_killed = None;
        if kill_leader {
            if !pause(&shared, leader_delay) {
                break;
            }
            let name = leader(&c);
            c.kill(&format!("mon.{name}"));
            leader_kills += 1;
            eprintln!(
                "round {rounds}: killed the monitor leader mon.{name} at {:?}, down {mon_down:?}",
                t0.elapsed()
            );
            mon_killed = Some((name, Instant::now()));
        }
        // Restart each after its own down time, the earlier first.
        let osd_back = osd_killed + osd_down;
        let mut restarts: Vec<(Instant, Option<String>)> = vec![(osd_back, None)];
        if let Some((name, at)) = &mon_killed {
            restarts.push((*at + mon_down, Some(name.clone())));
        }
        restarts.sort_by_key(|(at, _)| *at);
        for (at, mon) in restarts {
            if !pause(&shared, at.saturating_duration_since(Instant::now())) {
                break;
            }
            match mon {
                None => c.start_osd(victim),
                Some(name) => {
                    // It stays down until the others have elected a new leader.
                    let (new, by) = wait_for(
                        Duration::from_secs(30),
                        &format!("a new monitor leader after mon.{name} was killed"),
                        || {
                            let s = c.try_status()?;
                            let l = s["quorum_leader_name"].as_str()?;
                            let by = s["answered_by"].as_str().unwrap_or("?").to_string();
                            (l != name).then(|| (l.to_string(), by))
                        },
                    );
                    let took = mon_killed
                        .as_ref()
                        .map_or(Duration::ZERO, |(_, at)| at.elapsed());
                    failover = failover.max(took);
                    eprintln!(
                        "round {rounds}: mon.{new} leads (status from mon.{by}) {took:.1?} after \
                         mon.{name} was killed; restarting mon.{name}"
                    );
                    c.start_mon(&name)
                }
            }
        }
        if shared.failure().is_some() {
            break;
        }
        // One OSD away at a time: wait until it is back and its PGs have settled (and,
        // after the leader kill, until every monitor is back in quorum).
        wait_for(
            Duration::from_secs(60),
            "the OSD back and PGs settled",
            || {
                let s = c.try_status()?;
                (s["osdmap"]["num_up_osds"].as_u64()? == n as u64).then_some(())
            },
        );
        if let Some((old, _)) = mon_killed {
            let now = wait_for(
                Duration::from_secs(60),
                "every monitor back in quorum",
                || {
                    let s = c.try_status()?;
                    let q = s["quorum_names"].as_array()?.len();
                    let l = s["quorum_leader_name"].as_str()?.to_string();
                    (q == MONS).then_some(l)
                },
            );
            eprintln!(
                "round {rounds}: mon.{old} back, all {MONS} monitors in quorum, leader \
                 mon.{now}, at {:?}",
                t0.elapsed()
            );
        }
        c.wait_pgs_settled();
    }
    shared.stop.store(true, Ordering::Relaxed);
    // A writer notices `stop` within one op (write or read), each under `bound`.
    let joined = rt.block_on(async {
        tokio::time::timeout(bound * 2 + Duration::from_secs(10), async {
            for t in tasks {
                t.await.expect("writer task");
            }
        })
        .await
    });
    if let Some(f) = shared.failure() {
        panic!("{f}\n({replay})");
    }
    assert!(
        joined.is_ok(),
        "chaos seed {seed:#018x}: the writers did not stop within {:?} ({replay})",
        bound * 2 + Duration::from_secs(10)
    );
    let t1 = Instant::now();
    wait_for(Duration::from_secs(60), "HEALTH_OK after the chaos", || {
        let s = c.try_status()?;
        (s["health"]["status"] == "HEALTH_OK").then_some(())
    });
    let health_ok = t1.elapsed();
    // The added OSD may still be filling (misplaced copies do not warn): wait for every
    // PG to be active+clean where CRUSH puts it, then compare.
    c.wait_clean(Duration::from_secs(60));
    let clean = t1.elapsed();
    let model = model.lock().expect("model").clone();
    assert_eq!(model.len() as u64, OBJECTS);
    check_replicas(&rt, &c.map(), "vm-pool", &model);
    c.check_logs();
    let writes = shared.writes.load(Ordering::Relaxed);
    eprintln!(
        "FIGURE chaos: seed {seed:#018x}, {rounds} rounds in {:.1?}, faults injected: \
         {osd_kills} OSD kills, {leader_kills} mon leader kills, {} OSD added; {writes} \
         acknowledged writes verified ({} read back during the run, the last of each of \
         {OBJECTS} objects on all {POOL_SIZE} replicas after it); slowest acknowledged op \
         {:.1} ms; new leader seen {failover:.1?} after the leader kill; HEALTH_OK \
         {health_ok:.1?}, all PGs active+clean {clean:.1?} after the last restart",
        t1.duration_since(t0),
        u64::from(added),
        shared.reads.load(Ordering::Relaxed),
        shared.slowest_us.load(Ordering::Relaxed) as f64 / 1000.0,
    );
}
