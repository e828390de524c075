#!/usr/bin/python3
"""Many concurrent async requests through libnbd, checked against a shadow copy.

usage: nbd_shadow_workload.py URI NREQUESTS SECTOR_SIZE

Keeps up to 32 requests in flight: writes (aligned and sub-sector), zeroes, flushes and
reads of random ranges. Overlapping requests are never in flight together (NBD gives no
ordering between them), so the shadow copy is exact. Every read is compared on completion,
and the whole device is read back and compared at the end.
"""
import random
import sys

import nbd

uri, total, sector = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
# The server advertises a 512-byte minimum block size, but serves any alignment (by
# read-modify-write); lift libnbd's client-side alignment check to exercise that too.
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.connect_uri(uri)
size = h.get_size()
shadow = bytearray(size)
h.pwrite(bytes(size), 0)  # known starting point: zeros
rng = random.Random(1234)
inflight = {}  # cookie -> (kind, off, len, buf)
busy = []  # (off, end) of requests in flight
errors = []


def overlaps(off, end):
    return any(o < end and off < e for (o, e) in busy)


def pick_range():
    for _ in range(100):
        if rng.random() < 0.5:
            ln = rng.choice([512, 1024, 1536, 3584, 4096, 8192, 65536])
            off = rng.randrange(0, size - ln + 1, 512)
        else:
            ln = rng.randint(1, 20000)
            off = rng.randint(0, size - ln)
        if not overlaps(off, off + ln):
            return off, ln
    return None


issued = 0
while issued < total or inflight:
    while issued < total and len(inflight) < 32:
        r = pick_range()
        if r is None:
            break
        off, ln = r
        kind = rng.choices(["read", "write", "zero", "flush"], [45, 40, 10, 5])[0]
        if kind == "write":
            data = rng.randbytes(ln)
            buf = data
            c = h.aio_pwrite(buf, off)
            shadow[off:off + ln] = data
        elif kind == "zero":
            c = h.aio_zero(ln, off)
            shadow[off:off + ln] = bytes(ln)
            buf = None
        elif kind == "flush":
            c = h.aio_flush()
            buf = None
            off, ln = 0, 0
        else:
            buf = bytearray(ln)
            c = h.aio_pread(buf, off)
        inflight[c] = (kind, off, ln, buf)
        busy.append((off, off + ln))
        issued += 1
    h.poll(-1)
    for c in list(inflight):
        if h.aio_command_completed(c):
            kind, off, ln, buf = inflight.pop(c)
            busy.remove((off, off + ln))
            if kind == "read" and bytes(buf) != bytes(shadow[off:off + ln]):
                errors.append(f"read mismatch at {off}+{ln}")

h.flush()
final = h.pread(size, 0) if size <= 32 << 20 else None
if final is not None and final != bytes(shadow):
    first = next(i for i in range(size) if final[i] != shadow[i])
    errors.append(f"final image differs from the shadow copy, first at byte {first}")
h.shutdown()
if errors:
    print("\n".join(errors[:20]))
    sys.exit(1)
print(f"ok: {total} requests, {size} bytes verified")
