#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with a Rust toolchain:
# installs what the tests need (apt + pip), then runs formatting and lint checks, the unit
# and integration tests (real NBD clients against the real daemon), and the bounded fuzz runs.
#
#   sudo tests/run.sh            (as root: apt, losetup, mount and FUSE need it)
#
# Env: SKIP_INSTALL=1 (tools already there), NBDCRYPT_SKIP_E2E=1 (no mkfs/mount test).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

log() { printf '[tests %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

APT_PACKAGES=(
    libnbd-bin nbdfuse python3-libnbd nbdkit fio qemu-utils fuse3 e2fsprogs util-linux
    python3-cryptography jq openssl gawk coreutils procps
)
PIP_PACKAGES=("moto[server]" boto3 cryptography)

install_deps() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
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
    command -v fio >/dev/null && fio --enghelp=nbd >/dev/null 2>&1 || { log "fio lacks the nbd engine"; exit 1; }
}

[[ ${SKIP_INSTALL:-0} == 1 ]] || install_deps

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
log "cargo test"
# Integration tests start daemons and real clients; two at a time fit two cores.
cargo test --all-targets -- --test-threads="${TEST_THREADS:-2}"
log "all tests passed"
