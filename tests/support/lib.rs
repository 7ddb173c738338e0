//! Test support: start real `stored` processes on 127.0.0.1 with free ports in a temp dir,
//! drive them with the real `storectl`, and clean every process up by pid.
//!
//! Daemon logs are checked at the end of each test: an ERROR line that the test did not
//! declare as expected fails it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Directory holding the built `stored` and `storectl` (target/debug next to the test binary).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STORE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/test-xxxx -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        dir.join("stored").exists(),
        "{}/stored is missing: run `cargo build --workspace --bins` first (tools/test does)",
        dir.display()
    );
    dir.to_path_buf()
}

/// A free port on 127.0.0.1, never one this process was given before: a port released at
/// once can come back from the next bind, and two daemons of one test must not share it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port on 127.0.0.1");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub mons: usize,
    pub osds: usize,
    /// osd_heartbeat_grace, seconds.
    pub grace_secs: f64,
    pub heartbeat_secs: f64,
    pub down_out_secs: f64,
    /// osd_op_timeout: how long I/O waits for an inactive PG.
    pub op_timeout_secs: f64,
    /// Size of each OSD's file-backed device.
    pub device_size: &'static str,
    /// More `[osd]` settings, one `key = value` per line.
    pub osd_conf: &'static str,
    /// More `[mon]` settings, one `key = value` per line.
    pub mon_conf: &'static str,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            mons: 3,
            osds: 3,
            grace_secs: 3.0,
            heartbeat_secs: 0.5,
            down_out_secs: 600.0,
            op_timeout_secs: 30.0,
            device_size: "256M",
            osd_conf: "",
            mon_conf: "",
        }
    }
}

/// Clients built in the test process (the real client library).
impl TestCluster {
    pub fn mon_addrs(&self) -> Vec<String> {
        self.mons.iter().map(|m| m.addr.clone()).collect()
    }

    /// Creates a replicated pool with size 3 / min_size 2.
    pub fn create_pool(&self, name: &str, pg_num: u32) {
        let pg = pg_num.to_string();
        self.ctl_ok(&[
            "pool",
            "create",
            name,
            "--size",
            "3",
            "--min_size",
            "2",
            "--pg_num",
            &pg,
        ]);
        self.wait_pgs_settled();
    }

    /// Waits until every PG's primary has reported on the current map (no PG `unknown`
    /// or `peering`).
    pub fn wait_pgs_settled(&self) {
        wait_for(Duration::from_secs(30), "PGs to settle", || {
            let s = self.try_status()?;
            let states = s["pgmap"]["pgs_by_state"].as_array()?.clone();
            states
                .iter()
                .all(|p| {
                    let name = p["state_name"].as_str().unwrap_or("");
                    name != "unknown" && name != "peering" && !name.starts_with("recovering")
                })
                .then_some(())
        });
    }

    /// Waits until every PG is active+clean and served where CRUSH puts it (no pg_temp).
    pub fn wait_clean(&self, timeout: Duration) {
        wait_for(timeout, "every PG active+clean, no pg_temp", || {
            let s = self.try_status()?;
            let clean = s["pgmap"]["pgs_by_state"]
                .as_array()?
                .iter()
                .all(|p| p["state_name"] == "active+clean");
            (clean && self.map().pg_temp.is_empty()).then_some(())
        });
    }

    /// An object client on this cluster, with a 60 s operation deadline.
    pub fn object_client(
        &self,
        rt: &tokio::runtime::Runtime,
    ) -> std::sync::Arc<store_client::ObjectClient> {
        let mons = store_client::MonClient::new(
            self.mon_addrs(),
            store_client::MonClientOptions::default(),
        );
        rt.block_on(store_client::ObjectClient::connect(
            mons,
            Duration::from_secs(60),
        ))
        .expect("object client")
    }
}

pub struct Mon {
    pub name: String,
    pub addr: String,
}

/// A cluster of real processes. Dropping it SIGKILLs every process it started.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub mons: Vec<Mon>,
    children: BTreeMap<String, Child>,
    device_size: &'static str,
    /// ERROR log lines containing one of these are expected by the test.
    allowed_errors: Vec<String>,
    checked: bool,
}

