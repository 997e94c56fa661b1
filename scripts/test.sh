#!/usr/bin/env bash
# Set up .venv, check the style (ruff: lint, then format), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
# One pytest worker per core, a test module per worker at a time (its module fixtures are built once):
# the suite is mostly real processes (sweeps, Ray clusters, tracking servers), and one worker leaves a
# third of the CPU idle while they start.
python -m pytest -q -n auto --dist loadfile "$@"
