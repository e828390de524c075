#!/usr/bin/python3
"""A bounded soak: mixed I/O from several clients that come and go, while the daemon's
memory, file descriptors and threads are sampled from /proc.

usage: soak.py --uri URI --pid PID --seconds S --sector N [--clients C] [--seed S]

Each client owns a disjoint 64 KiB-aligned region and keeps up to 8 requests in flight on
it (never two on the same encryption sector): writes (aligned and not, some FUA), write
zeroes, reads, flushes and cache hints. Every read is checked against the client's shadow
copy. Each client disconnects after a random 1-4 s: two times in three cleanly (drain, then
NBD_CMD_DISC), otherwise abruptly (the socket is closed with requests in flight; their
ranges become unknown in the shadow, and the client waits 300 ms before reconnecting so
that the daemon has finished them), then reconnects. At the end every known byte is read
back, all clients leave, and the daemon must return to its baseline of file descriptors,
and to its baseline of threads once the blocking pool's idle threads expire (10 s).

Prints SUMMARY <json>; exits 1 (FAIL lines on stderr) on a data mismatch, a request error,
anonymous RSS growth beyond --rss-bound-mib after the warm-up, or a descriptor or thread leak.
"""
import argparse
import faulthandler
import json
import os
import random
import select
import signal
import sys
import time

import nbd

p = argparse.ArgumentParser()
p.add_argument("--uri", required=True)
p.add_argument("--pid", type=int, required=True)
p.add_argument("--seconds", type=float, required=True)
p.add_argument("--sector", type=int, required=True)
p.add_argument("--clients", type=int, default=4)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--rss-bound-mib", type=float, default=24)
args = p.parse_args()
SS = args.sector
rng = random.Random(args.seed)
fails = []
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a hang
WATCHDOG = 30  # seconds without a heartbeat before the stacks are dumped to stderr


def heartbeat():
    faulthandler.dump_traceback_later(WATCHDOG, exit=False)


def slow(what, t0):
    dt = time.monotonic() - t0
    if dt > 2:
        print(f"SLOW at {t0 - T0:.0f} s: {what} took {dt:.1f} s", file=sys.stderr, flush=True)
LAST = [time.monotonic()]
LATENCY = dict(max=0.0, flush_max=0.0)
st = dict(requests=0, bytes_written=0, bytes_read=0, read_bytes_checked=0, request_errors=0,
          clean_disconnects=0, abrupt_disconnects=0, connections=0)


def sample():
    pid = args.pid
    # The bound is on anonymous memory, what the daemon allocates (a leak is anonymous). VmRSS
    # also counts the pages of the volume's read mapping that reads touched: page cache, up to
    # the volume's size, recorded but not bounded.
    with open(f"/proc/{pid}/status") as f:
        kib = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmRSS:", "RssAnon:"))}
    return dict(t=round(time.monotonic() - T0, 1), rss_kib=kib["RssAnon"], vmrss_kib=kib["VmRSS"],
                fds=len(os.listdir(f"/proc/{pid}/fd")),
                tasks=len(os.listdir(f"/proc/{pid}/task")))


def known_runs(known, off, end):
    pos = off
    while pos < end:
        s = known.find(b"\x01", pos, end)
        if s < 0:
            return
        e = known.find(b"\x00", s, end)
        e = end if e < 0 else e
        yield s, e
        pos = e


def connect():
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(args.uri)
    st["connections"] += 1
    return h


