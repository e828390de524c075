#!/usr/bin/env bash
# The long reliability runs (issue 8), whose figures go in the README's "Reliability" table:
#   - 1000 crash rounds per mode and sector size (SIGKILL of the daemon; power cuts of a
#     fault-injecting disk, with and without failing flushes),
#   - 40 000 requests under injected EIO / short I/O / ENOSPC per sector size, and the real
#     ENOSPC, short-write and short-read scenarios,
#   - key hygiene, core dumps, zeroize-on-free,
#   - a 10-minute soak.
# One test at a time (about 45 minutes on 2 cores), so that the soak's RSS figures are not
# disturbed by a neighbour. (The peers pass plain bytes/bytearrays to libnbd: python3-libnbd
# 1.14 leaks every nbd.Buffer given to aio_pread/aio_pwrite, ~12 MiB per crash round.)
# Run as root, after tests/run.sh installed the tools:
#
#   tests/long.sh                       figures in target/reliability/, table on stdout
#
# Env: NBDCRYPT_CRASH_ROUNDS, NBDCRYPT_SOAK_SECONDS, NBDCRYPT_FAULT_OPS, NBDCRYPT_SEED
# override the long defaults.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${NBDCRYPT_RESULTS_DIR:-target/reliability}")
rm -rf "$out"
mkdir -p "$out"
export NBDCRYPT_LONG=1 NBDCRYPT_RESULTS_DIR="$out"
start=$(date +%s)
cargo test --test reliability --test zeroize_alloc -- --test-threads=1 --nocapture 2>&1 | tee "$out/log.txt"
echo "{\"seconds\": $(($(date +%s) - start)), \"date\": \"$(date -u +%Y-%m-%d)\", \"commit\": \"$(git rev-parse --short HEAD)\"}" >"$out/run.json"
/usr/bin/python3 tests/py/reliability_table.py "$out" | tee "$out/table.md"
