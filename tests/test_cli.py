"""The `videollm` command as a user runs it: serve the whole stack, build the default model."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port
from helpers import data_url, video_chat
from videollm.cli import build_parser
from videollm.tiny_model import build_tiny_model
from videos import make_video


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def read_until(process: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"{pattern!r} not printed; output was:\n{''.join(seen)}")


def test_serve_builds_the_default_model_answers_and_stops_every_child(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no model there yet: serve must build it
    process = subprocess.Popen(
        [sys.executable, "-m", "videollm.cli", "--log-level", "WARNING", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        match = read_until(process, r"serving on http://127\.0\.0\.1:(\d+) .*Redis redis://127\.0\.0\.1:(\d+)", 300)
        assert int(match.group(1)) == port
        redis_port = int(match.group(2))
        assert (tmp_path / "cache" / "videollm" / "tiny-llava-onevision" / "config.json").is_file()
        body = video_chat(data_url(make_video("mp4", seed=41)), videollm={"num_frames": 4})
        first = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        second = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert (first.status_code, second.status_code) == (200, 200)
        assert second.headers["x-videollm-cache"] == "hit"  # the stack's own Redis is used
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).json()["status"] == "ready"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0
    assert not listening(port) and not listening(redis_port)


def test_the_default_model_is_built_deterministically(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = build_tiny_model(tmp_path / name)
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest()
                        for f in ("model.safetensors", "tokenizer.json", "config.json")})
    assert digests[0] == digests[1]


def test_the_default_model_keeps_the_real_token_layout(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers) == (384, 14, 26)
    assert (vision.image_size // vision.patch_size) ** 2 == 729


@pytest.mark.parametrize("argv", [
    ["encoder", "--port", "0", "--device", "cpu", "--max-frames", "16"],
    ["llm", "--dtype", "float32", "--max-tokens-limit", "100"],
    ["gateway", "--encoders", "a:1,b:2", "--llms", "c:3"],
    ["serve", "--port", "8001"],
    ["build-tiny-model", "/tmp/x"],
])
def test_every_subcommand_parses_its_flags(argv):
    assert build_parser().parse_args(argv).command == argv[0]
