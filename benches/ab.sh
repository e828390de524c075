#!/usr/bin/env bash
# benches/ab.sh - two nbdcrypt builds side by side, with nbdkit-raw as the yardstick: the quick
# check for a data-path change (perf-report.sh is the full, slower report).
#
#   benches/ab.sh OLD_BINARY NEW_BINARY
#
# Both builds serve fresh 1 GiB volumes formatted alike; nbdkit's file plugin serves a plain
# file. What made earlier hand-run comparisons lie, and what this does about it:
# - Page-cache state: the folio sizes a file's cache was built with change pwrite speed by up
#   to 2x (4 KiB folios: 3.1 GB/s, 64 KiB and more: 6+ GB/s, on this box). So all three files
#   are written back and dropped from the cache, then written once through their own server
#   with the job anchors.sh preconditions with (fio 1 MiB QD8, whole device).
# - Writeback of the previous job's dirty pages runs during the next job: `sync` before each.
# - Order: rounds alternate A B K and K B A.
# - Other load: before each run it waits (up to IDLE_MAX_WAIT s) until the machine is at least
#   WAIT_IDLE % idle over a second; a run that started anyway is marked "busy" in its round.
#   A fuzzer left running on one core once made a client wait 2-4x longer on one server than
#   on the other, a difference a quiet machine did not show.
# - Build order of the two volumes' caches: with A's built first and B's second, the same build
#   against itself made NEW/OLD a median 1.057 (8 rounds of 1 MiB writes over TCP; with all six
#   run orders cycled, 1.084 in 12), and 0.954 with B's built first: the volume whose cache was
#   built second ran faster. So A and B are preconditioned at the same time, and K after them:
#   the same build against itself then gave 1.016 (0.91-1.09, 8 rounds) and 0.998 (0.93-1.05,
#   6 rounds; reads 0.991, 0.95-1.01).
# Prints each round and the median of NEW/OLD and of each build against nbdkit-raw. One round
# varies by up to 9%: a median that differs from 1 by less than about 3% is noise.
# Each round also prints each server's CPU time per MiB moved (user + system of the server
# process over the fio run, ramp included, divided by the MiB the run moved at its measured
# rate): what a change costs or saves, where the client and other load hide it in MB/s. A
# wrapper script given as a binary must `exec` the daemon, or its CPU is not the one counted.
#
# Env: JOBS="read write" BS=1M QD=8 RUNTIME=6 ROUNDS=4 TRANSPORT=tcp|unix SECTOR=4096
#      WAIT_IDLE=80 IDLE_MAX_WAIT=60 (WAIT_IDLE=0: do not wait)
set -Eeuo pipefail
[[ $# == 2 ]] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
OLD=$(realpath "$1") NEW=$(realpath "$2")
JOBS=${JOBS:-"read write"} BS=${BS:-1M} QD=${QD:-8} RUNTIME=${RUNTIME:-6} ROUNDS=${ROUNDS:-4}
TRANSPORT=${TRANSPORT:-tcp} SECTOR=${SECTOR:-4096}
WAIT_IDLE=${WAIT_IDLE:-80} IDLE_MAX_WAIT=${IDLE_MAX_WAIT:-60}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ab.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf -- "$WORK"
}
trap cleanup EXIT

"$OLD" genkey "$WORK/k.kek" >/dev/null
SIZE=$((1 << 30))
PORT_BASE=$((20000 + RANDOM % 20000))
declare -A URI PID
for n in A B; do
    truncate -s $((SIZE + (2 << 20))) "$WORK/$n.img"
    "$OLD" format "$WORK/$n.img" --key "local:$WORK/k.kek" --sector-size "$SECTOR" >/dev/null
done
truncate -s $SIZE "$WORK/K.img"
sync
python3 -c 'import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' \
    "$WORK/A.img" "$WORK/B.img" "$WORK/K.img"

i=0
for n in A B K; do
    port=$((PORT_BASE + i)); i=$((i + 1))
    if [[ $TRANSPORT == tcp ]]; then URI[$n]="nbd://127.0.0.1:$port"; else URI[$n]="nbd+unix:///?socket=$WORK/$n.sock"; fi
    case $n in
    A | B)
        bin=$OLD; [[ $n == B ]] && bin=$NEW
        "$bin" serve "$WORK/$n.img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/$n.sock" \
            --listen "127.0.0.1:$port" --control-socket "$WORK/$n.ctl" --log-level warn 2>"$WORK/$n.log" &
        PIDS+=($!) PID[$n]=$! ;;
    K)
        if [[ $TRANSPORT == tcp ]]; then a=(-p "$port" -i 127.0.0.1); else a=(-U "$WORK/K.sock"); fi
        nbdkit -f "${a[@]}" -t 16 file "$WORK/K.img" &
        PIDS+=($!) PID[$n]=$! ;;
    esac
