#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with a Rust toolchain:
# installs what the tests need (apt + pip), then runs formatting, lint and doc-link checks,
# the unit and integration tests (real NBD clients against the real daemon), and the bounded
# fuzz runs.
# The short reliability suite (tests/reliability.rs: 20 crash rounds per mode, fault
# injection, key hygiene, a 1-minute soak; ~2 minutes) is part of `cargo test`; the long one
# is tests/long.sh.
#
#   sudo tests/run.sh            (as root: apt, losetup, mount and FUSE need it)
#
# Env: SKIP_INSTALL=1 (tools already there), NBDCRYPT_SKIP_E2E=1 (no mkfs/mount test),
#      FUZZ_SECONDS=N (per fuzz target, default 20; 0 skips fuzzing).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

log() { printf '[tests %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

APT_PACKAGES=(
    libnbd-bin nbdfuse python3-libnbd nbdkit fio qemu-utils fuse3 e2fsprogs util-linux
    python3-cryptography jq openssl gawk coreutils procps mount
    systemd strace nbd-client python3-prometheus-client python3-seccomp shellcheck bc
)
PIP_PACKAGES=("moto[server]" boto3 cryptography)

# Whether an apt package is there. On Debian 12 `nbdfuse` is a virtual package (libnbd-bin
# provides it) that dpkg never reports as installed, so its command is checked instead; on
# Ubuntu it is a real package, so the name stays in the list.
installed() {
    [[ $1 == nbdfuse ]] && command -v nbdfuse >/dev/null && return 0
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"
}

install_deps() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! python3 -c 'import moto.server, boto3, cryptography' 2>/dev/null; then
        log "pip install ${PIP_PACKAGES[*]}"
        # Debian 12+ marks the system Python as externally managed (PEP 668); these are
        # test-only packages on a CI machine, so install over that marker if pip refuses.
        python3 -m pip install -q "${PIP_PACKAGES[@]}" ||
            python3 -m pip install -q --break-system-packages "${PIP_PACKAGES[@]}"
    fi
    if ! { command -v fio && fio --enghelp=nbd; } >/dev/null 2>&1; then
        log "fio lacks the nbd engine"
        exit 1
    fi
}

[[ ${SKIP_INSTALL:-0} == 1 ]] || install_deps

# Bounded fuzz runs: each target from its committed corpus (fuzz/corpus/<t>, read-only here)
# and seeds; new inputs go to a scratch dir, so the checkout is not modified. Stable toolchain:
# RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z sanitizer flags. -a builds with debug assertions,
# so arithmetic that overflows on hostile input fails here instead of wrapping silently.
run_fuzz() {
    local secs=${FUZZ_SECONDS:-20} t scratch
    ((secs > 0)) || return 0
    command -v cargo-fuzz >/dev/null || { log "cargo install cargo-fuzz"; cargo install cargo-fuzz --locked --quiet; }
    scratch=$(mktemp -d)
    for t in nbd_request nbd_option nbd_handshake header_decode; do
        log "fuzz $t for ${secs}s"
        mkdir -p "$scratch/$t"
        local dirs=("$scratch/$t")
        [[ -d fuzz/corpus/$t ]] && dirs+=("corpus/$t")
        [[ -d fuzz/seeds/$t ]] && dirs+=("seeds/$t")
        if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -a "$t" "${dirs[@]}" -- \
            -max_total_time="$secs" -max_len=16384 -print_final_stats=1 >"$scratch/$t.log" 2>&1); then
            cat "$scratch/$t.log"
            log "fuzz $t found a failure (input saved under fuzz/artifacts/$t)"
            exit 1
        fi
        grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "$scratch/$t.log" || true
    done
    rm -rf "$scratch"
}

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
log "cargo check of the fuzz targets"
# The fuzz crate is its own workspace, so neither clippy nor the tests build it: an API change
# that breaks a target would only show in the fuzz step, ten minutes in. Checked here instead,
# sharing target/ with the build above (12-20 s).
cargo check --quiet --manifest-path fuzz/Cargo.toml --target-dir target --bins
log "cargo doc"
# Broken intra-doc links fail too: a doc comment that names a moved item is wrong.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
log "cargo test"
# Integration tests start daemons and real clients; two at a time fit two cores.
cargo test --all-targets -- --test-threads="${TEST_THREADS:-2}"
log "cargo test --release (the wide cipher's stack hygiene)"
# That the wide XTS leaves no round key in its stack frame holds only for an optimised build
# (an unoptimised one keeps every value on the stack), so that test runs here, in release:
# about 4.5 minutes of building on two cores.
cargo test --release --lib crypto::xts_wide
run_fuzz
log "all tests passed"
