"""Queues more requests at once than a connection's budget admits (128 requests, 12 MiB by
default) and waits for every reply: a server that parks received requests for budget and
then waits for the client, which has nothing more to send, hangs here (seen with fio at
QD128). 512-byte requests make 128 replies fit the socket buffer, so they leave in one write; 1 MiB
ones exceed the byte budget."""
import sys
import time

import nbd

uri, depth, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
mib = 1 << 20
slots = size // mib
for kind in ("pwrite", "pread"):
    bufs = []
    for i in range(depth):
        b = nbd.Buffer(length)
        bufs.append(b)
        off = (i % slots) * mib
        if kind == "pread":
            h.aio_pread(b, off)
        else:
            h.aio_pwrite(b, off)
    deadline = time.monotonic() + 30
    while h.aio_in_flight() > 0:
        if time.monotonic() > deadline:
            sys.exit(f"{kind}: stuck with {h.aio_in_flight()} of {depth} requests unanswered")
        h.poll(1000)
    print(f"{kind}: {depth} x {length} bytes answered")
h.shutdown()
