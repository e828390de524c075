#!/usr/bin/env bash
# benches/rss.sh - nbdcrypt's peak resident memory under QD128 over 4 connections.
#
# Serves a fresh 1 GiB volume on a Unix socket, then runs fio (nbd engine, numjobs=4 = four
# NBD connections, iodepth=128 each) for each job, and prints, after each job: VmHWM (peak RSS)
# and VmRSS as the kernel counts them, and the peak of RssAnon sampled every 0.1 s during the
# job. RSS includes RssFile: the pages of the volume's read mapping (backend/mapping.rs) that
# reads touched, which are the page cache, shared and reclaimable, up to the volume's size.
# RssAnon is the memory the daemon itself allocates (buffers, pools, runtime): the bound.
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
# Its own control socket (the default one may belong to another daemon on this box), and its
# log in a file: this script's output goes into the README.
"$BIN" serve "$WORK/v.img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/s.sock" \
    --control-socket "$WORK/ctl.sock" --log-level warn ${EXTRA_SERVE_ARGS:-} 2>"$WORK/serve.log" &
PID=$!
URI="nbd+unix:///?socket=$WORK/s.sock"
for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size "$URI" >/dev/null 2>&1 || { echo "nbdcrypt did not come up:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
mem() { awk '/^VmHWM|^VmRSS|^RssFile/{printf "%s %d MiB  ", $1, $2/1024}' "/proc/$PID/status"; }
anon() { awk '/^RssAnon/{print $2}' "/proc/$PID/status"; }
echo "idle after start: $(mem)"
for j in $JOBS; do
    case $j in
    randread4k) rw=randread bs=4k ;; randwrite4k) rw=randwrite bs=4k ;;
    seqread1m) rw=read bs=1M ;; seqwrite1m) rw=write bs=1M ;;
    *) echo "unknown job $j" >&2; exit 1 ;;
    esac
    fio --name="$j" --ioengine=nbd --uri="$URI" --rw=$rw --bs=$bs --iodepth=128 --numjobs=4 \
        --group_reporting --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1 &
    fio_pid=$!
    peak=0
    while kill -0 "$fio_pid" 2>/dev/null; do
        a=$(anon); ((a > peak)) && peak=$a
        sleep 0.1
    done
    wait "$fio_pid"
    out=$(sed -n '/^{/,$p' "$WORK/fio.json" | jq -r '.jobs[0] | "\((.read.bw_bytes + .write.bw_bytes) / 1048576 | floor) MiB/s"')
    printf '%-12s QD128 x 4 connections: %-12s %s peak RssAnon %d MiB\n' "$j" "$out" "$(mem)" $((peak / 1024))
done
