#!/usr/bin/env bash
# Create .venv with Python 3.12 (megatron-core >= 0.17 needs it) and install deltatron with its
# dev extras. Idempotent: re-running only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python312() {
  local c v
  # 1. python3.12 on PATH (a pyenv shim answers only when 3.12 is selected, so test it runs)
  for c in python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1; then
      v=$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
      if [ "$v" = "3.12" ]; then command -v "$c"; return 0; fi
    fi
  done
  # 2. a pyenv-installed 3.12
  if command -v pyenv >/dev/null 2>&1; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python3.12" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0
    fi
  fi
  # 3. usual install locations
  for c in /usr/local/bin/python3.12 /usr/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python312); then
    echo "setup: no Python 3.12 interpreter found (megatron-core 0.19.2 needs Python 3.12)." >&2
    echo "setup: install one (e.g. 'pyenv install 3.12' or your distribution's python3.12) and rerun." >&2
    exit 1
  fi
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.deltatron-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing deltatron and its dependencies into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import deltatron, torch, megatron.core; print('setup: ready (torch', torch.__version__, '| megatron-core', megatron.core.__version__ + ')')"
