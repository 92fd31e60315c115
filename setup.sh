#!/usr/bin/env bash
# Creates .venv and installs palm-rlhf with all extras (web app, BPE, tests, benchmarks).
# torch is pinned through constraints.txt so pip never pulls the multi-GB CUDA wheels;
# the library itself only asks for a range (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
echo "palm-rlhf installed in .venv (activate with: source .venv/bin/activate)"
