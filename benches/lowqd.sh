#!/usr/bin/env bash
# benches/lowqd.sh - low-queue-depth latency: nbdcrypt against nbdkit's file plugin, fio 4 KiB
# random I/O at queue depth 1 (QD=), both servers on cached 1 GiB volumes, alternating, RUNS
# runs each. Prints requests per second, mean latency and the server's CPU time per request.
#
#   benches/lowqd.sh [NBDCRYPT_BINARY] [-- extra serve arguments, e.g. --busy-poll-us 0]
#
# Env: TRANSPORT=unix|tcp RW=randread|randwrite QD=1 RUNTIME=4 RUNS=2 FIO_EXTRA="--numjobs=4 --group_reporting"
# Why it exists: at queue depth 1 each request can find the server's thread asleep, and on a VM
# waking an idle vCPU costs tens of µs; the queue-deep jobs of anchors.sh never show it.
set -euo pipefail
BIN=${1:-target/release/nbdcrypt}
shift || true
[[ ${1:-} == -- ]] && shift
TRANSPORT=${TRANSPORT:-unix} RW=${RW:-randread} QD=${QD:-1} RUNTIME=${RUNTIME:-4} RUNS=${RUNS:-2}
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$BIN" genkey "$WORK/k.kek" >/dev/null
truncate -s 1G "$WORK/A.img" "$WORK/K.img"
"$BIN" format "$WORK/A.img" --key "local:$WORK/k.kek" --yes >/dev/null 2>&1
PA=$((20000 + RANDOM % 5000)) PK=$((PA + 1))
"$BIN" serve "$WORK/A.img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/A.sock" \
    --listen "127.0.0.1:$PA" --control-socket "$WORK/A.ctl" --log-level warn "$@" 2>"$WORK/A.log" &
PIDS+=($!) PID_A=$!
if [[ $TRANSPORT == tcp ]]; then k=(-p "$PK" -i 127.0.0.1); else k=(-U "$WORK/K.sock"); fi
nbdkit -f "${k[@]}" -t 16 file "$WORK/K.img" &
PIDS+=($!) PID_K=$!
if [[ $TRANSPORT == tcp ]]; then
    UA="nbd://127.0.0.1:$PA" UK="nbd://127.0.0.1:$PK"
else
    UA="nbd+unix:///?socket=$WORK/A.sock" UK="nbd+unix:///?socket=$WORK/K.sock"
fi
for u in "$UA" "$UK"; do
    for ((t = 0; t < 100; t++)); do nbdinfo --size "$u" >/dev/null 2>&1 && break; sleep 0.1; done
    # Fill each volume through its server, so both are cached and allocated alike.
    fio --name=fill --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth=8 --size=100% >/dev/null 2>&1
done
one() { # NAME URI PID
    local c0 c1
    c0=$(awk '{print $14 + $15}' "/proc/$3/stat")
    # shellcheck disable=SC2086 # FIO_EXTRA is a list of options
    fio --name=j --ioengine=nbd --uri="$2" --rw="$RW" --bs=4k --iodepth="$QD" ${FIO_EXTRA:-} --time_based \
        --runtime="$RUNTIME" --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
    c1=$(awk '{print $14 + $15}' "/proc/$3/stat")
    jq -r --arg n "$1" --argjson ticks "$((c1 - c0))" --argjson hz "$(getconf CLK_TCK)" --argjson t "$RUNTIME" \
        '.jobs[0] | (.read.iops + .write.iops) as $i | (if .read.iops > 0 then .read else .write end).lat_ns.mean as $l
         | "\($n): \($i | floor) requests/s  mean latency \($l / 1000 | floor) us  server CPU \($ticks / $hz * 1e6 / ($i * $t) | floor) us/request"' \
        "$WORK/fio.json"
}
echo "transport=$TRANSPORT rw=$RW qd=$QD runtime=${RUNTIME}s serve args: ${*:-(none)}"
for ((r = 1; r <= RUNS; r++)); do
    one nbdcrypt "$UA" "$PID_A"
    one nbdkit-raw "$UK" "$PID_K"
done
