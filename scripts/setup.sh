#!/usr/bin/env bash
# Create or refresh .venv with retouch and its test tools. Idempotent; silent when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.retouch-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  # A CPU build of torch: an unpinned torch would pull a multi-GB CUDA build. Keep one that works.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[dev]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
  .venv/bin/python -c "import retouch, torch, diffusers, transformers"
  echo "$want" > "$stamp"
fi
