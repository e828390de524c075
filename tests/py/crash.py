#!/usr/bin/python3
"""Crash-consistency workload and checker, driven by a parent that crashes the server.

usage: crash.py --uri URI --sector N --mode kill|powercut --rounds R [--seed S] [--conns C]
                [--depth D] [--max-ops N] [--artifacts DIR]

Each round, several libnbd connections (multi-conn) keep requests in flight: writes with
unique random contents at random offsets and sizes (sector-aligned and not, sub-sector
included), writes with FUA, write-zeroes, flushes on any connection, and reads. The parent
crashes the server at a moment of its choosing, the script drains what was in flight,
the parent restarts the server, and the script reads the whole export back and checks it
against the model below. Then the next round starts from the image just verified.

Protocol (one line each; the script writes to stdout, the parent to stdin):
    -> GO <round>        workload running; the parent crashes the server when it likes
    <- CRASHED           the server was killed (kill) or lost power (powercut)
    -> DRAINED <round>   nothing in flight any more; connections closed
    <- READY             the server runs again on the same URI
    -> ROUND <round> <json>   the round verified
    -> SUMMARY <json>    all rounds verified; the script exits 0
On a violation the script prints FAIL lines to stderr, saves the images and the model under
--artifacts, and exits 1.

The model. Time is a logical clock that ticks on every issue and every completion seen by
the client (completions are seen no earlier than they happen, issues are recorded no later
than they are sent, so every inference below is conservative). A write is *settled* when
the mode guarantees it is on disk:
  - kill (SIGKILL of the daemon; the page cache survives): once acknowledged, since the
    daemon replies only after pwrite returned;
  - powercut (volatile disk cache lost): once acknowledged with FUA, or acknowledged before
    the issue of a FLUSH (on any connection: CAN_MULTI_CONN) that was acknowledged.
The export is cut into segments at every write boundary and every encryption-sector
boundary. For a segment, the writes that cover it are candidates, except a write that was
acknowledged before a settled covering write was issued (that one is definitely older and
was definitely applied). The segment's contents before the round are a candidate only if no
settled write covers it. Writes that failed or were in flight at the crash stay candidates
(they may or may not have reached the disk). The segment must equal exactly one candidate:
so every settled write reads back unless a write not definitely older replaced it, a
segment inside one encryption sector is never a mix of versions, and nothing is garbage
(a torn or mis-keyed sector decrypts to noise, which matches no candidate). Bytes outside
every write of the round must be unchanged.
"""
import argparse
import json
import os
import random
import select
import sys

import nbd

p = argparse.ArgumentParser()
p.add_argument("--uri", required=True)
p.add_argument("--sector", type=int, required=True)
p.add_argument("--mode", choices=["kill", "powercut"], required=True)
p.add_argument("--rounds", type=int, required=True)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--conns", type=int, default=4)
p.add_argument("--depth", type=int, default=12)
p.add_argument("--max-ops", type=int, default=4000)
p.add_argument("--artifacts", default=None)
args = p.parse_args()
SS = args.sector
CHUNK = 4 << 20


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


_stdin_buf = b""


def stdin_line(block):
    """Returns a line from the parent, or None if none is ready and block is False."""
    global _stdin_buf
    while b"\n" not in _stdin_buf:
        if not block and not select.select([0], [], [], 0)[0]:
            return None
        chunk = os.read(0, 4096)
        if not chunk:
            sys.exit("parent closed stdin")
        _stdin_buf += chunk
    line, _stdin_buf = _stdin_buf.split(b"\n", 1)
    return line.decode().strip()


def connect():
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(args.uri)
    return h


def read_all(h, size):
    out = bytearray()
    for off in range(0, size, CHUNK):
        out += h.pread(min(CHUNK, size - off), off)
    return bytes(out)


class Req:
    __slots__ = ("id", "kind", "off", "end", "data", "issue", "ack", "ok", "fua", "buf", "conn")

    def describe(self, settled):
        return (f"#{self.id} {self.kind} [{self.off},{self.end}) issue={self.issue} ack={self.ack} "
                f"ok={self.ok} fua={self.fua} settled={settled}")


