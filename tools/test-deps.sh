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
