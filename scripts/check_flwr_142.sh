#!/usr/bin/env bash
# Repeat the Flower 1.42 check: a separate venv with this checkout and flwr 1.42.0, then
# the Flower simulation tests and a real local deployment (TLS + SuperNode auth).
#
#   bash scripts/check_flwr_142.sh [VENV_DIR]        (default /tmp/venv142)
#
# flwr 1.42.0 requires certifi>=2026.10.19; where the package index has no such certifi
# yet, flwr is installed with --no-deps on top of the 1.41 dependency set (which is what
# this script does; the dependency sets of 1.41 and 1.42 differ only in that pin).
# Nothing is installed into the project's own venv. Takes ~10 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/venv142}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r requirements-cpu.txt -e ".[test]"
fi
"$venv/bin/pip" install -q --no-deps flwr==1.42.0
"$venv/bin/python" -c 'import flwr, importlib.metadata as m; print("flwr", m.version("flwr"))'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$venv/bin/pytest" -q tests/test_deploy_units.py tests/test_deploy_local.py
"$venv/bin/pytest" -q tests/test_flower_simulation.py
# a deployment of the sgs-flower app itself through the new command
"$venv/bin/python" -m sgs_flower.cli deploy local --app . --supernodes 3 \
    --run-config 'preset="distributed-dp" num-server-rounds=2 min-survivors=3' | tail -n 3
if [ "${CHECK_APP_FLWR_RUN:-0}" = 1 ]; then  # the README's `flwr run .` (slow: ~10 min)
  "$venv/bin/pytest" -q tests/test_app_flwr_run.py
fi
