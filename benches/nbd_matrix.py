#!/usr/bin/python3
"""The NBD benchmark matrix, run by benches/nbd-matrix (which builds and starts the cluster).

Runs the same fio jobs against three targets on the same disk, in one run:
  store     our NBD gateway (fio's nbd engine), image in a size 3 / min_size 2 pool;
  qemu-nbd  qemu-nbd serving a raw file with --cache=none --aio=io_uring (the
            unreplicated NBD ceiling);
  file      fio io_uring O_DIRECT on a plain file (the device ceiling);
plus the disk's fsync latency (4 KiB write + fdatasync, QD1), its bandwidth for durable
1 MiB writes in three streams (the most a three-copy store can write here) and the machine's wake-up
round trip (two processes passing a byte over pipes, on two CPUs and on one): on a VM the
latter varies several-fold between machines of one kind, and every hop of a write between
our daemons pays it. Each job runs REPEAT times; before each read job every target is read
once in full (see warm_up).
Prints a table (IOPS, MB/s, mean and p99 latency, store/qemu-nbd ratio, daemon CPU per I/O,
in all and per daemon) and writes the same as JSON.

Usage: nbd_matrix.py --store-uri URI --qemu-uri URI --file PATH --pids NAME=PID,...
                     --size BYTES --runtime S --repeat N --json OUT
"""
import argparse
import json
import os
import subprocess
import sys
import time

JOBS = [
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("1M write QD8", "write", "1M", 8),
    ("1M read QD8", "read", "1M", 8),
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CPUS = os.sched_getaffinity(0)


def cpu_seconds(pids):
    """utime+stime of each daemon, by name. A daemon that is gone ends the run: its CPU,
    and the job's figures, would be wrong."""
    out = {}
    for name, pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError as e:
            raise SystemExit("daemon %s (pid %d) is gone: %s" % (name, pid, e))
        out[name] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return out


def parse_pids(text):
    """`name=pid` or bare `pid` entries, comma-separated."""
    pids = []
    for item in filter(None, text.split(",")):
        name, _, pid = item.rpartition("=")
        if not pid.isdigit():
            raise SystemExit("--pids: %r is not NAME=PID or PID" % item)
        pids.append((name or pid, int(pid)))
    return pids


def fio(target, args, name, rw, bs, depth, size, runtime):
    cmd = ["fio", "--name=" + name.replace(" ", "_"), "--rw=" + rw, "--bs=" + bs,
           "--iodepth=%d" % depth, "--size=%d" % size, "--output-format=json",
           "--randrepeat=0", "--norandommap"]
    if runtime:
        cmd += ["--time_based", "--runtime=%d" % runtime, "--ramp_time=1"]
    if target == "file":
        cmd += ["--ioengine=io_uring", "--direct=1", "--filename=" + args.file]
    else:
        uri = args.store_uri if target == "store" else args.qemu_uri
        cmd += ["--ioengine=nbd", "--uri=" + uri]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "mean_us": side["lat_ns"]["mean"] / 1e3,
        "p99_us": pct.get("99.000000", 0) / 1e3,
        "ios": side["total_ios"],
    }


def warm_up(target, args):
    """Reads the whole target once, sequentially, just before its read jobs. On a VM the
    host caches the virtual disk, and the targets' data ages differently there: the store
    keeps three copies and is prefilled first, so its data was evicted first and its reads
    were measured against the physical disk while the baselines' came from the host's
    cache (4 KiB reads at QD32: 8.7k IOPS with the baselines prefilled after the store,
    18.2k without them, fifth session of 2026-12-02). Each target is read as warm as the
    host's cache allows, whichever was written last."""
    t0 = time.monotonic()
    r = fio(target, args, "warm-up", "read", "1M", 8, args.size, 0)
    print("  %-18s %-8s %.0f MB/s (%.0f s)" % ("read warm-up", target, r["mb_s"],
                                               time.monotonic() - t0), flush=True)