class Round:
    def __init__(self, r, size):
        self.r = r
        self.rng = random.Random(args.seed * 1_000_003 + r)
        self.size = size
        self.clock = 0
        self.writes = []
        self.flushes = []
        self.outstanding = [set() for _ in range(args.conns)]
        self.issued = 0
        self.errors = 0  # requests answered with an error
        self.unanswered = 0  # requests whose connection died before the reply

    def tick(self):
        self.clock += 1
        return self.clock

    def pick_range(self):
        rng = self.rng
        size = self.size
        hot = rng.random() < 0.3  # a small hot zone, so that requests collide
        span = min(size, 256 << 10) if hot else size
        r = rng.random()
        if r < 0.45:
            ln = rng.choice([512, 1024, 2048, 4096, 8192, 16384, 65536])
            off = rng.randrange(0, span - ln + 1, 512)
        elif r < 0.6:
            ln = rng.choice([4096, 8192, 32768])
            off = rng.randrange(0, span - ln + 1, 4096)
        else:
            ln = rng.randint(1, 12000)
            off = rng.randint(0, span - ln)
        return off, ln

    def issue(self, ci, h):
        rng = self.rng
        # Power cuts lose what was not flushed: flush less often there, so that several
        # versions of a sector are pending when the power goes.
        flush_weight, fua_rate = (12, 0.15) if args.mode == "kill" else (3, 0.06)
        kind = rng.choices(["write", "zero", "flush", "read"], [60, 8, flush_weight, 20])[0]
        q = Req()
        q.id, q.kind, q.conn, q.ack, q.ok, q.buf = self.issued, kind, ci, None, None, None
        q.fua = kind in ("write", "zero") and rng.random() < fua_rate
        flags = nbd.CMD_FLAG_FUA if q.fua else 0
        if kind == "flush":
            q.off = q.end = 0
        else:
            q.off, ln = self.pick_range()
            q.end = q.off + ln
        q.data = None
        if kind == "write":
            q.data = rng.randbytes(ln)
            q.buf = q.data
        elif kind == "zero":
            q.data = bytes(ln)
        elif kind == "read":
            q.buf = bytearray(ln)

        def done(err, q=q):
            q.ack = self.tick()
            q.ok = err.value == 0
            if not q.ok:
                self.errors += 1
            self.outstanding[q.conn].discard(q)
            return 1

        q.issue = self.tick()
        if kind == "write":
            h.aio_pwrite(q.buf, q.off, completion=done, flags=flags)
        elif kind == "zero":
            h.aio_zero(q.end - q.off, q.off, completion=done, flags=flags)
        elif kind == "flush":
            h.aio_flush(completion=done)
        else:
            h.aio_pread(q.buf, q.off, completion=done)
        # Only requests actually queued are recorded (an exception above skips this).
        self.issued += 1
        self.outstanding[ci].add(q)
        if kind in ("write", "zero"):
            self.writes.append(q)
        elif kind == "flush":
            self.flushes.append(q)

    def run(self, handles):
        """Runs the workload until the parent says CRASHED and nothing is in flight."""
        dead = [False] * len(handles)
        crashed = False
        at_crash = None

        def kill_handle(ci):
            dead[ci] = True
            for q in self.outstanding[ci]:
                q.ok = False  # no reply: it may or may not have reached the disk
                self.unanswered += 1
            self.outstanding[ci].clear()

        say(f"GO {self.r}")
        while True:
            if not crashed:
                for ci, h in enumerate(handles):
                    while not dead[ci] and len(self.outstanding[ci]) < args.depth and self.issued < args.max_ops:
                        try:
                            self.issue(ci, h)
                        except nbd.Error:
                            kill_handle(ci)
            inflight = sum(len(o) for o in self.outstanding)
            if crashed and inflight == 0:
                break
            rl, wl, fds = [], [], {}
            for ci, h in enumerate(handles):
                if dead[ci]:
                    continue
                try:
                    if h.aio_is_dead() or h.aio_is_closed():
                        kill_handle(ci)
                        continue
                    fd, d = h.aio_get_fd(), h.aio_get_direction()
                except nbd.Error:
                    kill_handle(ci)
                    continue
                fds[fd] = ci
                if d & nbd.AIO_DIRECTION_READ:
                    rl.append(fd)
                if d & nbd.AIO_DIRECTION_WRITE:
                    wl.append(fd)
            if not crashed:
                rl.append(0)
            r, w, _ = select.select(rl, wl, [], 0.2)
            if 0 in r:
                line = stdin_line(block=False)
                if line is not None:
                    if line != "CRASHED":
                        sys.exit(f"unexpected line from the parent: {line!r}")
                    crashed = True
                    # In flight when the parent crashed the server: still waiting, or lost
                    # with a connection that died before this line was read.
                    at_crash = inflight + self.unanswered
            for fd in set(r) | set(w):
                if fd == 0:
                    continue
                ci = fds[fd]
                try:
                    if fd in r:
                        handles[ci].aio_notify_read()
                    if fd in w:
                        handles[ci].aio_notify_write()
                except nbd.Error:
                    kill_handle(ci)
        for ci, h in enumerate(handles):
            if not dead[ci]:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
        handles.clear()  # the last references: libnbd closes the sockets
        return at_crash


def settled_fn(writes, flushes, mode):
    last_flush = max((f.issue for f in flushes if f.ok), default=-1)

    def settled(w):
        if not w.ok:
            return False
        return mode == "kill" or w.fua or w.ack < last_flush

    return settled