class Client:
    def __init__(self, i, start, length):
        self.i, self.start, self.length = i, start, length
        self.shadow = bytearray(length)
        self.known = bytearray(b"\x01" * length)
        self.h = None
        self.pending = {}  # id -> (kind, off, ln, wide)
        self.busy = []
        self.next_id = 0
        self.until = 0.0
        self.resume_at = 0.0

    def open(self, now):
        t0 = time.monotonic()
        self.h = connect()
        slow(f"client {self.i} connect", t0)
        self.until = now + rng.uniform(1, 4)

    def free_range(self):
        for _ in range(20):
            if rng.random() < 0.5:
                # 1 MiB: over the server's inline limit, so served on its blocking pool.
                ln = min(self.length, rng.choice([512, 4096, 16384, 65536, 262144, 1 << 20]))
                off = rng.randrange(0, self.length - ln + 1, 512)
            else:
                ln = rng.randint(1, 20000)
                off = rng.randint(0, self.length - ln)
            ws, we = off // SS * SS, -(-(off + ln) // SS) * SS
            if not any(s < we and ws < e for s, e in self.busy):
                return off, ln, (ws, we)
        return None

    def issue(self):
        kind = rng.choices(["write", "zero", "read", "flush", "cache"], [40, 8, 40, 6, 6])[0]
        r = self.free_range() if kind not in ("flush",) else (0, 0, None)
        if r is None:
            return
        off, ln, wide = r
        qid = self.next_id
        self.next_id += 1
        data = rng.randbytes(ln) if kind == "write" else bytes(ln)
        buf = data if kind == "write" else bytearray(ln)
        fua = nbd.CMD_FLAG_FUA if kind in ("write", "zero") and rng.random() < 0.1 else 0

        issued_at = time.monotonic()

        def done(err, qid=qid, kind=kind, off=off, ln=ln, wide=wide, data=data, buf=buf):
            now = time.monotonic()
            LAST[0] = now
            lat = now - issued_at
            LATENCY["max"] = max(LATENCY["max"], lat)
            if kind == "flush" or fua:
                LATENCY["flush_max"] = max(LATENCY["flush_max"], lat)
            self.pending.pop(qid, None)
            if wide:
                self.busy.remove(wide)
            if err.value:
                st["request_errors"] += 1
                fails.append(f"client {self.i}: {kind} at {self.start + off}+{ln} failed with errno {err.value}")
                return 1
            if kind in ("write", "zero"):
                self.shadow[off:off + ln] = data
                self.known[off:off + ln] = b"\x01" * ln
                st["bytes_written"] += ln
            elif kind == "read":
                got = buf
                st["bytes_read"] += ln
                for s, e in known_runs(self.known, off, off + ln):
                    st["read_bytes_checked"] += e - s
                    if got[s - off:e - off] != self.shadow[s:e]:
                        fails.append(f"client {self.i}: read at {self.start + off}+{ln} returned wrong data")
            return 1

        h = self.h
        if kind == "write":
            h.aio_pwrite(buf, self.start + off, completion=done, flags=fua)
        elif kind == "zero":
            h.aio_zero(ln, self.start + off, completion=done, flags=fua)
        elif kind == "read":
            h.aio_pread(buf, self.start + off, completion=done)
        elif kind == "cache":
            h.aio_cache(ln, self.start + off, completion=done)
        else:
            h.aio_flush(completion=done)
        self.pending[qid] = (kind, off, ln, wide)
        if wide:
            self.busy.append(wide)
        st["requests"] += 1

    def disconnect(self, now):
        if rng.random() < 2 / 3:
            t0 = time.monotonic()
            n = len(self.pending)
            while self.pending:
                self.h.poll(-1)
            slow(f"client {self.i} draining {n} requests", t0)
            t0 = time.monotonic()
            self.h.shutdown()
            slow(f"client {self.i} shutdown", t0)
            st["clean_disconnects"] += 1
        else:
            # Closing with requests in flight: their effect is unknown until rewritten.
            for kind, off, ln, wide in self.pending.values():
                if kind in ("write", "zero"):
                    self.known[wide[0]:wide[1]] = bytes(wide[1] - wide[0])
            self.pending.clear()
            self.busy.clear()
            st["abrupt_disconnects"] += 1
            self.resume_at = now + 0.3
        self.h = None  # the last reference: libnbd closes the socket


T0 = time.monotonic()
samples = [sample()]
base = samples[0]
h = connect()
size = h.get_size()
region = size // args.clients // 65536 * 65536
for off in range(0, region * args.clients, 4 << 20):
    h.pwrite(bytes(min(4 << 20, region * args.clients - off)), off)
