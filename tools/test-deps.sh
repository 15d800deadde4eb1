#!/usr/bin/env bash
# Installs what the tests need besides Rust, on a fresh machine too: headless Chromium for
# the web page's test (crates/nulltext-serve/tests/browser.rs), Debian's `chromium` package,
# when it is missing. The README's test command and .ci/run both call it before
# `cargo test --workspace`.
set -euo pipefail
have_chromium() {
    [ -n "${NULLTEXT_CHROMIUM:-}" ] && return 0
    command -v chromium || command -v chromium-browser || command -v google-chrome
} >/dev/null 2>&1
if ! have_chromium; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test-deps.sh: the web page's test needs headless Chromium: install it, or set" \
             "NULLTEXT_CHROMIUM to a Chromium binary" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing chromium (for crates/nulltext-serve/tests/browser.rs)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq chromium >/dev/null
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
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test-deps.sh: the Slurm test needs slurm-wlm and munge: install them, or set" \
             "NULLTEXT_SKIP_SLURM=1 to skip it" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing slurm-wlm and munge (for crates/nulltext-cli/tests/slurm.rs)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# --- A C++20 compiler (crates/nulltext-models/src/fused/emulator.rs) --------------------
# The CUDA kernels' tests build kernels.cu for the host with `$CXX` (default `c++`):
# Debian's g++ (≥ 12) where none is there.
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test-deps.sh: the CUDA kernels' CPU tests need a C++20 compiler: install" \
             "g++ (≥ 12) or clang++ (≥ 16), or set CXX to one" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing g++ (for crates/nulltext-models/src/fused/emulator.rs)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq g++ >/dev/null
fi
