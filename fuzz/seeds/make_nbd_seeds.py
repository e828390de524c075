#!/usr/bin/env python3
"""Writes seed inputs for the NBD fuzz targets (well-formed sessions to mutate from).

    python3 fuzz/seeds/make_nbd_seeds.py      # from the repository root

nbd_handshake: mode byte (see the target), then what a client sends.
nbd_option:    one option, header and data.
nbd_request:   one 28-byte request header.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
EXT_REQ = 0x21E41C71
OPT = dict(EXTENDED=11, EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED=8, LIST_META=9, SET_META=10)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def info(name=b"vol", items=(0, 1, 2, 3)):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(items)) + b"".join(struct.pack(">H", i) for i in items)


def meta(name=b"vol", queries=(b"base:allocation",)):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return d + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def req(cmd, offset=0, length=0, flags=0, cookie=1):
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, offset, length)


def ext_req(cmd, offset=0, length=0, flags=0, cookie=1):
    return struct.pack(">IHHQQQ", EXT_REQ, flags, cmd, cookie, offset, length)


def ext_io_session():
    return (
        ext_req(CMD["WRITE"], 512, 1024, flags=32, cookie=1) + bytes(range(256)) * 4
        + ext_req(CMD["WRITE"], 512, 1024, cookie=2)
        + ext_req(CMD["READ"], 0, 4096, flags=4, cookie=3)
        + ext_req(CMD["FLUSH"], 0, 16, flags=32, cookie=4) + bytes(16)
        + ext_req(CMD["TRIM"], 0, 1 << 40, cookie=5)
        + ext_req(CMD["WRITE_ZEROES"], 0, 1 << 33, cookie=6)
        + ext_req(CMD["READ"], 0, 0, cookie=7)
        + ext_req(CMD["DISC"])
    )


def io_session():
    return (
        req(CMD["WRITE"], 512, 1024, cookie=1) + bytes(range(256)) * 4
        + req(CMD["READ"], 0, 4096, cookie=2)
        + req(CMD["READ"], 0, 4096, flags=4, cookie=3)
        + req(CMD["WRITE_ZEROES"], 4096, 8192, flags=1, cookie=4)
        + req(CMD["WRITE_ZEROES"], 0, 512, flags=16, cookie=5)
        + req(CMD["TRIM"], 0, 4096, cookie=6)
        + req(CMD["CACHE"], 0, 4096, cookie=7)
        + req(CMD["FLUSH"], cookie=8)
        + req(CMD["READ"], (1 << 20) - 512, 1024, cookie=9)
        + req(CMD["BLOCK_STATUS"], 0, 512, cookie=10)
        + req(99, 0, 0, cookie=11)
        + req(CMD["READ"], 0, 0, cookie=12)
        + req(CMD["DISC"])
    )


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


hello = struct.pack(">I", 3)
handshake = {
    "go-structured-io": b"\x00" + hello + opt(OPT["STRUCTURED"]) + opt(OPT["GO"], info()) + io_session(),
    "export-name-io": b"\x00" + hello + opt(OPT["EXPORT_NAME"], b"vol") + io_session(),
    "list-info-meta-abort": b"\x00" + hello + opt(OPT["LIST"]) + opt(OPT["INFO"], info(b""))
    + opt(OPT["LIST_META"], meta()) + opt(OPT["STRUCTURED"]) + opt(OPT["SET_META"], meta())
    + opt(OPT["SET_META"], meta(b"nope", ())) + opt(42, b"junk") + opt(OPT["ABORT"]),
    "require-starttls-go": b"\x02" + hello + opt(OPT["LIST"]) + opt(OPT["STARTTLS"])
    + opt(OPT["STRUCTURED"]) + opt(OPT["STARTTLS"]) + opt(OPT["GO"], info()) + io_session(),
    "optional-go-readonly": b"\x09" + hello + opt(OPT["GO"], info(b"vol", (3,))) + io_session(),
    "extended-io": b"\x00" + hello + opt(OPT["EXTENDED"]) + opt(OPT["STRUCTURED"]) + opt(OPT["GO"], info())
    + ext_io_session(),
    "shutdown": b"\x04" + hello + opt(OPT["GO"], info()) + opt(OPT["ABORT"]),
}
for name, data in handshake.items():
    write("nbd_handshake", name, data)

options = {
    "go": opt(OPT["GO"], info()),
    "info-empty": opt(OPT["INFO"], info(b"", ())),
    "export-name": opt(OPT["EXPORT_NAME"], b"vol"),
    "set-meta": opt(OPT["SET_META"], meta()),
    "list-meta-empty": opt(OPT["LIST_META"], meta(b"", ())),
    "starttls": opt(OPT["STARTTLS"]),
}
for name, data in options.items():
    write("nbd_option", name, data)

requests = {
    "read": req(CMD["READ"], 4096, 512),
    "write-fua": req(CMD["WRITE"], 0, 4096, flags=1),
    "zeroes-fast": req(CMD["WRITE_ZEROES"], 0, 4096, flags=16 | 2),
    "unknown": req(0x42, 1 << 63, 0xFFFFFFFF, flags=0xFFFF),
    "extended-write": ext_req(CMD["WRITE"], 4096, 1 << 33, flags=33),
}
for name, data in requests.items():
    write("nbd_request", name, data)
