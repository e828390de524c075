#!/usr/bin/python3
"""A workload under injected faults, checked against an exact shadow copy.

usage: faults.py --uri URI --sector N [--conns C] [--ops N] [--seed S]

Each connection owns a disjoint region of the export (64 KiB aligned, so no encryption
sector is shared) and keeps up to 8 requests in flight on it, never two on the same sector:
writes (aligned and sub-sector, some FUA), write-zeroes, reads and flushes. The parent
injects faults into the raw volume meanwhile. The script checks that:
  - every failed request got an errno (EIO or ENOSPC), and the connection stays usable;
  - every successful read returns exactly the bytes of the last acknowledged write (bytes
    whose last write failed are unknown: a short write may have torn its sectors);
  - after the parent turns faults off, every known byte reads back, and every region can be
    written and read again.

Protocol: -> START (the export is filled with zeros, flushed) ; <- GO (faults are on) ;
          -> FAULTY <json> (workload done) ; <- CLEAN (faults are off) ; -> SUMMARY <json>.
Exits 1 on a violation, with FAIL lines on stderr.
"""
import argparse
import errno
import json
import random
import select
import sys

import nbd

p = argparse.ArgumentParser()
p.add_argument("--uri", required=True)
p.add_argument("--sector", type=int, required=True)
p.add_argument("--conns", type=int, default=4)
p.add_argument("--ops", type=int, default=3000)
p.add_argument("--seed", type=int, default=1)
args = p.parse_args()
SS = args.sector
rng = random.Random(args.seed)
fails = []


def connect():
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(args.uri)
    return h


class Conn:
    def __init__(self, i, start, length):
        self.i, self.start, self.length = i, start, length
        self.h = connect()
        self.shadow = bytearray(length)
        self.known = bytearray(length)  # 1 where the shadow is exact
        self.busy = []  # sector-widened (start, end) of requests in flight, region-relative
        self.inflight = 0

    def free_range(self):
        for _ in range(50):
            if rng.random() < 0.5:
                ln = rng.choice([512, 1024, 4096, 8192, 65536])
                off = rng.randrange(0, self.length - ln + 1, 512)
            else:
                ln = rng.randint(1, 9000)
                off = rng.randint(0, self.length - ln)
            ws, we = off // SS * SS, -(-(off + ln) // SS) * SS
            if not any(s < we and ws < e for s, e in self.busy):
                return off, ln, (ws, we)
        return None


def known_runs(known, off, end):
    """The runs [s, e) of known bytes within [off, end)."""
    pos = off
    while pos < end:
        s = known.find(b"\x01", pos, end)
        if s < 0:
            return
        e = known.find(b"\x00", s, end)
        e = end if e < 0 else e
        yield s, e
        pos = e


stats = dict(requests=0, errors=0, eio=0, enospc=0, other_errno=0, reads_ok=0, read_bytes_checked=0,
             writes_acked=0, writes_failed=0, flush_errors=0)


def issue(c):
    r = c.free_range()
    kind = rng.choices(["write", "zero", "read", "flush"], [45, 10, 40, 5])[0]
    if r is None or kind == "flush":
        off, ln, wide = 0, 0, None
        kind = "flush"
    else:
        off, ln, wide = r
    fua = kind in ("write", "zero") and rng.random() < 0.1
    data = rng.randbytes(ln) if kind == "write" else bytes(ln)
    buf = data if kind == "write" else bytearray(ln)

    def done(err, kind=kind, off=off, ln=ln, wide=wide, data=data, buf=buf):
        c.inflight -= 1
        if wide:
            c.busy.remove(wide)
        e = err.value
        if e:
            stats["errors"] += 1
            name = {errno.EIO: "eio", errno.ENOSPC: "enospc"}.get(e, "other_errno")
            stats[name] += 1
        if kind in ("write", "zero"):
            if e:
                stats["writes_failed"] += 1
                c.known[wide[0]:wide[1]] = bytes(wide[1] - wide[0])
            else:
                stats["writes_acked"] += 1
                c.shadow[off:off + ln] = data
                c.known[off:off + ln] = b"\x01" * ln
        elif kind == "read" and not e:
            got = buf
            stats["reads_ok"] += 1
            for s, e in known_runs(c.known, off, off + ln):
                stats["read_bytes_checked"] += e - s
                if got[s - off:e - off] != c.shadow[s:e]:
                    fails.append(f"conn {c.i}: read at {c.start + off}+{ln} returned wrong data in "
                                 f"[{c.start + s},{c.start + e}) although it reported success")
        elif kind == "flush" and e:
            stats["flush_errors"] += 1
        return 1

    flags = nbd.CMD_FLAG_FUA if fua else 0
    if kind == "write":
        c.h.aio_pwrite(buf, c.start + off, completion=done, flags=flags)
    elif kind == "zero":
        c.h.aio_zero(ln, c.start + off, completion=done, flags=flags)
    elif kind == "read":
        c.h.aio_pread(buf, c.start + off, completion=done)
    else:
        c.h.aio_flush(completion=done)
    if wide:
        c.busy.append(wide)
    c.inflight += 1
    stats["requests"] += 1


def pump(conns, timeout):
    rl, wl, fds = [], [], {}
    for c in conns:
        fd, d = c.h.aio_get_fd(), c.h.aio_get_direction()
        fds[fd] = c
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(fd)
    r, w, _ = select.select(rl, wl, [], timeout)
    for fd in r:
        fds[fd].h.aio_notify_read()
    for fd in w:
        fds[fd].h.aio_notify_write()


def main():
    h = connect()
    size = h.get_size()
    region = size // args.conns // 65536 * 65536
    # A known starting point, before any fault.
    h.pwrite(bytes(region * args.conns), 0)
    h.flush()
    h.shutdown()
    print("START", flush=True)
    if sys.stdin.readline().strip() != "GO":
        sys.exit("expected GO")
    conns = [Conn(i, i * region, region) for i in range(args.conns)]
    for c in conns:
        c.known[:] = b"\x01" * region
    issued = 0
    while issued < args.ops or any(c.inflight for c in conns):
        for c in conns:
            while issued < args.ops and c.inflight < 8:
                issue(c)
                issued += 1
        pump(conns, 1.0)
    print(f"FAULTY {json.dumps(stats)}", flush=True)
    if sys.stdin.readline().strip() != "CLEAN":
        sys.exit("expected CLEAN")
    known_checked = unknown = 0
    for c in conns:
        got = c.h.pread(region, c.start)
        for s, e in known_runs(c.known, 0, region):
            known_checked += e - s
            if got[s:e] != c.shadow[s:e]:
                fails.append(f"conn {c.i}: acknowledged data in [{c.start + s},{c.start + e}) lost or corrupted")
        unknown += c.known.count(0)
        fresh = rng.randbytes(region)
        c.h.pwrite(fresh, c.start)
        if c.h.pread(region, c.start) != fresh:
            fails.append(f"conn {c.i}: region cannot be rewritten after the faults")
        c.h.shutdown()
    stats.update(final_bytes_checked=known_checked, unknown_bytes=unknown)
    print(f"SUMMARY {json.dumps(stats)}", flush=True)
    for f in fails[:20]:
        print("FAIL", f, file=sys.stderr)
    if stats["other_errno"]:
        print("FAIL errors other than EIO/ENOSPC", file=sys.stderr)
    sys.exit(1 if fails or stats["other_errno"] else 0)


main()
