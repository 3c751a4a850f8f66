#!/usr/bin/env bash
# Run the suite against the NEWEST versions pyproject.toml allows (no constraints.txt), in a
# throw-away venv, so that drift in a dependency (a new Typer, Click, Lightning...) shows up here
# before it reaches a user. If it passes, `python scripts/lock.py` from that venv refreshes the lock.
#   bash scripts/check_latest.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python -m venv "$venv"
# torch stays at the pinned CPU build (the only version that installs without CUDA here)
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager -e ".[test,pretrained,docs]"
"$venv/bin/pip" list --format=freeze > "$(dirname "$venv")/versions.txt"
echo "newest allowed versions: $(dirname "$venv")/versions.txt"
"$venv/bin/python" -m pytest "$@"
