#!/usr/bin/env bash
# Set up (./.venv, Python >= 3.12) and run qlin's whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pip install -q -c scripts/constraints.txt -e '.[test,torch,models,notebooks]'
python -m pytest -q -n 2 --dist loadfile tests "$@"
