#!/usr/bin/python3
"""Failure and change figures on a fresh local cluster, run by benches/recovery.

One cluster of 1 monitor and 6 OSDs on 6 simulated hosts (release build, the default
settings: osd_heartbeat_grace 20 s, heartbeats every 2 s, osd_max_backfills 1,
osd_recovery_max_active 3), a size 3 / min_size 2 pool of 4 MiB objects. It measures:

  1. the object-level client IOPS (4 KiB random writes, QD32) with every OSD up;
  2. an OSD SIGKILLed: the time until it is marked down and until every PG is active
     again;
  3. data written while it is down, then the OSD restarted: the time until every PG is
     active+clean, and the recovery throughput (bytes the OSDs recovered / that time);
  4. the same again, with the client benchmark running right after the restart: its IOPS
     during recovery against (1);
  5. one OSD of 6 marked out: the bytes moved (what the OSDs recovered) against the
     optimal (the bytes that OSD held), and what the dry run predicted.

Prints every figure and writes them to --json.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time


def sh(args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


class Cluster:
    def __init__(self, bin_dir, dir):
        self.ctl = os.path.join(bin_dir, "storectl")
        self.dir = dir
        self.env = dict(os.environ, STORE_CONF=os.path.join(dir, "store.conf"))

    def run(self, *args):
        return subprocess.run([self.ctl, *args], check=True, capture_output=True,
                              text=True, env=self.env).stdout

    def json(self, *args):
        return json.loads(self.run(*args, "--format", "json"))

    def status(self):
        return self.json("status")

    def states(self, s=None):
        s = s or self.status()
        return {p["state_name"]: p["count"] for p in s["pgmap"]["pgs_by_state"]}

    def recovered_bytes(self):
        """Each up OSD's recovered-bytes counter (a down OSD's starts over when it returns)."""
        return {n["id"]: n["recovered_bytes"] for n in self.json("osd", "df")["nodes"]
                if n["status"] == "up"}

    def recovered_since(self, before):
        now = self.recovered_bytes()
        return sum(v - before.get(k, 0) if v >= before.get(k, 0) else v
                   for k, v in now.items())

    def pid(self, name):
        with open(os.path.join(self.dir, "run", name + ".pid")) as f:
            return int(f.read().strip())

    def kill(self, name):
        os.kill(self.pid(name), signal.SIGKILL)

    def wait(self, what, pred, timeout=600, every=0.2):
        t0 = time.time()
        while True:
            try:
                s = self.status()
                if pred(s):
                    return time.time() - t0, s
            except subprocess.CalledProcessError:
                pass
            if time.time() - t0 > timeout:
                sys.exit("timed out waiting for " + what)
            time.sleep(every)

    def bench(self, mode, bs, qd, seconds, objects):
        return self.json("bench", mode, "--pool", "vm-pool", "--block-size", bs, "--qd",
                         str(qd), "--seconds", str(seconds), "--objects", str(objects))


def all_active(c):
    return lambda s: all(k.startswith("active") for k in c.states(s))


def all_clean(c):
    return lambda s: set(c.states(s)) == {"active+clean"} and s["health"]["status"] == "HEALTH_OK"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--objects", type=int, default=384, help="4 MiB objects written")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    c = Cluster(a.bin, a.dir)
    out = {}

    c.run("pool", "create", "vm-pool", "--size", "3", "--min_size", "2", "--pg_num", "128")
    fill = c.bench("write", "4M", 16, 8, a.objects)
    print("fill: %.0f MB/s" % fill["mb_per_s"], flush=True)
    base = c.bench("randwrite", "4k", 32, 10, a.objects)
    out["client_iops_all_up"] = base["iops"]
    out["client_p99_us_all_up"] = base["latency_us"]["p99"]
    print("client 4k randwrite QD32, all OSDs up: %.0f IOPS, p99 %d us"
          % (base["iops"], base["latency_us"]["p99"]), flush=True)

    for phase in ("quiet", "loaded"):
        c.kill("osd-dev0")
        t_down, _ = c.wait("the OSD marked down", lambda s: s["osdmap"]["num_up_osds"] == 5)
        t_active, _ = c.wait("PGs active again", all_active(c))
        out["%s_kill_to_marked_down_s" % phase] = t_down
        out["%s_kill_to_all_active_s" % phase] = t_down + t_active
        print("[%s] OSD killed: marked down after %.1f s, every PG active %.2f s later"
              % (phase, t_down, t_active), flush=True)
        # Overwrite everything while it is down: about half the objects have a copy there.
        c.bench("write", "4M", 16, 8, a.objects)
        degraded = c.status()["pgmap"]["degraded_objects"]
        before = c.recovered_bytes()
        t0 = time.time()
        c.run("cluster", "up", "--dir", a.dir, "--mons", "1", "--osds", "6", "--gateways", "0")
        if phase == "loaded":
            rec = c.bench("randwrite", "4k", 32, 5, a.objects)
            out["client_iops_during_recovery"] = rec["iops"]
            out["client_iops_during_recovery_ratio"] = rec["iops"] / base["iops"]
            out["client_p99_us_during_recovery"] = rec["latency_us"]["p99"]
        _, s = c.wait("active+clean", all_clean(c))
        t_clean = time.time() - t0
        moved = c.recovered_since(before)
        out["%s_restart_to_clean_s" % phase] = t_clean
        out["%s_recovered_bytes" % phase] = moved
        out["%s_recovery_mb_s" % phase] = moved / t_clean / 1e6
        line = ("[%s] OSD restarted: HEALTH_OK and all PGs active+clean after %.2f s; "
                "%d object copies were degraded; %.0f MB recovered, %.0f MB/s"
                % (phase, t_clean, degraded, moved / 1e6, moved / t_clean / 1e6))
        if phase == "loaded":
            line += ("; client 4k randwrite QD32 in the first 5 s: %.0f IOPS (%.0f%% of "
                     "all-up), p99 %d us" % (rec["iops"], 100 * rec["iops"] / base["iops"],
                                              rec["latency_us"]["p99"]))
        print(line, flush=True)

    df = {n["id"]: n for n in c.json("osd", "df")["nodes"]}
    victim = 3
    held = df[victim]["kb_used"] * 1024
    dry = c.json("osd", "out", str(victim), "--dry-run")
    before = c.recovered_bytes()
    t0 = time.time()
    c.run("osd", "out", str(victim))
    c.wait("data moved off the out OSD", all_clean(c))
    while c.json("map").get("pg_temp"):
        time.sleep(0.2)
    t_moved = time.time() - t0
    moved = c.recovered_since(before)
    out.update({"out_osd_held_bytes": held, "out_bytes_moved": moved,
                "out_moved_ratio": moved / max(held, 1), "out_seconds": t_moved,
                "out_dry_run": dry})
    print("one OSD of 6 out: %.0f MB moved in %.1f s; it held %.0f MB (ratio %.3f); dry run "
          "predicted %d PG copies, ~%.0f MB" % (moved / 1e6, t_moved, held / 1e6,
                                                moved / max(held, 1), dry["replicas_moved"],
                                                dry["bytes_moved_estimate"] / 1e6), flush=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