impl TestCluster {
    /// Writes store.conf and starts every monitor and OSD, then waits for all OSDs up.
    pub fn start(opts: ClusterOpts) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("store-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("log")).expect("log dir");
        let mons: Vec<Mon> = (0..opts.mons)
            .map(|i| Mon {
                name: ((b'a' + i as u8) as char).to_string(),
                addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let conf = format!(
            "[global]\nfsid = {}\nmon_initial_members = {}\nmon_host = {}\n\n[mon]\nmon_data = $cluster_dir/mon.$id\nosd_heartbeat_grace = {}\nmon_osd_down_out_interval = {}\nclient_session_grace = 3\n{}\n\n[osd]\nosd_heartbeat_interval = {}\nosd_op_timeout = {}\n{}\n",
            fake_uuid(),
            mons.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
            mons.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>().join(", "),
            opts.grace_secs,
            opts.down_out_secs,
            opts.mon_conf,
            opts.heartbeat_secs,
            opts.op_timeout_secs,
            opts.osd_conf,
        );
        std::fs::write(dir.path().join("store.conf"), conf).expect("write conf");
        let mut c = TestCluster {
            dir,
            mons,
            children: BTreeMap::new(),
            device_size: opts.device_size,
            // openraft logs a replication RPC that missed its (heartbeat-sized) deadline at
            // ERROR; on a loaded 2-core machine that happens without any fault. Raft retries.
            allowed_errors: vec!["ERROR openraft::replication: RPCError err=timeout after".into()],
            checked: false,
        };
        for i in 0..c.mons.len() {
            let name = c.mons[i].name.clone();
            c.start_mon(&name);
        }
        for i in 0..opts.osds {
            c.start_osd(i);
        }
        c.wait_osds_up(opts.osds, Duration::from_secs(60));
        c
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("store.conf")
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("log").join(format!("{name}.log"))
    }

    /// Starts a daemon with `stored --conf CONF ARGS...`, logging to log/NAME.log.
    pub fn spawn(&mut self, name: &str, args: &[String]) {
        self.spawn_env(name, args, &[]);
    }

    /// [`Self::spawn`] with extra environment variables (e.g. a failpoint).
    pub fn spawn_env(&mut self, name: &str, args: &[String], env: &[(&str, &str)]) {
        self.spawn_in(None, name, args, env);
    }

    /// [`Self::spawn_env`], in network namespace `netns` when given (`ip netns exec` execs
    /// the daemon, so the pid is the daemon's).
    pub fn spawn_in(
        &mut self,
        netns: Option<&str>,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("open log");
        let stored = bin_dir().join("stored");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(stored);
                c
            }
            None => Command::new(stored),
        };
        let child = cmd
            .arg("--conf")
            .arg(self.conf())
            .args(args)
            .env("STORE_LOG", "info,openraft=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn stored");
        if let Some(mut old) = self.children.insert(name.to_string(), child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    pub fn start_mon(&mut self, name: &str) {
        self.spawn(
            &format!("mon.{name}"),
            &["mon".into(), "--id".into(), name.into()],
        );
    }

    pub fn osd_name(i: usize) -> String {
        format!("osd-dev{i}")
    }

    pub fn start_osd(&mut self, i: usize) {
        self.start_osd_env(i, &[]);
    }

    /// Starts OSD `i` with extra environment variables.
    pub fn start_osd_env(&mut self, i: usize, env: &[(&str, &str)]) {
        let args = self.osd_args(i);
        self.spawn_env(&Self::osd_name(i), &args, env);
    }

    /// Starts OSD `i` in network namespace `netns`, serving on `addr`.
    pub fn start_osd_netns(&mut self, i: usize, netns: &str, addr: &str) {
        let mut args = self.osd_args(i);
        args.extend(["--addr".into(), addr.into()]);
        self.spawn_in(Some(netns), &Self::osd_name(i), &args, &[]);
    }

    fn osd_args(&self, i: usize) -> Vec<String> {
        let data = self.dir.path().join(Self::osd_name(i));
        vec![
            "osd".into(),
            "--data".into(),
            data.display().to_string(),
            "--host".into(),
            format!("node{}", i + 1),
            "--size".into(),
            self.device_size.into(),
        ]
    }

    /// Waits up to 10 s for daemon `name` to log a line containing `pattern`. A
    /// daemon logs an action after its effect can be seen (an object removed, a
    /// reply sent), so a test that saw the effect must not expect the line at that
    /// same instant.
    pub fn wait_log(&self, name: &str, pattern: &str) {
        let path = self.log_path(name);
        wait_for(
            Duration::from_secs(10),
            &format!("{name} to log {pattern:?}"),
            || {
                let log = std::fs::read_to_string(&path).ok()?;
                log.contains(pattern).then_some(())
            },
        )
    }

    /// The OSD id that daemon `osd-devN` booted as (from its log). The monitor
    /// marks an OSD up before the daemon logs its boot, so a status that counts
    /// it does not mean the line is written yet: wait for it up to 30 s.
    pub fn osd_id(&self, i: usize) -> u32 {
        wait_for(
            Duration::from_secs(30),
            &format!("{} to log its OSD id", Self::osd_name(i)),
            || self.logged_osd_id(i),
        )
    }

    fn logged_osd_id(&self, i: usize) -> Option<u32> {
        let log = std::fs::read_to_string(self.log_path(&Self::osd_name(i))).ok()?;
        let line = log.lines().rev().find(|l| l.contains("osd booted"))?;
        line.split("osd=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Waits up to `timeout` for a daemon to exit by itself; returns how it ended (None
    /// if it still runs). An exited daemon is forgotten (not killed at the end).
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            let child = self.children.get_mut(name)?;
            if let Ok(Some(status)) = child.try_wait() {
                self.children.remove(name);
                return Some(status);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a daemon's log holds a line containing `pattern` now.
    pub fn log_has(&self, name: &str, pattern: &str) -> bool {
        std::fs::read_to_string(self.log_path(name))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(pattern))
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).map(|c| c.id())
    }

    /// SIGKILLs a daemon by name and reaps it.
    pub fn kill(&mut self, name: &str) {
        let mut child = self
            .children
            .remove(name)
            .unwrap_or_else(|| panic!("no running daemon {name}"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        if name.starts_with("mon.") {
            // openraft logs unreachable peers at ERROR; a killed monitor is one by design.
            self.allow_error("Unreachable node");
        }
    }

    /// Starts an NBD gateway on a free port; returns its address.
    pub fn start_gateway(&mut self, name: &str) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        self.start_gateway_at(name, &addr);
        addr
    }

    /// Starts (or restarts) an NBD gateway on `addr` and waits until it accepts.
    pub fn start_gateway_at(&mut self, name: &str, addr: &str) {
        self.spawn(name, &["nbd".into(), "--listen".into(), addr.to_string()]);
        wait_for(Duration::from_secs(30), "the gateway to listen", || {
            std::net::TcpStream::connect(addr).ok().map(|_| ())
        });
    }

    /// The cluster map, as `storectl map` prints it.
    pub fn map(&self) -> store_types::map::ClusterMap {
        serde_json::from_value(self.ctl_json(&["map"])).expect("map json")
    }

    /// Runs storectl with this cluster's conf.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("storectl"))
            .arg("--conf")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run storectl")
    }

    /// Runs storectl and requires success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "storectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// storectl ... --format json, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let s = self.ctl_ok(&a);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("storectl {args:?}: bad JSON ({e}): {s}"))
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self.ctl(&["status", "--format", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.ctl_json(&["status"])
    }

    pub fn wait_osds_up(&self, n: usize, timeout: Duration) {
        wait_for(timeout, &format!("{n} OSDs up"), || {
            let s = self.try_status()?;
            (s["osdmap"]["num_up_osds"].as_u64()? as usize >= n).then_some(())
        });
    }

    /// Declares ERROR log lines containing `pattern` as expected.
    pub fn allow_error(&mut self, pattern: &str) {
        self.allowed_errors.push(pattern.to_string());
    }

    /// Unexpected ERROR lines across all daemon logs.
    pub fn unexpected_errors(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) else {
            return bad;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines() {
                let is_error = line.contains(" ERROR ") || line.contains("panicked at");
                if is_error && !self.allowed_errors.iter().any(|p| line.contains(p)) {
                    bad.push(format!("{}: {line}", e.file_name().to_string_lossy()));
                }
            }
        }
        bad
    }

    /// Asserts no unexpected ERROR lines; call at the end of a test.
    pub fn check_logs(&mut self) {
        self.checked = true;
        let bad = self.unexpected_errors();
        assert!(
            bad.is_empty(),
            "unexpected ERROR lines in daemon logs:\n{}",
            bad.join("\n")
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.checked && !std::thread::panicking() {
            let bad = self.unexpected_errors();
            if !bad.is_empty() {
                panic!("unexpected ERROR lines in daemon logs:\n{}", bad.join("\n"));
            }
        }
        if std::thread::panicking() {
            // Keep the evidence: print the tail of each log.
            if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
                for e in entries.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!("--- {} (last lines) ---", e.file_name().to_string_lossy());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// A random-enough cluster id without pulling a UUID crate into the test support.
fn fake_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Sends SIGKILL to a pid (for processes not started through [`TestCluster`]).
/// Checks every object of `pool` against `model` on every acting OSD of its PG, reading
/// each OSD's own copy directly (`Fetch`): replicas must all hold exactly what was
/// acknowledged.
pub fn check_replicas(
    rt: &tokio::runtime::Runtime,
    map: &store_types::map::ClusterMap,
    pool: &str,
    model: &BTreeMap<String, bytes::Bytes>,
) {
    use store_types::osdmsg::{OsdRequest, OsdResponse, Pg};
    let pool = map.pool_by_name(pool).expect("pool");
    rt.block_on(async {
        let conns = osd_conns(map).await;
        for (name, want) in model {
            let pgid = store_placement::object_to_pg(pool, name);
            let m = store_placement::map_pg(map, pool, pgid);
            assert_eq!(
                m.up.len(),
                pool.size as usize,
                "{name}: PG {pgid} is degraded"
            );
            // A remapped PG's acting set holds the OSDs it moves to (`up`) too.
            for osd in &m.acting {
                let req = OsdRequest::Fetch {
                    pg: Pg {
                        pool: pgid.pool,
                        seed: pgid.seed,
                    },
                    object: name.clone(),
                    offset: 0,
                    len: 1 << 20,
                };
                match conns[osd]
                    .call::<_, OsdResponse>(&req, Duration::from_secs(10))
                    .await
                    .expect("fetch")
                {
                    OsdResponse::Fetched { data, .. } => {
                        assert!(
                            data == want,
                            "{name} on osd.{osd} differs from what was acknowledged"
                        )
                    }
                    other => panic!("{name} on osd.{osd}: {other:?}"),
                }
            }
        }
    });
}

/// A connection to every up OSD of the map.
async fn osd_conns(map: &store_types::map::ClusterMap) -> BTreeMap<u32, store_client::RpcConn> {
    let mut conns = BTreeMap::new();
    for o in map.osds.values().filter(|o| o.up) {
        let (conn, _) = store_client::RpcConn::connect(
            &o.addr,
            Duration::from_secs(5),
            store_types::osdmsg::OSD_MAX_FRAME_BYTES,
        )
        .await
        .expect("connect to osd");
        conns.insert(o.id, conn);
    }
    conns
}

/// How many objects of `names` are still stored on up OSDs that neither serve their PG
/// nor are named by CRUSH for it (stray copies), read directly from each OSD.
pub fn stray_copies(
    rt: &tokio::runtime::Runtime,
    map: &store_types::map::ClusterMap,
    pool: &str,
    names: impl IntoIterator<Item = String>,
) -> usize {
    use store_types::osdmsg::{OsdRequest, OsdResponse, Pg};
    let pool = map.pool_by_name(pool).expect("pool");
    rt.block_on(async {
        let conns = osd_conns(map).await;
        let mut strays = 0;
        for name in names {
            let pgid = store_placement::object_to_pg(pool, &name);
            let m = store_placement::map_pg(map, pool, pgid);
            for (osd, conn) in &conns {
                if m.acting.contains(osd) || m.up.contains(osd) {
                    continue;
                }
                let req = OsdRequest::Fetch {
                    pg: Pg {
                        pool: pgid.pool,
                        seed: pgid.seed,
                    },
                    object: name.clone(),
                    offset: 0,
                    len: 1,
                };
                let resp = conn
                    .call::<_, OsdResponse>(&req, Duration::from_secs(10))
                    .await;
                if matches!(resp, Ok(OsdResponse::Fetched { .. })) {
                    strays += 1;
                }
            }
        }
        strays
    })
}

/// xorshift64: reproducible pseudo-random choices for tests (state must not be 0).
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs an outside program (an NBD client); (success, stdout+stderr).
pub fn run_tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (tools/test installs it): {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Runs an outside program that must succeed; its output.
pub fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let (success, out) = run_tool(cmd, args);
    assert!(success, "{cmd} {args:?} failed:\n{out}");
    out
}

pub fn kill_pid(pid: i32) {
    // SAFETY: kill(2) with a pid the test itself started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Sends `bytes` to a server and requires it to close the connection (EOF or reset), not
/// answer and not hang.
pub fn expect_closed(addr: &str, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the server must close the connection on garbage, got {other:?}"),
    }
}
