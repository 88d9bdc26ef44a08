#!/usr/bin/env bash
# Refresh constraints.txt: resolve pyproject.toml's ranges afresh in a throwaway venv and pin
# every package that resolved. Run it, then the README's test command, and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
"${pip[@]}" -e ".[dev,ui]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
{
  echo "# Exact versions the test suite passed with; scripts/setup.sh installs these."
  echo "# Refresh with scripts/lock.sh (then run the tests). The package's own requirements"
  echo "# (pyproject.toml) stay ranges."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