def fsync_latency(path, runtime):
    cmd = ["fio", "--name=fsync", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
           "--fdatasync=1", "--size=256M", "--filename=" + path + ".fsync",
           "--time_based", "--runtime=%d" % runtime, "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    os.unlink(path + ".fsync")
    write_us = job["write"]["lat_ns"]["mean"] / 1e3
    sync_us = job["sync"]["lat_ns"]["mean"] / 1e3
    # One operation is the write and its fdatasync: the fsync latency is their sum (the
    # write alone only copies into the page cache).
    return {"iops": job["write"]["iops"], "mean_us": write_us + sync_us,
            "write_mean_us": write_us, "sync_mean_us": sync_us}


def durable_write_ceiling(path, runtime):
    """The disk's bandwidth for 1 MiB writes each made durable (fdatasync after every write,
    QD8), in three streams at once as three OSDs write: what a three-copy store that flushes
    before it acknowledges can write at most, per copy. The baselines never flush (fio does
    not ask them to), so where the host caches the disk's writes their 1 MiB writes can run
    several times faster than any durable store on the same disk."""
    directory = os.path.dirname(os.path.abspath(path))
    cmd = ["fio", "--name=durable-ceiling", "--directory=" + directory, "--numjobs=3",
           "--rw=randwrite", "--bs=1M", "--iodepth=8", "--ioengine=io_uring", "--direct=1",
           "--fdatasync=1", "--size=1G", "--time_based", "--runtime=%d" % runtime,
           "--group_reporting", "--output-format=json"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        for i in range(3):
            try:
                os.unlink(os.path.join(directory, "durable-ceiling.%d.0" % i))
            except FileNotFoundError:
                pass
    job = json.loads(out[out.index("{"):])["jobs"][0]
    total = job["write"]["bw_bytes"] / 1e6
    return {"total_mb_s": total, "per_stream_mb_s": total / 3,
            "sync_mean_us": job["sync"]["lat_ns"]["mean"] / 1e3}


def wake_round_trip_us(cpus, rounds=20000):
    """Mean round trip, in µs, of one byte passed back and forth between two processes over
    pipes, the parent pinned to cpus[0] and the child to cpus[-1] (the same CPU if one)."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpus[-1]})
            for _ in range(rounds):
                os.read(a_r, 1)
                os.write(b_w, b"x")
        finally:
            os._exit(0)
    os.sched_setaffinity(0, {cpus[0]})
    t0 = time.perf_counter()
    for _ in range(rounds):
        os.write(a_w, b"x")
        os.read(b_r, 1)
    elapsed = time.perf_counter() - t0
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, ALL_CPUS)
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)
    return elapsed * 1e6 / rounds


def read_setting(path):
    """A one-line kernel setting, or None where this kernel has no such file."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_figures():
    """What this machine's wake-ups cost: the round trip across two CPUs and on one, and the
    idle settings that decide it on a VM. A guest whose cpuidle driver is haltpoll with
    guest_halt_poll_ns 0 halts (a trap to the hypervisor) as soon as a CPU is idle, so every
    wake-up of an idle CPU is an interrupt through the host; see docs/performance.md."""
    cpus = sorted(ALL_CPUS)
    out = {"cpus": len(cpus), "wake_rtt_one_cpu_us": wake_round_trip_us(cpus[:1])}
    if len(cpus) > 1:
        out["wake_rtt_cross_cpu_us"] = wake_round_trip_us(cpus[:2])
    out["cpuidle_driver"] = read_setting("/sys/devices/system/cpu/cpuidle/current_driver")
    poll_ns = read_setting("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    out["guest_halt_poll_ns"] = int(poll_ns) if poll_ns and poll_ns.isdigit() else None
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store-uri", required=True)
    p.add_argument("--qemu-uri", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--pids", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", required=True)
    p.add_argument("--jobs", default="", help="only jobs whose name contains one of these (comma-separated)")
    p.add_argument("--targets", default="store,qemu-nbd,file")
    args = p.parse_args()
    jobs = [j for j in JOBS if any(s in j[0] for s in args.jobs.split(","))]
    targets = [t for t in args.targets.split(",") if t]
    pids = parse_pids(args.pids)
    for _, pid in pids:
        if not os.path.exists("/proc/%d/stat" % pid):
            raise SystemExit("daemon pid %d is not running: cannot measure its CPU" % pid)
    print("daemons measured: %d processes" % len(pids))

    print("prefilling the three targets (%d MiB each)..." % (args.size >> 20), flush=True)
    for target in targets:
        t0 = time.monotonic()
        r = fio(target, args, "prefill", "write", "1M", 8, args.size, 0)
        print("  %-8s %.0f MB/s (%.0f s)" % (target, r["mb_s"], time.monotonic() - t0), flush=True)

    fsync = fsync_latency(args.file, args.runtime)
    print("disk fsync latency (4 KiB write + fdatasync, QD1): %.0f us (write %.0f + fdatasync %.0f)"
          % (fsync["mean_us"], fsync["write_mean_us"], fsync["sync_mean_us"]), flush=True)

    durable = durable_write_ceiling(args.file, args.runtime)
    print("disk durable 1 MiB writes (fdatasync each, QD8, three streams): %.0f MB/s, %.0f MB/s"
          " per stream, fdatasync %.1f ms" % (durable["total_mb_s"], durable["per_stream_mb_s"],
                                              durable["sync_mean_us"] / 1e3), flush=True)

    machine = machine_figures()
    print("wake-up round trip (pipes, two processes): %s us across two CPUs, %.1f us on one"
          % ("%.1f" % machine["wake_rtt_cross_cpu_us"] if "wake_rtt_cross_cpu_us" in machine
             else "-", machine["wake_rtt_one_cpu_us"]), flush=True)
    print("cpuidle driver: %s; guest halt polling: %s"
          % (machine["cpuidle_driver"] or "-",
             "-" if machine["guest_halt_poll_ns"] is None
             else "off" if machine["guest_halt_poll_ns"] == 0
             else "up to %d ns" % machine["guest_halt_poll_ns"]), flush=True)

    results = []
    for name, rw, bs, depth in jobs:
        for target in targets:
            if "read" in rw:
                warm_up(target, args)
            for run in range(args.repeat):
                cpu0 = cpu_seconds(pids) if target == "store" else {}
                r = fio(target, args, name, rw, bs, depth, args.size, args.runtime)
                split = ""
                if target == "store":
                    cpu1 = cpu_seconds(pids)
                    ios = max(r["ios"], 1)
                    by = {n: (cpu1[n] - cpu0[n]) * 1e6 / ios for n in cpu1}
                    r["cpu_us_per_io"] = sum(by.values())
                    r["cpu_us_per_io_by_daemon"] = by
                    split = " (%s)" % " ".join("%s %.0f" % (n, by[n]) for n in sorted(by))
                r.update({"job": name, "target": target, "run": run + 1})
                results.append(r)
                print("  %-18s %-8s run %d: %8.0f IOPS %8.1f MB/s mean %8.0f us p99 %8.0f us%s%s" % (
                    name, target, run + 1, r["iops"], r["mb_s"], r["mean_us"], r["p99_us"],
                    "  cpu %.0f us/io" % r["cpu_us_per_io"] if "cpu_us_per_io" in r else "", split),
                    flush=True)

    print()
    print("%-18s %-5s %10s %10s %10s %10s %9s %9s" % (
        "job", "run", "store IOPS", "qemu-nbd", "file", "store/qn", "mean us", "p99 us"))
    def iops(r):
        return "%10.0f" % r["iops"] if r else "%10s" % "-"

    for name, _, _, _ in jobs:
        for run in range(1, args.repeat + 1):
            by = {r["target"]: r for r in results if r["job"] == name and r["run"] == run}
            s, q, f = by.get("store"), by.get("qemu-nbd"), by.get("file")
            ratio = "%9.2fx" % (s["iops"] / q["iops"]) if s and q and q["iops"] else "%10s" % "-"
            ours = ("%9.0f %9.0f   cpu %4.0f us/io" % (s["mean_us"], s["p99_us"], s["cpu_us_per_io"])
                    if s else "")
            print("%-18s %-5d %s %s %s %s %s" % (name, run, iops(s), iops(q), iops(f), ratio, ours))
    with open(args.json, "w") as out:
        json.dump({"fsync": fsync, "durable_1m_write": durable, "machine": machine,
                   "results": results, "runtime_s": args.runtime, "size_bytes": args.size},
                  out, indent=1)
    print("\nJSON: " + args.json)


if __name__ == "__main__":
    sys.exit(main())