h.shutdown()
h = None
clients = [Client(i, i * region, region) for i in range(args.clients)]
end = T0 + args.seconds
next_sample = time.monotonic() + 1
while True:
    now = time.monotonic()
    if now >= next_sample:
        samples.append(sample())
        next_sample += 1
        heartbeat()
    if now >= end:
        break
    if now - LAST[0] > 10:
        print(f"STALL at {now - T0:.0f} s: no completion for {now - LAST[0]:.0f} s; pending per client "
              f"{[len(c.pending) for c in clients]}, connected {[c.h is not None for c in clients]}",
              file=sys.stderr, flush=True)
        LAST[0] = now
    for c in clients:
        if c.h is None and now >= c.resume_at:
            c.open(now)
        if c.h is not None and now >= c.until:
            c.disconnect(now)
        if c.h is not None:
            while len(c.pending) < 8:
                c.issue()
    rl, wl, fds = [], [], {}
    for c in clients:
        if c.h is None:
            continue
        fd, d = c.h.aio_get_fd(), c.h.aio_get_direction()
        fds[fd] = c
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(fd)
    r, w, _ = select.select(rl, wl, [], 0.1)
    for fd in r:
        fds[fd].h.aio_notify_read()
    for fd in w:
        if fds[fd].h is not None:
            fds[fd].h.aio_notify_write()

heartbeat()
t_end = time.monotonic()
for c in clients:
    if c.h is not None:
        while c.pending:
            c.h.poll(-1)
        c.h.shutdown()
        c.h = None
slow("the final drain", t_end)
heartbeat()
# Final check of every known byte, on a fresh connection.
h = connect()
verified = unknown = 0
for c in clients:
    got = b"".join(h.pread(min(4 << 20, region - o), c.start + o) for o in range(0, region, 4 << 20))
    for s, e in known_runs(c.known, 0, region):
        verified += e - s
        if got[s:e] != c.shadow[s:e]:
            fails.append(f"client {c.i}: final contents differ in [{c.start + s},{c.start + e})")
    unknown += c.known.count(0)
h.shutdown()
h = None
busy = samples[-1]
# Every client is gone: descriptors must come back to the baseline, threads once the idle
# blocking threads expire.
deadline = time.monotonic() + 15
final = sample()
while time.monotonic() < deadline and (final["fds"] > base["fds"] or final["tasks"] > base["tasks"]):
    time.sleep(0.5)
    final = sample()
faulthandler.cancel_dump_traceback_later()

warm_i = max(1, min(len(samples) - 1, max(5, int(len(samples) * 0.15))))
warm = samples[warm_i]
after = samples[warm_i:]
rss_growth = max(s["rss_kib"] for s in after) - warm["rss_kib"]
third = max(1, len(after) // 3)
trend = (sum(s["rss_kib"] for s in after[-third:]) / third) - (sum(s["rss_kib"] for s in after[:third]) / third)
summary = dict(
    st, seconds=args.seconds, clients=args.clients, final_bytes_verified=verified, unknown_bytes=unknown,
    rss_kib_start=base["rss_kib"], rss_kib_after_warmup=warm["rss_kib"], rss_kib_max=max(s["rss_kib"] for s in samples),
    rss_kib_end=busy["rss_kib"], rss_growth_after_warmup_kib=rss_growth, rss_trend_kib=round(trend),
    rss_bound_kib=int(args.rss_bound_mib * 1024), vmrss_kib_max=max(s["vmrss_kib"] for s in samples),
    fds_base=base["fds"], fds_max=max(s["fds"] for s in samples), fds_final=final["fds"],
    tasks_base=base["tasks"], tasks_max=max(s["tasks"] for s in samples), tasks_final=final["tasks"],
    samples=len(samples), max_latency_ms=round(LATENCY["max"] * 1000),
    max_flush_latency_ms=round(LATENCY["flush_max"] * 1000))
if rss_growth > args.rss_bound_mib * 1024:
    fails.append(f"anonymous RSS grew {rss_growth} KiB after the warm-up (bound {args.rss_bound_mib} MiB)")
if final["fds"] > base["fds"]:
    fails.append(f"file descriptors: {final['fds']} after all clients left, {base['fds']} before")
if final["tasks"] > base["tasks"]:
    fails.append(f"threads: {final['tasks']} 15 s after all clients left, {base['tasks']} before")
print("SUMMARY " + json.dumps(summary), flush=True)
print("SAMPLES " + json.dumps(samples), flush=True)
for f in fails[:20]:
    print("FAIL", f, file=sys.stderr)
sys.exit(1 if fails else 0)
