#!/usr/bin/env bash
# Set up (./.venv, Python >= 3.12) and run the main job: `qlin demo` (extra args are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pip install -q -c scripts/constraints.txt -e .
qlin info
qlin demo "$@"
