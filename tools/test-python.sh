#!/usr/bin/env bash
# The tests that run in Python: the Python module's (builds the wheel with maturin, installs
# it into a fresh virtual environment under target/, runs crates/nulltext-py/tests with
# pytest) and the Kubernetes job files read into the Kubernetes API's types
# (tools/check_k8s.py). The module's results are compared with the command line's, so
# `cargo build` (or `cargo test --workspace`) must have built target/debug/nulltext first.
# Needs python3 (≥ 3.9) with venv and pip, and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=target/python-test-venv
wheels=target/python-test-wheels
rm -rf "$venv" "$wheels"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "maturin>=1.9,<2" "pytest>=7" "safetensors>=0.4" numpy pillow \
    kubernetes pyyaml
# The dev profile: the workspace's dependencies are optimized in it too (Cargo.toml).
"$venv/bin/maturin" build --quiet --profile dev --locked -m crates/nulltext-py/Cargo.toml -o "$wheels"
"$venv/bin/pip" install --quiet "$wheels"/nulltext-*.whl
NULLTEXT_CLI=${NULLTEXT_CLI:-target/debug/nulltext} "$venv/bin/pytest" -q crates/nulltext-py/tests
"$venv/bin/python" tools/check_k8s.py
