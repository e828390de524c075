#!/usr/bin/env bash
# benches/perf-report.sh - nbdcrypt end to end next to the anchors of ../shared/bench/anchors.sh
# (nbdkit file plugin, plain and with its LUKS filter), plus the cipher benchmark, printed as the
# markdown of README's "Performance" section. Nothing in that section is written by hand: run
#
#   benches/perf-report.sh --update-readme
#
# and it replaces the text between the perf-report markers in README.md.
#
# For each sector size (4096, 512) one nbdcrypt process serves a fresh 1 GiB volume on a Unix
# socket and on TCP; for each transport, one anchors.sh invocation measures the anchors and then
# nbdcrypt with the same fio and nbdcopy jobs, RUNS times, so every ratio compares numbers taken
# minutes apart on the same machine. Then multi-connection scaling (fio NUMJOBS=1,2,4, 1 MiB
# sequential jobs, 4096-byte sectors, Unix socket) against nbdkit-raw, and the cipher table.
#
# Env: RUNS=3 RUNTIME=5 SECTORS="4096 512" TRANSPORTS="unix tcp" ANCHORS="nbdkit-raw nbdkit-luks"
#      WAIT_IDLE=80 (anchors.sh: wait for an idle machine; 0 on a busy shared box)
#      SCALING=1 CIPHER=1 RSS=1 STARTUP=1 OUT_DIR=target/perf-report ANCHORS_SH=../shared/bench/anchors.sh
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-5}
SECTORS=${SECTORS:-"4096 512"}
TRANSPORTS=${TRANSPORTS:-"unix tcp"}
ANCHORS=${ANCHORS:-"nbdkit-raw nbdkit-luks"}
WAIT_IDLE=${WAIT_IDLE:-80}
SCALING=${SCALING:-1}
CIPHER=${CIPHER:-1}
RSS=${RSS:-1}
STARTUP=${STARTUP:-1}
OUT_DIR=${OUT_DIR:-$ROOT/target/perf-report}
ANCHORS_SH=${ANCHORS_SH:-$ROOT/../shared/bench/anchors.sh}
UPDATE_README=0
[[ ${1:-} == --update-readme ]] && UPDATE_README=1

