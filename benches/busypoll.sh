#!/usr/bin/env bash
# benches/busypoll.sh - one nbdcrypt build with several --busy-poll-us settings side by side,
# at queue depth 1, each run followed by what the poll did (the daemon's "busy poll" lines:
# quiet periods that caught a request, polled in vain, or were skipped).
#
#   benches/busypoll.sh [NBDCRYPT_BINARY]
#
# Env: SETTINGS="0 50" (the values compared), THINK="0 20 40 80 150" (fio --thinktime in µs:
# how long the client sleeps before each request), CLIENT=fio|nbdfuse, RW=randread|randwrite,
# RUNTIME=4, RUNS=2.
# CLIENT=fio: fio's NBD engine over a Unix socket. CLIENT=nbdfuse (root): fio psync with
# O_DIRECT on a loop device over nbdfuse, a client stack that needs the CPU between requests
# (THINK is ignored). Settings alternate within each round, so a slow phase of the machine
# hits all of them. Prints requests per second and the server's CPU time per request.
set -euo pipefail
BIN=${1:-target/release/nbdcrypt}
SETTINGS=${SETTINGS:-0 50} THINK=${THINK:-0 20 40 80 150} CLIENT=${CLIENT:-fio}
RW=${RW:-randread} RUNTIME=${RUNTIME:-4} RUNS=${RUNS:-2}
[[ $CLIENT == nbdfuse ]] && THINK=0
WORK=$(mktemp -d)
PID=
cleanup() {
    [[ -n ${LOOP:-} ]] && losetup -d "$LOOP" 2>/dev/null
    fusermount3 -u "$WORK/m" 2>/dev/null || true
    [[ -n $PID ]] && kill "$PID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN" genkey "$WORK/k.kek" >/dev/null
truncate -s 1G "$WORK/v.img"
"$BIN" format "$WORK/v.img" --key "local:$WORK/k.kek" --yes >/dev/null 2>&1
URI="nbd+unix:///?socket=$WORK/v.sock"
filled=
one() { # SETTING THINK
    "$BIN" serve "$WORK/v.img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/v.sock" \
        --control-socket "$WORK/v.ctl" --listen "127.0.0.1:0" --log-level debug --busy-poll-us "$1" \
        2>"$WORK/log" &
    PID=$!
    for ((t = 0; t < 100; t++)); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
    if [[ -z $filled ]]; then
        fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=100% >/dev/null 2>&1
        filled=1
    fi
    local c0 c1 dir=${RW#rand}
    c0=$(awk '{print $14 + $15}' "/proc/$PID/stat")
    if [[ $CLIENT == nbdfuse ]]; then
        mkdir -p "$WORK/m"
        nbdfuse "$WORK/m/disk" "$URI" &
        for ((t = 0; t < 100; t++)); do [[ -e $WORK/m/disk ]] && break; sleep 0.1; done
        LOOP=$(losetup -f --show --direct-io=on "$WORK/m/disk")
        fio --name=j --filename="$LOOP" --rw="$RW" --bs=4k --direct=1 --ioengine=psync --size=1G \
            --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
        losetup -d "$LOOP"
        LOOP=
        fusermount3 -u "$WORK/m"
    else
        fio --name=j --ioengine=nbd --uri="$URI" --rw="$RW" --bs=4k --iodepth=1 --thinktime="$2" \
            --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
    fi
    c1=$(awk '{print $14 + $15}' "/proc/$PID/stat")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    local polls
    polls=$(jq -r 'select(.message == "busy poll" and .hits + .misses + .skipped > 100)
        | "\(.hits) hits \(.misses) misses \(.skipped) skipped"' "$WORK/log" | paste -sd ';' -)
    jq -r --arg s "$1" --arg tt "$2" --arg polls "$polls" --argjson ticks "$((c1 - c0))" \
        --argjson hz "$(getconf CLK_TCK)" --arg d "$dir" \
        '.jobs[0][$d] | "think \($tt) us, busy poll \($s): \(.iops | floor) requests/s  server CPU \($ticks / $hz * 1e6 / .total_ios | floor) us/request  \($polls)"' \
        "$WORK/fio.json"
}
echo "client=$CLIENT rw=$RW runtime=${RUNTIME}s settings: $SETTINGS"
for ((r = 1; r <= RUNS; r++)); do
    for tt in $THINK; do
        for s in $SETTINGS; do one "$s" "$tt"; done
    done
done
