#!/usr/bin/env bash
# The wheel as a hospital installs it: built from this tree, installed non-editable into a fresh
# venv (no system site-packages, so nothing leaks in from the dev venv), then used from a
# directory outside the repository, so every import and every packaged file must come from the
# wheel itself. Catches a package or data file missing from pyproject/setup.py (fedmed.security once).
# Usage: .ci/wheel_check.sh [python]   (default: python on PATH; needs pip's wheel cache or index)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
py=${1:-python}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$py" -m pip wheel -q --no-deps -w "$tmp/dist" .
"$py" -m venv "$tmp/venv"
# constraints-cpu.txt pins the CPU torch, so the install reuses the cached CPU wheel.
log="$tmp/install.log"
if ! "$tmp/venv/bin/python" -m pip install -q -c constraints-cpu.txt "$tmp"/dist/fedmed-*.whl >"$log" 2>&1; then
  cat "$log"; exit 1
fi

mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
export PATH="$tmp/venv/bin:$PATH"
# The demo's privacy ledger, signing key and site state stay in $tmp, never in ~/.fedmed.
export FEDMED_LEDGER_DIR="$tmp/ledger" FEDMED_KEY_DIR="$tmp/keys" FEDMED_SITE_STATE_DIR="$tmp/sites"
"$tmp/venv/bin/python" - "$repo" <<'PY'
import importlib, pkgutil, sys
import fedmed

repo = sys.argv[1]
assert not fedmed.__file__.startswith(repo), f"fedmed imported from the repo, not the wheel: {fedmed.__file__}"
names = [m.name for m in pkgutil.walk_packages(fedmed.__path__, "fedmed.")]
for name in names:
    importlib.import_module(name)
print(f"wheel check: imported {len(names)} modules from {fedmed.__path__[0]}")
PY
fedmed --help >/dev/null
fedmed site --help >/dev/null
fedmed simulate --quiet --set rounds=2 --output-dir "$tmp/runs"
echo "wheel check: ok"