done
precondition() { fio --name=pre --ioengine=nbd --uri="${URI[$1]}" --rw=write --bs=1M --iodepth=8 --size=100% >/dev/null 2>&1; }
for n in A B K; do
    for ((t = 0; t < 100; t++)); do nbdinfo --size "${URI[$n]}" >/dev/null 2>&1 && break; sleep 0.1; done
done
# Both builds' volumes at the same time: the one whose cache was built second ran faster.
precondition A & pre_a=$!
precondition B & pre_b=$!
# One wait per job: `wait A B` returns only B's status, and a failed precondition must stop the run.
wait "$pre_a"
wait "$pre_b"
precondition K

cpu_ticks() { # -> total idle (jiffies, from the first line of /proc/stat)
    awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6; exit}' /proc/stat
}
BUSY=""
wait_idle() { # sets BUSY to " busy(N% idle)" if the machine did not become idle in time
    local t0 i0 t1 i1 idle waited=0
    BUSY=""
    ((WAIT_IDLE > 0)) || return 0
    while :; do
        read -r t0 i0 < <(cpu_ticks); sleep 1; read -r t1 i1 < <(cpu_ticks)
        idle=$(((i1 - i0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
        ((idle >= WAIT_IDLE)) && return 0
        if ((waited >= IDLE_MAX_WAIT)); then BUSY=" busy(${idle}% idle)"; return 0; fi
        waited=$((waited + 1))
    done
}

proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, clock ticks
run() { # NAME JOB -> "bytes/s server-CPU-us-per-MiB"
    local c0 c1 t0 t1 bw
    sync
    wait_idle
    [[ -z $BUSY ]] || echo "$1$BUSY" >>"$WORK/busy"
    c0=$(proc_ticks "${PID[$1]}") t0=$(date +%s%N)
    fio --name=j --ioengine=nbd --uri="${URI[$1]}" --rw="$2" --bs="$BS" --iodepth="$QD" --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
    c1=$(proc_ticks "${PID[$1]}") t1=$(date +%s%N)
    bw=$(jq '.jobs[0].read.bw_bytes + .jobs[0].write.bw_bytes' "$WORK/fio.json")
    awk -v bw="$bw" -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v ns="$((t1 - t0))" \
        'BEGIN { mib = bw * ns / 1e9 / 1048576; printf "%d %.0f\n", bw, (mib > 0 ? c / hz * 1e6 / mib : 0) }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "nan"; else printf "%.3f\n", a / b }'; }
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "old=$OLD new=$NEW transport=$TRANSPORT sector=$SECTOR bs=$BS qd=$QD runtime=${RUNTIME}s"
for job in $JOBS; do
    for f in new_old old_raw new_raw cpu; do : >"$WORK/r.$f"; done
    for ((r = 1; r <= ROUNDS; r++)); do
        order="A B K"; ((r % 2 == 0)) && order="K B A"
        declare -A bw=() cpu=()
        : >"$WORK/busy"
        for n in $order; do read -r "bw[$n]" "cpu[$n]" < <(run "$n" "$job"); done
        printf '%s r%d: old %d MB/s  new %d  nbdkit-raw %d   new/old %s  old/raw %s  new/raw %s   server us CPU/MiB: old %d  new %d  raw %d%s\n' \
            "$job" "$r" $((bw[A] / 1000000)) $((bw[B] / 1000000)) $((bw[K] / 1000000)) \
            "$(ratio "${bw[B]}" "${bw[A]}")" "$(ratio "${bw[A]}" "${bw[K]}")" "$(ratio "${bw[B]}" "${bw[K]}")" \
            "${cpu[A]}" "${cpu[B]}" "${cpu[K]}" "$(paste -sd ' ' "$WORK/busy" | sed 's/^./  &/')"
        ratio "${bw[B]}" "${bw[A]}" >>"$WORK/r.new_old"
        ratio "${bw[A]}" "${bw[K]}" >>"$WORK/r.old_raw"
        ratio "${bw[B]}" "${bw[K]}" >>"$WORK/r.new_raw"
        ratio "${cpu[B]}" "${cpu[A]}" >>"$WORK/r.cpu"
    done
    echo "$job median: new/old $(median <"$WORK/r.new_old")  old/raw $(median <"$WORK/r.old_raw")  new/raw $(median <"$WORK/r.new_raw")  server CPU per MiB new/old $(median <"$WORK/r.cpu")"
done
