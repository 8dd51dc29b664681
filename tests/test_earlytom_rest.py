"""EarlyTom through the real REST gateway, checked against the independent reference.

The request goes through the whole stack (gateway -> encoder and LLM over gRPC, Redis). The test
then runs the same tiny model on the same decoded frames in this process, captures the hidden
states of every SigLIP layer, and recomputes Stage I (segments and fusions at every prune layer,
the final segments) and Stage II (tokens per frame, kept positions) with earlytom_reference.py,
which never calls encoder_service.earlytom. The REST answer's `segments`, `frames_after_merge`,
`kept` and `visual_tokens` must equal the reference's.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from earlytom_reference import DEPTH, captured, ref_stage1, ref_stage2, to_pixels
from encoder_service.video_decode import decode_video
from helpers import data_url, video_chat
from videollm.settings import CompressionSettings
from videos import encode, moving_frames, scene_cut_frames

FRAMES = 16
TIMEOUT = 120


def cuts_and_stills() -> np.ndarray:
    """32 frames: motion, a still stretch, a cut to a scene that changes every 3 frames, motion, then
    a cut to a still scene. Sampled to 16 frames, the default settings cut segments by the window at
    some frames and by tau at others."""
    frames = moving_frames(32, seed=5)
    frames[6:14] = frames[6]
    frames[14:20] = scene_cut_frames(2, 3)
    frames[24:32] = scene_cut_frames(3, 8)[16:24]
    return frames


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode(cuts_and_stills(), "mp4")  # lossy, as real clips are


def rest_answer(gateway, clip: bytes, retain_ratio: float) -> dict:
    body = video_chat(data_url(clip), videollm={"num_frames": FRAMES, "compression": {"retain_ratio": retain_ratio}},
                      max_tokens=4)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["videollm"]


@pytest.mark.parametrize("retain_ratio", [0.2, 0.1])
def test_the_rest_answer_equals_the_reference_recomputed_from_the_hidden_states(
        gateway, encoder_service, clean_redis, clip, retain_ratio):
    info = rest_answer(gateway, clip, retain_ratio)
    settings = CompressionSettings(**info["compression"]["settings"])
    assert settings == CompressionSettings(retain_ratio=retain_ratio)  # everything else at the defaults

    # the same frames, in this process: sampled as the method says, decoded and preprocessed as the encoder does
    engine = encoder_service.engine
    decoded = decode_video(clip, FRAMES, engine.limits)
    sampled = np.floor(np.linspace(0, decoded.source_frames - 1, FRAMES)).astype(int).tolist()
    assert info["frames"] == FRAMES and info["source"]["frame_indices"] == sampled == list(decoded.frame_indices)
    with captured(engine.vision) as capture:
        engine.vision.encode(to_pixels(engine, decoded.frames), settings)
    stage1 = ref_stage1(capture, settings, FRAMES)
    stage2 = ref_stage2(engine.vision, capture, settings, FRAMES, stage1)

    # the clip exercises both cuts and leaves several segments
    first_prune = settings.scaled_prune_layers(DEPTH)[0]
    assert {"window", "tau"} <= set(stage1.layer_reasons[first_prune]), stage1.layer_reasons
    assert len(stage1.segments) > 1 and stage1.frames_after_merge < FRAMES

    assert info["segments"] == [list(segment) for segment in stage1.segments]
    assert info["frames_after_merge"] == stage1.frames_after_merge
    assert info["compression"]["layer_frames"] == stage1.layer_frames
    assert info["compression"]["tokens_per_frame"] == stage2.n
    assert info["visual_tokens"] == stage1.frames_after_merge * stage2.n + 1
    stage2.assert_kept(info["kept"])  # equal; a frame may differ only where two scores tie to float rounding
