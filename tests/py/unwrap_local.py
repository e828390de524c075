#!/usr/bin/python3
"""Recovers a volume key independently of nbdcrypt: parses the primary header copy, unwraps
the local-provider slot that opens with the KEK with Python's `cryptography`, and proves the key right by
decrypting one known data sector with AES-XTS (plain64 tweak).

usage: unwrap_local.py IMAGE KEKFILE SECTOR_INDEX PLAINTEXT_FILE
prints {"key": "<128 hex digits>", "kek": "<64 hex digits>"}; exits 1 if the check fails.

Header layout (docs/header-format.md): JSON length is the u32-BE at byte 12 of the copy, the
JSON follows the 4096-byte binary block. Wrapped key: nonce (12) || ciphertext (64) || tag
(16), AES-256-GCM under the KEK, associated data b"nbdcrypt v1 local wrap\\0" followed by each
context pair sorted by key as u32-BE length + key, u32-BE length + value.
"""
import json
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

image, kek_path, index, plain_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(image, "rb") as f:
    block = f.read(4096)
    assert block[:8] == b"NBDCRYPT", "no primary header copy"
    (jlen,) = struct.unpack(">I", block[12:16])
    meta = json.loads(f.read(jlen))
raw_kek = open(kek_path, "rb").read()
kek = raw_kek if len(raw_kek) == 32 else bytes.fromhex(raw_kek.decode().strip())


def unwrap(slot):
    wrapped = bytes.fromhex(slot["wrapped"])
    aad = b"nbdcrypt v1 local wrap\0"
    for k in sorted(slot["context"]):
        for part in (k.encode(), slot["context"][k].encode()):
            aad += struct.pack(">I", len(part)) + part
    try:
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad)
    except InvalidTag:
        return None  # another KEK's slot


keys = [k for k in (unwrap(s) for s in meta["slots"] if s["provider"] == "local") if k]
if not keys:
    sys.exit("no local slot opens with this KEK")
key = keys[0]
assert len(key) == 64

ss = meta["sector_size"]
with open(image, "rb") as f:
    f.seek(meta["data_offset"] + index * ss)
    ct = f.read(ss)
dec = Cipher(algorithms.AES(key), modes.XTS(index.to_bytes(16, "little"))).decryptor()
if dec.update(ct) + dec.finalize() != open(plain_path, "rb").read():
    sys.exit("the unwrapped key does not decrypt the known sector: wrong key or layout")
print(json.dumps({"key": key.hex(), "kek": kek.hex()}))
