# Sourced by scripts/test.sh and scripts/demo.sh: find Python >= 3.12 and activate ./.venv (creating it).
find_python() {
  local cand v p
  for cand in "${QLIN_PYTHON:-}" python3.12 python3.13 python3.14 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && \
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv-managed interpreters that are installed but not the default
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    [ -x "$p" ] && { echo "$p"; return 0; }
  done
  return 1
}

PY=$(find_python) || { echo "qlin: no Python >= 3.12 found; install one or set QLIN_PYTHON" >&2; exit 1; }
VENV=${QLIN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "qlin: creating $VENV with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
