#!/usr/bin/env bash
# Installs the project as a user does, `pip install .` with [project.dependencies] only, into its own
# virtual environment (.venv-runtime), then runs the installed CLI once (scripts/smoke_install.py)
# from outside the checkout. A package that shipped code needs but only the test extra brings
# fails here instead of at a user's. Called by scripts/test before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv=.venv-runtime
# CI's clean checkout makes it anew; delete it by hand after removing a dependency
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  # the same builds as scripts/setup.sh
  "$venv/bin/pip" install -q -r scripts/torch-requirements.txt
fi
"$venv/bin/pip" install -q "$repo"
cd "$(mktemp -d)"
"$repo/$venv/bin/python" "$repo/scripts/smoke_install.py"
