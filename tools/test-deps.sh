#!/usr/bin/env bash
# Installs what the tests need besides Rust, on a fresh machine too, where it is missing:
# headless Chromium for the web page's test (crates/nulltext-serve/tests/browser.rs),
# Debian's `chromium` package; Slurm; a C++20 compiler. The README's test command and
# .ci/run both call it before `cargo test --workspace`.
set -euo pipefail

# Installs Debian packages `$3…` for `$1` (a test), or, without apt-get, prints `$2` (what
# to do instead) and fails.
apt_install() {
    local for=$1 otherwise=$2
    shift 2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test-deps.sh: $otherwise" >&2
        exit 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing $* (for $for)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "$@" >/dev/null
}

have_chromium() {
    [ -n "${NULLTEXT_CHROMIUM:-}" ] && return 0
    command -v chromium || command -v chromium-browser || command -v google-chrome
} >/dev/null 2>&1
if ! have_chromium; then
    apt_install crates/nulltext-serve/tests/browser.rs \
        "the web page's test needs headless Chromium: install it, or set NULLTEXT_CHROMIUM to a Chromium binary" \
        chromium
fi

# --- Slurm (crates/nulltext-cli/tests/slurm.rs) ----------------------------------------
# Debian's slurm-wlm and munge: the test starts its own one-node cluster with
# tools/slurm-local.sh (nothing system-wide is configured or started here). Where they
# cannot be installed, set NULLTEXT_SKIP_SLURM=1 to skip that test explicitly.
have_slurm() {
    for bin in munged slurmctld slurmd sbatch; do
        command -v "$bin" || [ -x "/usr/sbin/$bin" ] || return 1
    done
} >/dev/null 2>&1
if [ "${NULLTEXT_SKIP_SLURM:-}" != 1 ] && ! have_slurm; then
    apt_install crates/nulltext-cli/tests/slurm.rs \
        "the Slurm test needs slurm-wlm and munge: install them, or set NULLTEXT_SKIP_SLURM=1 to skip it" \
        slurm-wlm munge
fi

# --- A C++20 compiler (crates/nulltext-models/src/fused/emulator.rs) --------------------
# The CUDA kernels' tests build kernels.cu for the host with `$CXX` (default `c++`):
# Debian's g++ (≥ 12) where none is there.
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
    apt_install crates/nulltext-models/src/fused/emulator.rs \
        "the CUDA kernels' CPU tests need a C++20 compiler: install g++ (≥ 12) or clang++ (≥ 16), or set CXX to one" \
        g++
fi
