"""Every flag `videollm serve` accepts reaches the service that owns the setting.

The stack is started with a non-default value for every one of serve's flags; each value is then
read back from the services themselves (`GET /info`: the gateway's settings and each replica's
Info RPC) and the important ones are observed in behaviour (frame limit, default frames, model
name, API keys, default max_tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from helpers import data_url, video_chat
from test_cli import read_until
from videollm.cli import build_parser
from videollm.flags import serve_flags
from videos import make_video


def non_default_values(tiny_model_dir: Path, redis_url: str, shm_dir: Path) -> dict[str, object]:
    """A value other than the default for every flag of `serve`, keyed by its dest."""
    return {
        # gateway
        "host": "127.0.0.2", "port": free_port(), "model_name": "my-video-model", "api_keys": ["key-one"],
        "redis_url": redis_url, "cache_ttl_s": 1234, "cache_max_entry_bytes": 12_345_678, "upload_ttl_s": 4321,
        "max_upload_bytes": 5_000_000, "max_inline_bytes": 3_000_000, "request_timeout_s": 123.0, "max_in_flight": 7,
        "direct_pull": False, "fetch_urls": True, "fetch_timeout_s": 12.0, "fetch_allow": ["10.1.2.0/24"],
        "resolve_interval_s": 1.5, "local_video_roots": [str(shm_dir)], "presets": {"r0.3": {"retain_ratio": 0.3}},
        # encoder and LLM
        "model": str(tiny_model_dir), "device": "cpu:0", "dtype": "float32", "max_concurrent": 5,
        "pull_shm_dir": str(shm_dir), "drain_s": 12.0,
        # gateway and encoder
        "video_store_dir": str(shm_dir / "videos"),
        # encoder
        "default_frames": 6, "max_frames": 24, "chunk_frames": 16, "max_frames_in_flight": 48,
        "batch_max_requests": 2, "batch_max_frames": 48, "max_video_bytes": 4_000_000,
        "max_duration_s": 600.0, "max_frame_pixels": 1920 * 1080, "pull_buffer_bytes": 64 << 20, "pull_ttl_s": 10.0,
        "compression__method": "none", "compression__retain_ratio": 0.3, "compression__tau": 0.4,
        "compression__max_window": 5, "compression__ema": 0.8, "compression__prune_layers": [4, 12],
        "compression__d": 0.1, "compression__k": 5, "compression__beta": 0.5,
        # LLM
        "decode_slots": 3, "default_max_tokens": 9, "max_tokens_limit": 100, "max_context_tokens": 4096,
        "max_visual_bytes": 64 << 20, "prefix_cache_entries": 2, "pull_timeout_s": 3.0,
    }


# the settings that several services own: each of them gets the flag's value
SHARED = {"model": ("encoder", "llm"), "device": ("encoder", "llm"), "dtype": ("encoder", "llm"),
          "max_concurrent": ("encoder", "llm"), "pull_shm_dir": ("gateway", "encoder", "llm"),
          "video_store_dir": ("gateway", "encoder"), "drain_s": ("gateway", "encoder", "llm")}


def as_argv(flag, value) -> list[str]:
    if isinstance(value, bool):
        return [flag.option if value else flag.option.replace("--", "--no-", 1)]
    if isinstance(value, list):
        return [flag.option, ",".join(map(str, value))]
    if isinstance(value, dict):
        return [flag.option, json.dumps(value)]
    return [flag.option, str(value)]


def reported(info: dict, owner: str, path: tuple[str, ...]):
    section = info["gateway"] if owner == "gateway" else next(iter(info[owner + "s"].values()))
    for part in path:
        section = section[part]
    return section


def test_every_serve_flag_is_covered_and_differs_from_its_default(tiny_model_dir, tmp_path):
    values = non_default_values(tiny_model_dir, "redis://127.0.0.1:1/0", tmp_path)
    flags = serve_flags()
    assert set(values) == {flag.dest for flag in flags}, "give every new serve flag a non-default value here"
    for flag in flags:
        assert values[flag.dest] != flag.field.default, flag.dest
        build_parser().parse_args(["serve", *as_argv(flag, values[flag.dest])])  # each one parses


def test_each_setting_has_one_owner_but_the_shared_ones():
    owners = {flag.dest: flag.owners for flag in serve_flags()}
    assert {dest: owner for dest, owner in owners.items() if len(owner) > 1} == SHARED
    assert owners["max_frames"] == ("encoder",)  # the gateway checks the encoder's limit (its Info)
    assert owners["default_frames"] == ("encoder",)


def test_serve_passes_every_flag_to_the_services_that_own_it(tiny_model_dir, redis_server, tmp_path):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    values = non_default_values(tiny_model_dir, redis_server.url, shm_dir)
    argv = [arg for flag in serve_flags() for arg in as_argv(flag, values[flag.dest])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOLLM_") and k != "REDIS_URL"}
    process = subprocess.Popen([sys.executable, "-m", "videollm.cli", "--log-level", "WARNING", "serve", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.2:{values['port']}"
    auth = {"Authorization": "Bearer key-one"}
    try:
        read_until(process, r"serving on http://127\.0\.0\.2:\d+ ", 300)
        info = httpx.get(f"{base}/info", headers=auth, timeout=30).json()
        for flag in serve_flags():
            expected = values[flag.dest]
            for owner in flag.owners:
                if flag.dest == "api_keys":  # a secret: never reported, so observed below
                    assert "api_keys" not in info["gateway"]
                    continue
                assert reported(info, owner, flag.path) == expected, (flag.option, owner)

        # and in behaviour
        assert httpx.get(f"{base}/info", timeout=30).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=auth, timeout=30).json()["data"][0]["id"] == "my-video-model"
        video = data_url(make_video("mp4", seed=5, n_frames=40))
        too_many = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=120, json=video_chat(
            video, model="my-video-model", videollm={"num_frames": 32}))
        assert too_many.status_code == 400
        assert "num_frames: must be at most 24" in too_many.json()["error"]["message"]
        served = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=120, json=video_chat(
            video, model="my-video-model", videollm={"num_frames": 16}))
        assert served.status_code == 200, served.text
        assert served.json()["videollm"]["frames"] == 16
        body = video_chat(video, model="my-video-model")
        del body["max_tokens"]
        default = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=120, json=body).json()
        assert default["videollm"]["frames"] == 6  # default_frames
        assert default["videollm"]["visual_tokens"] == 6 * 196 + 1  # compression method none
        assert default["usage"]["completion_tokens"] <= 9  # default_max_tokens
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0


@pytest.mark.parametrize("argv, message", [
    (["--max-frames", "0"], "max_frames"),
    (["--default-frames", "40", "--max-frames", "24"], "default_frames (40) must be at most max_frames (24)"),
    (["--compression-retain-ratio", "7"], "retain_ratio"),
])
def test_serve_refuses_bad_settings_before_starting_anything(argv, message):
    result = subprocess.run([sys.executable, "-m", "videollm.cli", "serve", "--port", str(free_port()), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