log() { printf '[perf-report %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[[ -x $ANCHORS_SH ]] || die "anchors.sh not found at $ANCHORS_SH"

SRV_PID="" WORK=""
cleanup() {
    [[ -n $SRV_PID ]] && { kill -TERM "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null || true; }
    [[ -n $WORK ]] && rm -rf -- "$WORK"
}
trap cleanup EXIT

log "building release"
cargo build --release --quiet
BIN=$ROOT/target/release/nbdcrypt
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json "$OUT_DIR"/*.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/perf-report.XXXXXX")
"$BIN" genkey "$WORK/k.kek" >/dev/null

# serve SECTOR: formats a fresh 1 GiB volume and serves it on $WORK/s.sock and TCP $PORT.
serve() {
    local ss=$1 img="$WORK/v$1.img" i
    rm -f "$img" "$WORK/s.sock"
    truncate -s $(((1 << 30) + (2 << 20))) "$img"
    "$BIN" format "$img" --key "local:$WORK/k.kek" --sector-size "$ss" >/dev/null
    PORT=$((20000 + RANDOM % 20000))
    "$BIN" serve "$img" --kek-file "$WORK/k.kek" --export '' --socket "$WORK/s.sock" \
        --listen "127.0.0.1:$PORT" --control-socket "$WORK/ctl.sock" --log-level warn 2>"$WORK/serve-$ss.log" &
    SRV_PID=$!
    for ((i = 0; i < 100; i++)); do
        nbdinfo --size "nbd+unix:///?socket=$WORK/s.sock" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "nbdcrypt did not come up: $(cat "$WORK/serve-$ss.log")"
}
stop() { kill -TERM "$SRV_PID"; wait "$SRV_PID" 2>/dev/null || true; SRV_PID=""; }
uri() { if [[ $1 == unix ]]; then echo "nbd+unix:///?socket=$WORK/s.sock"; else echo "nbd://127.0.0.1:$PORT"; fi; }

CMDS=()
for ss in $SECTORS; do
    serve "$ss"
    for x in $TRANSPORTS; do
        out="$OUT_DIR/anchors-$ss-$x.json"
        cmd="SERVERS='$ANCHORS' TRANSPORTS=$x RUNS=$RUNS RUNTIME=$RUNTIME WAIT_IDLE=$WAIT_IDLE CRYPTO=0 TARGET='$(uri "$x" | sed "s|$WORK/||")' TARGET_NAME=nbdcrypt-$ss TARGET_PID=\$(pidof nbdcrypt) anchors.sh"
        CMDS+=("$cmd")
        log "sector $ss over $x: $cmd"
        SERVERS="$ANCHORS" TRANSPORTS=$x RUNS=$RUNS RUNTIME=$RUNTIME WAIT_IDLE=$WAIT_IDLE CRYPTO=0 \
            TARGET="$(uri "$x")" TARGET_NAME="nbdcrypt-$ss" TARGET_PID=$SRV_PID OUT="$out" \
            "$ANCHORS_SH" >"$OUT_DIR/anchors-$ss-$x.txt" 2>&1 || die "anchors.sh failed, see $OUT_DIR/anchors-$ss-$x.txt"
    done
    stop
done

if [[ $SCALING == 1 ]]; then
    serve 4096
    for n in 1 2 4; do
        log "multi-conn: NUMJOBS=$n"
        SERVERS="nbdkit-raw" TRANSPORTS=unix RUNS=$RUNS RUNTIME=$RUNTIME WAIT_IDLE=$WAIT_IDLE CRYPTO=0 \
            JOBS="seqread1m seqwrite1m" NUMJOBS=$n TARGET="$(uri unix)" TARGET_NAME=nbdcrypt-4096 \
            TARGET_PID=$SRV_PID TARGET_PRECONDITION=$((n == 1)) OUT="$OUT_DIR/scaling-$n.json" \
            "$ANCHORS_SH" >"$OUT_DIR/scaling-$n.txt" 2>&1 || die "anchors.sh failed, see $OUT_DIR/scaling-$n.txt"
    done
    stop
fi

if [[ $CIPHER == 1 ]]; then
    log "cargo bench --bench xts"
    cargo bench --quiet --bench xts >"$OUT_DIR/xts.txt" 2>/dev/null || die "cargo bench --bench xts failed"
fi

if [[ $RSS == 1 ]]; then
    log "benches/rss.sh"
    RUNTIME=$RUNTIME "$ROOT/benches/rss.sh" >"$OUT_DIR/rss.txt" 2>&1 || die "rss.sh failed, see $OUT_DIR/rss.txt"
fi
if [[ $STARTUP == 1 ]]; then
    log "benches/startup.py"
    python3 "$ROOT/benches/startup.py" --runs 100 >"$OUT_DIR/startup.txt" 2>&1 || die "startup.py failed, see $OUT_DIR/startup.txt"
fi

# ------------------------------------------------------------------ markdown
report() {
    local f first
    local all=("$OUT_DIR"/anchors-*.json)
    first=${all[0]}
    echo "Generated by \`benches/perf-report.sh\` on $(date -u +%Y-%m-%d): $(jq -r '.meta.cpu' "$first"), $(jq -r '.meta.ncpu' "$first") vCPUs shared by client and server, kernel $(jq -r '.meta.kernel' "$first"); $(jq -r '.meta.versions.nbdkit' "$first"), $(jq -r '.meta.versions.fio' "$first"), $(jq -r '.meta.versions.libnbd' "$first" | tr -d '\n')."
    echo "1 GiB volume file in the page cache; RUNS=$RUNS of RUNTIME=${RUNTIME}s per fio job, means over runs;"
    echo "each table row's numbers come from one anchors.sh invocation (anchors first, then nbdcrypt)."
    echo "Random jobs in IOPS, the others in MiB/s. Targets (issue 5): sequential and nbdcopy"
    echo "≥ 2.0× nbdkit-luks and ≥ 0.8× nbdkit-raw; 4k random ≥ 1.3× nbdkit-luks and ≥ 0.9× nbdkit-raw."
    echo "\`bg\` is the CPU other processes used during nbdcrypt's job (% of one core): high means a noisy row."
    echo
    echo "| sector | xport | job | nbdcrypt | nbdkit-luks | nbdkit-raw | × luks | × raw | target | srv CPU % | bg % |"
    echo "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|"
    for f in "$OUT_DIR"/anchors-*.json; do
        jq -r --slurpfile all "$f" '
          ($all[0]) as $a
          | def val(s; x): [$a.summary[] | select(.server == s and .job == x)][0]
                           | if . == null then null elif (x | test("^rand")) then .iops_mean else .mib_s_mean end;
            def fmt: if . == null then "-" elif . >= 1000 then (. | round | tostring) else (. * 10 | round / 10 | tostring) end;
            def r2: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
            def bg(s; x): [$a.results[] | select(.server == s and .job == x) | .bg_cpu_pct] | if length == 0 then null else add / length end;
          ["randread4k", "randwrite4k", "seqread1m", "seqwrite1m", "copyread", "copywrite"][] as $job
          | [$a.summary[] | select((.server | startswith("nbdcrypt")) and .job == $job)][0] as $t
          | select($t != null)
          | val($t.server; $job) as $n | val("nbdkit-luks"; $job) as $l | val("nbdkit-raw"; $job) as $r
          | (if $l then $n / $l else null end) as $xl | (if $r then $n / $r else null end) as $xr
          | (if ($job | test("^rand")) then [1.3, 0.9] else [2.0, 0.8] end) as $goal
          | (if $xl == null or $xr == null then "-"
             elif $xl >= $goal[0] and $xr >= $goal[1] then "met"
             else "missed (" + ([if $xl < $goal[0] then "luks" else empty end, if $xr < $goal[1] then "raw" else empty end] | join(", ")) + ")" end) as $ok
          | "| \($t.server | sub("nbdcrypt-"; "")) | \($t.transport) | \($job) | \($n | fmt) | \($l | fmt) | \($r | fmt) | \($xl | r2) | \($xr | r2) | \($ok) | \($t.srv_cpu_pct_mean | fmt) | \(bg($t.server; $job) | fmt) |"
        ' "$f"
    done
    echo
    echo "Exact commands (one per table block; \`anchors.sh\` is \`../shared/bench/anchors.sh\`, nbdcrypt serving"
    echo "\`serve vol.img --kek-file k.kek --export '' --socket s.sock --listen 127.0.0.1:PORT --control-socket ctl.sock\`):"
    echo
    echo '```sh'
    printf '%s\n' "${CMDS[@]}"
    echo '```'
    if [[ $SCALING == 1 ]]; then
        echo
        echo "Multi-conn: fio \`--numjobs=N\` (N connections, each QD8 of 1 MiB), 4096-byte sectors, Unix socket;"
        echo "MiB/s summed over the connections, nbdkit-raw measured in the same invocation:"
        echo
        echo "| connections | job | nbdcrypt | × 1 conn | nbdkit-raw | × raw | srv CPU % |"
        echo "|---:|---|---:|---:|---:|---:|---:|"
        for job in seqread1m seqwrite1m; do
            for n in 1 2 4; do
                jq -r --arg job "$job" --argjson n "$n" --slurpfile one "$OUT_DIR/scaling-1.json" '
                  def fmt: if . == null then "-" else (. | round | tostring) end;
                  def r2: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
                  [.summary[] | select(.job == $job and (.server | startswith("nbdcrypt")))][0] as $t
                  | [.summary[] | select(.job == $job and .server == "nbdkit-raw")][0] as $r
                  | [$one[0].summary[] | select(.job == $job and (.server | startswith("nbdcrypt")))][0] as $b
                  | "| \($n) | \($job) | \($t.mib_s_mean | fmt) | \($t.mib_s_mean / $b.mib_s_mean | r2) | \($r.mib_s_mean | fmt) | \($t.mib_s_mean / $r.mib_s_mean | r2) | \($t.srv_cpu_pct_mean | round) |"
                ' "$OUT_DIR/scaling-$n.json"
            done
        done
    fi
    if [[ $CIPHER == 1 ]]; then
        echo
        echo "Sector cipher (\`cargo bench --bench xts\`: \`SectorCipher\` on each engine against AWS-LC's"
        echo "\`EVP_aes_256_xts\` called directly, GB/s = 1e9 B/s; target ratio ≥ 0.9; * = the engine used):"
        echo
        echo '```text'
        cat "$OUT_DIR/xts.txt"
        echo '```'
    fi
    if [[ $RSS == 1 ]]; then
        echo
        echo "Memory (\`benches/rss.sh\`: fio, 4 connections at QD128 each, 4096-byte sectors; VmHWM = peak RSS, which includes RssFile, the volume pages mapped by reads; peak RssAnon, sampled every 0.1 s, is the daemon's own memory):"
        echo
        echo '```text'
        cat "$OUT_DIR/rss.txt"
        echo '```'
    fi
    if [[ $STARTUP == 1 ]]; then
        echo
        echo "Start-up with the local key provider (\`benches/startup.py\`):"
        echo
        echo '```text'
        cat "$OUT_DIR/startup.txt"
        echo '```'
    fi
}

report >"$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
if [[ $UPDATE_README == 1 ]]; then
    python3 - "$ROOT/README.md" "$OUT_DIR/report.md" <<'EOF'
import sys
readme, report = sys.argv[1], open(sys.argv[2]).read()
s = open(readme).read()
begin, end = "<!-- perf-report:begin -->\n", "<!-- perf-report:end -->"
i, j = s.index(begin) + len(begin), s.index(end)
open(readme, "w").write(s[:i] + report + s[j:])
EOF
    log "README.md updated"
fi
