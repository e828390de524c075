#!/usr/bin/env bash
# Migration throughput, side by side on the same random image in the same run:
#   nbdcrypt migrate        plain file -> new encrypted volume file
#   nbdcopy --flush         plain file -> the export of `nbdcrypt serve` (same sizes)
#   nbdcrypt encrypt        in place (datashift)
#   cryptsetup reencrypt --encrypt --reduce-device-size 32M   in place (LUKS2 datashift)
#   nbdcrypt reencrypt      in place, new key
#   cryptsetup reencrypt    in place, new key (LUKS2, default resilience)
# Prints MiB/s (median of REPS runs) and each one's ratio to `nbdcrypt migrate`.
#
#   benches/migrate.sh                 (needs a release build: cargo build --release)
# Env: SIZE_MIB=512 REPS=3 DIR=/tmp/nbdcrypt-bench  BIN=target/release/nbdcrypt
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-512}
REPS=${REPS:-3}
DIR=${DIR:-/tmp/nbdcrypt-bench}
BIN=${BIN:-$PWD/target/release/nbdcrypt}
[[ -x $BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"
export NBDCRYPT_LOG=warn

head -c "${SIZE_MIB}M" /dev/urandom > plain.img
"$BIN" genkey k.kek >/dev/null
printf '0123456789abcdef0123456789abcdef' > pass
CS_OPTS=(--batch-mode --key-file pass --pbkdf pbkdf2 --pbkdf-force-iterations 1000)

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo "FAILED: $*" >&2; exit 1; }; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
fresh() { rm -f "$1"; truncate -s "$((SIZE_MIB + $2))M" "$1"; }

b_migrate() { fresh t.img 5; secs "$BIN" migrate --from plain.img --to t.img --key local:k.kek; }
b_nbdcopy() {
    fresh s.img 5
    "$BIN" format s.img --key local:k.kek >/dev/null 2>&1
    local port=$((20000 + RANDOM % 20000))
    "$BIN" serve s.img --kek-file k.kek --export b --listen "127.0.0.1:$port" 2>/dev/null &
    local pid=$!
    for _ in $(seq 100); do nbdinfo "nbd://127.0.0.1:$port/b" >/dev/null 2>&1 && break; sleep 0.05; done
    secs nbdcopy --flush plain.img "nbd://127.0.0.1:$port/b"
    kill "$pid"; wait "$pid" || true
}
b_encrypt() { cp plain.img e.img; truncate -s "+5M" e.img; secs "$BIN" encrypt e.img --key local:k.kek --yes; }
b_cs_encrypt() {
    cp plain.img c.img; truncate -s +32M c.img
    secs cryptsetup reencrypt --encrypt --type luks2 --reduce-device-size 32M "${CS_OPTS[@]}" c.img
}
b_reencrypt() { secs "$BIN" reencrypt t.img --key local:k.kek; }
b_cs_reencrypt() { secs cryptsetup reencrypt --force-offline-reencrypt "${CS_OPTS[@]}" c.img; }

declare -A T
names=(migrate nbdcopy encrypt cs_encrypt reencrypt cs_reencrypt)
for r in $(seq "$REPS"); do
    for n in "${names[@]}"; do
        if [[ $n == cs_* ]] && ! command -v cryptsetup >/dev/null; then continue; fi
        T[$n]+="$("b_$n") "
    done
    echo "rep $r done" >&2
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(echo "${T[migrate]}" | median)
printf '| %-52s | %8s | %8s | %s |\n' "what (${SIZE_MIB} MiB, random data, median of $REPS)" "seconds" "MiB/s" "vs migrate"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..54})" "----------" "----------" "------------"
label() {
    case $1 in
        migrate) echo "nbdcrypt migrate (file -> new volume)" ;;
        nbdcopy) echo "nbdcopy --flush (file -> nbdcrypt serve export)" ;;
        encrypt) echo "nbdcrypt encrypt (in place, datashift)" ;;
        cs_encrypt) echo "cryptsetup reencrypt --encrypt --reduce-device-size" ;;
        reencrypt) echo "nbdcrypt reencrypt (in place, new key)" ;;
        cs_reencrypt) echo "cryptsetup reencrypt (in place, new key)" ;;
    esac
}
for n in "${names[@]}"; do
    [[ -n ${T[$n]:-} ]] || continue
    m=$(echo "${T[$n]}" | median)
    printf '| %-52s | %8.2f | %8.0f | %10.2fx |\n' "$(label "$n")" "$m" "$(echo "$SIZE_MIB / $m" | bc -l)" "$(echo "$base / $m" | bc -l)"
done
