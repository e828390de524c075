#!/usr/bin/python3
"""Faults of a real raw volume under the real daemon; one scenario per subcommand.

usage: faults_real.py SCENARIO URI [ARGS...]; prints one JSON line, exits 1 on a violation.

  enospc URI             write 1 MiB chunks until the filesystem under the volume is full:
                         the failing write must get ENOSPC, and the daemon must go on serving
                         (the acknowledged chunks read back, on this connection and another,
                         an allocated chunk can be overwritten, the failure repeats).
  verify-chunks URI N    the first N chunks written by `enospc` read back (after a restart).
  short-write URI LIMIT  the daemon runs with RLIMIT_FSIZE = LIMIT (raw bytes; SIGXFSZ
                         ignored): a write across the limit is short, then EFBIG, and must fail
                         with EIO; writes below it succeed and read back; reads above it work.
  fill URI SEED          writes the whole export with a pattern and flushes.
  short-read URI SEED EOF  the volume file was truncated at raw offset EOF: reads below it return
                         the pattern, reads reaching past it fail with EIO (never zeros), and a
                         write past it extends the file and reads back.
"""
import errno
import json
import random
import sys

import nbd

DATA_OFFSET = 2 << 20
MIB = 1 << 20
fails = []


def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    return h


def chunk(i, salt=0):
    return random.Random(i * 7919 + salt).randbytes(MIB)


def expect_error(what, fn, want):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            fails.append(f"{what}: errno {e.errnum} ({e.string}), want {errno.errorcode[want]}")
        return True
    fails.append(f"{what}: succeeded, want {errno.errorcode[want]}")
    return False


def enospc(uri):
    h = connect(uri)
    size = h.get_size()
    n = 0
    err = None
    while n * MIB < size:
        try:
            h.pwrite(chunk(n), n * MIB)
        except nbd.Error as e:
            err = e
            break
        n += 1
    if err is None:
        sys.exit("the export never filled up: is the filesystem under it small enough?")
    if err.errnum != errno.ENOSPC:
        fails.append(f"write at chunk {n}: errno {err.errnum} ({err.string}), want ENOSPC")
    # The same connection goes on; the failure repeats; acknowledged chunks read back.
    expect_error("write into the full filesystem again", lambda: h.pwrite(chunk(n), n * MIB), errno.ENOSPC)
    h2 = connect(uri)
    for i in range(n):
        if h2.pread(MIB, i * MIB) != chunk(i):
            fails.append(f"acknowledged chunk {i} does not read back")
    if n == 0 or h.pread(MIB, (n - 1) * MIB) != chunk(n - 1):
        fails.append("the connection that got ENOSPC cannot read")
    # Overwriting allocated space needs no new blocks.
    h.pwrite(chunk(0, salt=1), 0)
    h.flush()
    if h2.pread(MIB, 0) != chunk(0, salt=1):
        fails.append("an overwrite of allocated space did not read back")
    h.pwrite(chunk(0), 0)
    h.flush()
    h.shutdown()
    h2.shutdown()
    return dict(chunks_acked=n, enospc_errors=2, bytes_verified=n * MIB)


def verify_chunks(uri, n):
    h = connect(uri)
    for i in range(int(n)):
        if h.pread(MIB, i * MIB) != chunk(i):
            fails.append(f"chunk {i} lost across the restart")
    h.shutdown()
    return dict(bytes_verified=int(n) * MIB)


def short_write(uri, limit):
    limit = int(limit) - DATA_OFFSET  # in export offsets
    h = connect(uri)
    below = random.Random(1).randbytes(64 << 10)
    h.pwrite(below, limit - (128 << 10))
    expect_error("write across RLIMIT_FSIZE", lambda: h.pwrite(bytes(64 << 10), limit - (32 << 10)), errno.EIO)
    expect_error("write past RLIMIT_FSIZE", lambda: h.pwrite(bytes(4096), limit + MIB), errno.EIO)
    if h.pread(len(below), limit - (128 << 10)) != below:
        fails.append("a write below the limit does not read back")
    h.pread(4096, limit + MIB)  # reads are not limited
    h.flush()
    h.shutdown()
    return dict(errors=2)


def pattern(seed, size):
    return random.Random(int(seed)).randbytes(size)


def fill(uri, seed):
    h = connect(uri)
    size = h.get_size()
    h.pwrite(pattern(seed, size), 0)
    h.flush()
    h.shutdown()
    return dict(bytes=size)


def short_read(uri, seed, eof):
    eof = int(eof) - DATA_OFFSET
    h = connect(uri)
    size = h.get_size()
    pat = pattern(seed, size)
    below = eof // 4096 * 4096 - 8192
    if h.pread(below, 0) != pat[:below]:
        fails.append("reads below the end of the truncated file changed")
    expect_error("read across the end of the file", lambda: h.pread(16384, below), errno.EIO)
    expect_error("read past the end of the file", lambda: h.pread(4096, eof + MIB), errno.EIO)
    if h.pread(4096, 0) != pat[:4096]:
        fails.append("the daemon stopped serving after a short read")
    # Whole sectors: a partial one would need a read-modify-write, whose read fails here.
    past = (eof + MIB) // 4096 * 4096
    h.pwrite(b"\x5a" * 8192, past)
    if h.pread(8192, past) != b"\x5a" * 8192:
        fails.append("a write past the end of the file does not read back")
    h.shutdown()
    return dict(errors=2, bytes_verified=below)


scenarios = {"enospc": enospc, "verify-chunks": verify_chunks, "short-write": short_write, "fill": fill,
             "short-read": short_read}
result = scenarios[sys.argv[1]](*sys.argv[2:])
print(json.dumps(result))
for f in fails:
    print("FAIL", f, file=sys.stderr)
sys.exit(1 if fails else 0)
