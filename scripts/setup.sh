#!/usr/bin/env bash
# Create or refresh .venv with retouch and its test tools, at the exact versions in
# constraints.txt (refresh those with scripts/lock.sh). Idempotent; silent when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.retouch-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[dev,ui]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
  .venv/bin/python - <<'PY'
import importlib.metadata as md, pathlib, sys
want = dict(line.split("==") for line in pathlib.Path("constraints.txt").read_text().split()
            if "==" in line and not line.startswith("#"))
off = [f"{n} {md.version(n)} (want {v})" for n, v in want.items()
       if md.version(n).split("+")[0] != v]
if off:
    sys.exit("scripts/setup.sh: installed versions differ from constraints.txt: " + ", ".join(off))
import retouch, torch, diffusers, transformers  # noqa: E401,F401
PY
  echo "$want" > "$stamp"
fi
# The UI's browser tests drive Debian's Chromium (never a downloaded browser).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver) >/dev/null
  else
    echo "scripts/setup.sh: no chromium/chromedriver; the browser tests will be skipped" \
      "(apt-get install chromium chromium-driver)" >&2
  fi
fi
