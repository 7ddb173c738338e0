#!/usr/bin/python3
"""NBD clients for the image lock tests (libnbd; Debian's python3-libnbd).

Modes:
  handover URI_A URI_B N   a record log written through A, taken over mid-stream by B
                           (A's writes still in flight), then A writes again; every
                           record is checked through a third connection. Prints JSON.
  pingpong URI_A URI_B R   R rounds: one gateway writes 8 extents concurrently and
                           flushes, the other reads them back concurrently; roles swap
                           every round, so the lock moves every round. Prints JSON.
  fenced URI               writes, prints "wrote", waits for a line on stdin, writes again
                           and prints "refused: ..." or "accepted".
"""
import json
import random
import sys
import time

import nbd

REC = 4096


def record(seq, writer):
    head = b"REC%08d%s" % (seq, writer)
    body = bytes([(seq * 7 + i) & 0xFF for i in range(REC - len(head))])
    return head + body


def check_record(data, seq):
    want_head = b"REC%08d" % seq
    if data[: len(want_head)] != want_head:
        raise SystemExit("record %d is %r, not a record %d" % (seq, data[:16], seq))
    writer = data[len(want_head) : len(want_head) + 1]
    if data != record(seq, writer):
        raise SystemExit("record %d is torn" % seq)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def wait_all(h, cookies):
    pending = set(cookies)
    while pending:
        h.poll(-1)
        for c in list(pending):
            if h.aio_command_completed(c):
                pending.discard(c)


def handover(ua, ub, n):
    a = connect(ua)
    b = connect(ub)  # the destination connects early and reads
    half = n // 2
    for s in range(half - 8):
        a.pwrite(record(s, b"A"), s * REC)
    for s in range(half - 8):
        check_record(b.pread(REC, s * REC), s)
    # The last records of the source are still in flight when the destination writes.
    cookies = [a.aio_pwrite(record(s, b"A"), s * REC) for s in range(half - 8, half)]
    t0 = time.monotonic()
    b.pwrite(record(half, b"B"), half * REC, nbd.CMD_FLAG_FUA)
    handover_ms = (time.monotonic() - t0) * 1000
    wait_all(a, cookies)
    for s in range(half + 1, n):
        b.pwrite(record(s, b"B"), s * REC)
    b.flush()
    # The old holder writes again: it asks for the lock back.
    t0 = time.monotonic()
    a.pwrite(record(n, b"A"), n * REC, nbd.CMD_FLAG_FUA)
    back_ms = (time.monotonic() - t0) * 1000
    c = connect(ub)
    for s in range(n + 1):
        check_record(c.pread(REC, s * REC), s)
    for h in (a, b, c):
        h.shutdown()
    print(json.dumps({"records": n + 1, "handover_ms": round(handover_ms, 1),
                      "ask_back_ms": round(back_ms, 1)}))


def pingpong(ua, ub, rounds):
    a = connect(ua)
    b = connect(ub)
    size = a.get_size()
    rng = random.Random(7)
    moves = []
    for r in range(rounds):
        w, rd = (a, b) if r % 2 == 0 else (b, a)
        # Concurrent writes to overlapping ranges may land in any order (NBD promises no
        # order between in-flight requests): keep a round's extents apart.
        slots = rng.sample(range(0, size // 65536 - 1, 2), 8)
        extents = [slot * 65536 + rng.randrange(0, 4096) for slot in slots]
        datas = [bytes([(r * 31 + i) & 0xFF]) * 65536 for i in range(8)]
        t0 = time.monotonic()
        wait_all(w, [w.aio_pwrite(d, off) for d, off in zip(datas, extents)])
        w.flush()
        moves.append((time.monotonic() - t0) * 1000)
        bufs = [nbd.Buffer(65536) for _ in extents]
        wait_all(rd, [rd.aio_pread(buf, off) for buf, off in zip(bufs, extents)])
        for i, buf in enumerate(bufs):
            if bytes(buf.to_bytearray()) != datas[i]:
                raise SystemExit("round %d extent %d: stale data through the other gateway" % (r, i))
    a.shutdown()
    b.shutdown()
    moves.sort()
    print(json.dumps({"rounds": rounds, "write_round_ms_median": round(moves[len(moves) // 2], 1),
                      "write_round_ms_max": round(moves[-1], 1)}))


def fenced(uri):
    h = connect(uri)
    h.pwrite(b"\xaa" * REC, 0, nbd.CMD_FLAG_FUA)
    print("wrote", flush=True)
    sys.stdin.readline()
    try:
        h.pwrite(b"\xbb" * REC, 0, nbd.CMD_FLAG_FUA)
        print("accepted", flush=True)
    except nbd.Error as e:
        print("refused: %s (errno %s)" % (e.string, e.errno), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "handover":
        handover(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "pingpong":
        pingpong(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "fenced":
        fenced(sys.argv[2])
    else:
        raise SystemExit("unknown mode " + mode)
