#!/usr/bin/env bash
# benches/rss.sh - nbdcrypt's peak resident memory (VmHWM) under QD128 over 4 connections.
#
# Serves a fresh 1 GiB volume on a Unix socket, then runs fio (nbd engine, numjobs=4 = four
# NBD connections, iodepth=128 each) for each job, and prints VmHWM/VmRSS after each job.
#
# Env: SECTOR=4096 RUNTIME=5 JOBS="randread4k randwrite4k seqread1m seqwrite1m" EXTRA_SERVE_ARGS=
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SECTOR=${SECTOR:-4096}
RUNTIME=${RUNTIME:-5}
JOBS=${JOBS:-"randread4k randwrite4k seqread1m seqwrite1m"}
cargo build --release --quiet
BIN=$PWD/target/release/nbdcrypt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rss.XXXXXX")
PID=""
cleanup() { [[ -n $PID ]] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; }; rm -rf -- "$WORK"; }
trap cleanup EXIT
"$BIN" genkey "$WORK/k.kek" >/dev/null
truncate -s $(((1 << 30) + (2 << 20))) "$WORK/v.img"
"$BIN" format "$WORK/v.img" --key "local:$WORK/k.kek" --sector-size "$SECTOR" >/dev/null
# shellcheck disable=SC2086
"$BIN" serve "$WORK/v.img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/s.sock" --log-level warn ${EXTRA_SERVE_ARGS:-} &
PID=$!
URI="nbd+unix:///?socket=$WORK/s.sock"
for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
mem() { awk '/^VmHWM|^VmRSS/{printf "%s %d MiB  ", $1, $2/1024}' "/proc/$PID/status"; }
echo "idle after start: $(mem)"
for j in $JOBS; do
    case $j in
    randread4k) rw=randread bs=4k ;; randwrite4k) rw=randwrite bs=4k ;;
    seqread1m) rw=read bs=1M ;; seqwrite1m) rw=write bs=1M ;;
    *) echo "unknown job $j" >&2; exit 1 ;;
    esac
    out=$(fio --name="$j" --ioengine=nbd --uri="$URI" --rw=$rw --bs=$bs --iodepth=128 --numjobs=4 \
        --group_reporting --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' | jq -r '.jobs[0] | "\((.read.bw_bytes + .write.bw_bytes) / 1048576 | floor) MiB/s"')
    printf '%-12s QD128 x 4 connections: %-12s %s\n' "$j" "$out" "$(mem)"
done
