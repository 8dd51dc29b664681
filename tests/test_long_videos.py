"""Long videos: hundreds of sampled frames in bounded memory, the tower and the preprocessing in
chunks with the very tokens of an unchunked run, admission by frames, decoding shared fairly."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from conftest import GatewayServer, gateway_settings, running_encoder
from encoder_service.admission import FramesInFlight
from encoder_service.decode_pool import DecodePool
from helpers import data_url, video_chat
from videollm.frame_sampling import FrameSampling
from videollm.settings import CompressionSettings, EncoderSettings
from videos import encode, moving_frames, scene_cut_frames


def to_pixels(engine, frames) -> torch.Tensor:
    return engine.processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]  # [T, 3, 384, 384]


@contextmanager
def chunks_of(vision, frames: int):
    saved, vision.chunk_frames = vision.chunk_frames, frames
    try:
        yield
    finally:
        vision.chunk_frames = saved


@pytest.mark.parametrize("settings", [CompressionSettings(), CompressionSettings(retain_ratio=0.05, max_window=12),
                                      CompressionSettings(method="none")], ids=["defaults", "long segments", "none"])
def test_the_tower_in_chunks_gives_the_tokens_of_one_pass(encoder_service, settings):
    engine = encoder_service.engine
    # 30 frames in still scenes of 10: segments run across the chunk boundaries at 4, 8, 12, ...
    frames = scene_cut_frames(3, 10, 64, 48)
    frames[5:15] = moving_frames(10, 64, 48, seed=2)  # and motion, so that frames merge unevenly
    pixels = to_pixels(engine, frames)
    with chunks_of(engine.vision, 1000):
        whole = engine.vision.encode(pixels, settings)
    with chunks_of(engine.vision, 4):
        chunked = engine.vision.encode(pixels, settings)
    assert torch.equal(chunked.tokens, whole.tokens)
    assert chunked.trace == whole.trace
    if settings.method == "earlytom":
        assert whole.trace.frames_after_merge < 30 and any(a < b for a, b in whole.trace.segments)


@pytest.fixture(scope="module")
def long_video_encoder(tiny_model_dir):
    """An encoder with the default frame limit (1,024) and small chunks."""
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, chunk_frames=16)) as service:
        yield service


LONG_CLIP = encode(moving_frames(300, 64, 48, seed=7), "mp4")  # 12.5 s at 24 fps


def test_preprocessing_in_chunks_gives_the_same_tokens(long_video_encoder, encoder_service):
    sampling, settings = FrameSampling(num_frames=40), CompressionSettings(retain_ratio=0.1)
    chunked = long_video_encoder.engine.encode(LONG_CLIP, sampling, settings)  # chunks of 16
    whole = encoder_service.engine.encode(LONG_CLIP, sampling, settings)  # chunks of 64
    assert torch.equal(chunked.tokens, whole.tokens) and chunked.trace == whole.trace


def test_a_long_video_is_answered_through_rest(long_video_encoder, llm_service, redis_server, clean_redis):
    settings = gateway_settings([long_video_encoder.address], [llm_service.address], redis_server.url)
    with GatewayServer(settings) as gateway:
        body = video_chat(data_url(LONG_CLIP), "What happens?", max_tokens=4,
                          videollm={"fps": 24, "compression": {"retain_ratio": 0.05}})
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    report = response.json()["videollm"]
    assert report["frames"] == 300 and report["sampling"]["frame_indices"] == list(range(300))
    assert report["visual_tokens"] <= 300 * 196 * 0.05 + 300 + 1
    assert report["compression"]["layer_frames"][0] == 300
    assert long_video_encoder.engine.frames_in_flight.taken == 0  # given back


def test_frames_beyond_the_limit_wait_for_room():
    frames = FramesInFlight(100)
    frames.take(70)
    started = threading.Event()

    def second():
        started.set()
        frames.take(40)

    waiter = threading.Thread(target=second)
    waiter.start()
    assert started.wait(5)
    deadline = time.monotonic() + 5
    while frames.waiting != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert frames.taken == 70  # 70 + 40 > 100: it waits
    frames.give_back(70)
    waiter.join(5)
    assert not waiter.is_alive() and frames.taken == 40


def test_a_short_request_does_not_wait_for_every_run_of_a_long_one():
    pool = DecodePool(1)
    order, running, gate = [], threading.Event(), threading.Event()

    def task(name):
        def run():
            if name == "long-0":
                running.set()
                assert gate.wait(5)  # the long request holds the worker while the short one arrives
            order.append(name)
        return run

    long_done = threading.Thread(target=pool.run, args=([task(f"long-{i}") for i in range(20)],))
    long_done.start()
    assert running.wait(5)
    short_done = threading.Thread(target=pool.run, args=([task("short-0"), task("short-1")],))
    short_done.start()
    deadline = time.monotonic() + 5
    while len(pool._turns) < 2:  # the short request queued beside the long one
        assert time.monotonic() < deadline
        time.sleep(0.001)
    gate.set()
    short_done.join(5)
    long_done.join(5)
    # the requests take turns: the short one is done after two more of the long one's 20 tasks
    assert order[:5] == ["long-0", "long-1", "short-0", "long-2", "short-1"]
    assert len(order) == 22


def test_a_failing_task_fails_its_request_only():
    pool = DecodePool(2)

    def boom():
        raise RuntimeError("bad run")

    with pytest.raises(RuntimeError, match="bad run"):
        pool.run([boom] + [lambda: None] * 5)
    done = []
    pool.run([lambda: done.append(1)] * 3)
    assert done == [1, 1, 1]
