#!/usr/bin/python3
"""Negotiation and commands through libnbd (python3-libnbd, what nbdsh runs).

usage: protocol.py URI

Checks what a real client sees: the flags the server offers, option mode (LIST, INFO,
LIST_META_CONTEXT with no context offered), structured reads with DF, CACHE, FAST_ZERO refused
with ENOTSUP, and that base:allocation is not offered (an encrypted volume cannot report holes
honestly).
"""
import sys

import nbd

uri = sys.argv[1]


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


# Option mode: LIST, INFO, meta contexts, then GO.
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append(name))
check(names == ["t"], f"opt_list gave {names}")
h.opt_info()
check(h.get_size() > 0, "opt_info gives a size")
contexts = []
count = h.opt_list_meta_context(lambda name: contexts.append(name))
check(count == 0 and contexts == [], f"no metadata context is offered, got {contexts}")
h.opt_go()
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
check(not h.can_meta_context("base:allocation"), "base:allocation is not offered")
for name, can in [
    ("flush", h.can_flush()),
    ("fua", h.can_fua()),
    ("multi_conn", h.can_multi_conn()),
    ("cache", h.can_cache()),
    ("zero", h.can_zero()),
    ("fast_zero", h.can_fast_zero()),
    ("trim", h.can_trim()),
    ("df", h.can_df()),
]:
    check(can, f"can_{name}")
check(not h.is_read_only(), "writable")
check(h.get_block_size(nbd.SIZE_MINIMUM) == 512, "minimum block size 512")
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20, "maximum block size 32 MiB")

data = bytes(range(256)) * 64
h.pwrite(data, 65536, nbd.CMD_FLAG_FUA)
chunks = []


def chunk(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status))
    return 0


buf = h.pread_structured(1 << 20, 0, chunk, nbd.CMD_FLAG_DF)
check(buf[65536:65536 + len(data)] == data, "structured read with DF")
check(chunks == [(0, 1 << 20, nbd.READ_DATA)], f"DF: one data chunk for 1 MiB, got {chunks}")
h.cache(len(data), 65536)
try:
    h.zero(4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit("FAILED: fast zero was accepted")
except nbd.Error as e:
    check(e.errno in ("ENOTSUP", "EOPNOTSUPP"), f"fast zero: {e}")
check(h.pread(len(data), 65536) == data, "a refused fast zero changes nothing")
h.zero(4096, 65536)
check(h.pread(4096, 65536) == bytes(4096), "zeroes read back")
try:
    h.pread(4096, h.get_size())
    raise SystemExit("FAILED: read past the end")
except nbd.Error as e:
    check(e.errno == "EINVAL", f"read past the end: {e}")
h.flush()
h.shutdown()

# Plain GO without option mode, structured replies refused by the client: simple replies.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
check(not h.get_structured_replies_negotiated(), "simple replies")
check(not h.can_df(), "no DF without structured replies")
check(h.pread(4096, 65536) == bytes(4096), "simple read")
h.shutdown()
print("ok")