def check(rnd, baseline, image, mode):
    """Returns a list of violations (empty when the image is consistent with the model)."""
    writes = sorted(rnd.writes, key=lambda w: w.off)
    settled = settled_fn(rnd.writes, rnd.flushes, mode)
    st = {w.id: settled(w) for w in writes}
    bad = []
    # Bytes no write touched must be unchanged.
    pos = 0
    for w in writes + [None]:
        start = w.off if w else len(image)
        if start > pos and image[pos:start] != baseline[pos:start]:
            first = next(i for i in range(pos, start) if image[i] != baseline[i])
            bad.append(f"byte {first} changed although no write of this round touched it")
        if w:
            pos = max(pos, w.end)
    bounds = set()
    for w in writes:
        bounds.add(w.off)
        bounds.add(w.end)
        bounds.update(range((w.off // SS + 1) * SS, w.end, SS))
    bounds = sorted(bounds)
    active, i, segments = [], 0, 0
    for a, b in zip(bounds, bounds[1:]):
        while i < len(writes) and writes[i].off <= a:
            active.append(writes[i])
            i += 1
        active = [w for w in active if w.end > a]
        if not active:
            continue
        segments += 1
        seg = image[a:b]
        sett = [w for w in active if st[w.id]]
        if not sett and seg == baseline[a:b]:
            continue
        cands = [w for w in active if not (w.ok and any(w.ack < s.issue for s in sett))]
        if any(seg == w.data[a - w.off:b - w.off] for w in cands):
            continue
        lines = [f"segment [{a},{b}) (sector {a // SS}) matches no candidate"]
        lines.append(f"  old contents {'allowed' if not sett else 'excluded'}; equal to old: {seg == baseline[a:b]}")
        for w in active:
            same = sum(x == y for x, y in zip(seg, w.data[a - w.off:b - w.off]))
            lines.append(f"  {w.describe(st[w.id])} candidate={w in cands} equal bytes {same}/{b - a}")
        bad.append("\n".join(lines))
    return bad, segments, st


def main():
    h = connect()
    size = h.get_size()
    baseline = read_all(h, size)
    h.shutdown()
    del h
    tot = dict(rounds=0, requests=0, writes=0, writes_acked=0, writes_settled=0, fua_acked=0,
               flushes_acked=0, request_errors=0, unanswered=0, inflight_at_crash=0, rounds_crashed_with_inflight=0,
               segments_checked=0, bytes_verified=0, settled_bytes=0, data_lost=0)
    for r in range(args.rounds):
        rnd = Round(r, size)
        handles = [connect() for _ in range(args.conns)]
        at_crash = rnd.run(handles)
        say(f"DRAINED {r}")
        if stdin_line(block=True) != "READY":
            sys.exit("expected READY")
        h = connect()
        image = read_all(h, size)
        h.shutdown()
        del h
        bad, segments, st = check(rnd, baseline, image, args.mode)
        settled_writes = [w for w in rnd.writes if st[w.id]]
        stats = dict(
            requests=rnd.issued, writes=len(rnd.writes), writes_acked=sum(1 for w in rnd.writes if w.ok),
            writes_settled=len(settled_writes), fua_acked=sum(1 for w in rnd.writes if w.ok and w.fua),
            flushes_acked=sum(1 for f in rnd.flushes if f.ok), request_errors=rnd.errors, unanswered=rnd.unanswered,
            inflight_at_crash=at_crash or 0, segments_checked=segments, bytes_verified=size,
            settled_bytes=sum(w.end - w.off for w in settled_writes), data_lost=len(bad))
        for k, v in stats.items():
            tot[k] += v
        tot["rounds"] += 1
        # Requests in flight when the server went down either failed (the connection died, or
        # EIO from a dead disk) or were still waiting when CRASHED arrived.
        tot["rounds_crashed_with_inflight"] += 1 if (at_crash or rnd.errors or rnd.unanswered) else 0
        say(f"ROUND {r} {json.dumps(stats)}")
        if bad:
            for b in bad[:20]:
                print(f"FAIL round {r}: {b}", file=sys.stderr)
            if args.artifacts:
                os.makedirs(args.artifacts, exist_ok=True)
                with open(os.path.join(args.artifacts, f"round{r}-before.img"), "wb") as f:
                    f.write(baseline)
                with open(os.path.join(args.artifacts, f"round{r}-after.img"), "wb") as f:
                    f.write(image)
                with open(os.path.join(args.artifacts, f"round{r}-model.txt"), "w") as f:
                    for q in rnd.writes + rnd.flushes:
                        f.write(q.describe(st.get(q.id)) + "\n")
            say(f"SUMMARY {json.dumps(tot)}")
            sys.exit(1)
        baseline = image
    say(f"SUMMARY {json.dumps(tot)}")


main()
