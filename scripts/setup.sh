#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian/Ubuntu machine: redis-server (apt), a virtual
# environment in .venv with torch, torchvision and the project (editable, with test extras).
# Sourced by scripts/serve and scripts/test; safe to run again (it skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  pip install -q -r scripts/torch-requirements.txt
fi
pip install -q -e ".[test]"
