#!/usr/bin/env bash
# The official lmms-eval (from PyPI) in an environment of its own, .venv-lmms-eval, for
# tests/test_lmms_eval.py: its OpenAI adapter evaluates the running server as any user would run
# it. It sees .venv's packages (torch, torchvision, transformers: the same builds, not a second
# 5 GB install) through a .pth file, and keeps its own versions of what it pins differently
# (av<16, protobuf) in front of them. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lmms-eval
if [ ! -x "$venv/bin/python" ]; then
  .venv/bin/python -m venv "$venv"
fi
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$site" > "$own/videollm-venv.pth"
# lmms-eval 0.7.3 imports filelock._api, which filelock 4 no longer has; decord: the frame reader
# its openai adapter uses when it sends frames as images (pass_video_url=False)
"$venv/bin/pip" install -q "lmms-eval==0.7.3" "decord==0.6.0" "filelock<4"
