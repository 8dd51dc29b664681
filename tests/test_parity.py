"""Exactness at full tokens: the disaggregated path equals transformers' monolithic model.

The encoder's tokens must equal `get_video_features` on the same pixels, and a greedy answer
through REST -> encoder -> LLM must equal `LlavaOnevisionForConditionalGeneration.generate`
token for token on the same frames and prompt.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch

from encoder_service.video_decode import decode_video
from helpers import assemble, data_url, video_chat
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc
from videollm import transport
from videollm.proto_mapping import compression_to_proto
from videollm.settings import CompressionSettings
from videos import make_video

FRAMES = 8


@pytest.fixture(scope="module")
def full_model(tiny_model_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def pixels_of(engine, video: bytes, frames: int) -> torch.Tensor:
    decoded = decode_video(video, frames, engine.limits)
    return engine.processor(videos=[decoded.frames], return_tensors="pt")["pixel_values_videos"]  # [1, T, 3, H, W]


NO_COMPRESSION = CompressionSettings(method="none")


def encode_over_grpc(
    address: str, video: bytes, frames: int, compression: CompressionSettings = NO_COMPRESSION
) -> tuple[encoder_pb2.EncodeHeader, torch.Tensor]:
    with grpc.insecure_channel(address) as channel:
        responses = encoder_pb2_grpc.EncoderStub(channel).Encode(transport.encode_inputs(
            encoder_pb2.EncodeRequest(sampling=encoder_pb2.FrameSampling(num_frames=frames),
                                      compression=compression_to_proto(compression)), video))
        header = next(responses).header
        tokens = assemble(header.tensor, (r.chunk.data for r in responses), max_bytes=1 << 30)
    return header, tokens


FULL_TOKEN_SETTINGS = {
    "method none": NO_COMPRESSION,
    "retain 1.0 without prune layers": CompressionSettings(method="earlytom", retain_ratio=1.0, prune_layers=[]),
}


@pytest.mark.parametrize("settings", FULL_TOKEN_SETTINGS.values(), ids=FULL_TOKEN_SETTINGS.keys())
@pytest.mark.parametrize("fmt", ["mp4", "webm", "mov", "avi"])
def test_encoder_tokens_equal_get_video_features(encoder_service, full_model, fmt, settings):
    video = make_video(fmt, n_frames=40, seed=3)
    header, tokens = encode_over_grpc(encoder_service.address, video, FRAMES, settings)
    with torch.inference_mode():
        reference = full_model.model.get_video_features(
            pixels_of(encoder_service.engine, video, FRAMES),
            vision_feature_layer=full_model.config.vision_feature_layer,
            vision_feature_select_strategy=full_model.config.vision_feature_select_strategy,
        ).pooler_output[0]  # [T*196 + 1, D]
    if reference.shape[0] == FRAMES * 196:  # transformers < 5.2x appends the newline later, in forward
        reference = torch.cat([reference, full_model.model.image_newline[None]])
    assert list(header.tensor.shape) == [FRAMES * 196 + 1, full_model.config.text_config.hidden_size]
    assert header.frames_sampled == FRAMES
    if encoder_service.engine.vision.device.type == "cpu":
        assert torch.equal(tokens, reference)
    else:  # on CUDA the service resizes frames and runs compiled layers with CUDA kernels, which round
        # differently from the CPU reference: close, not bit-equal (a wrong token or order is off by ~0.1)
        difference = (tokens - reference).abs().max().item()
        assert torch.allclose(tokens, reference, rtol=1e-2, atol=5e-3), f"max abs difference {difference}"


def test_encoder_samples_frames_uniformly_over_the_whole_clip(encoder_service):
    header, _ = encode_over_grpc(encoder_service.address, make_video("mp4", n_frames=50, seed=4), FRAMES)
    assert list(header.frame_indices) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert header.source_frames == 50
    assert header.source_fps == pytest.approx(24.0)
    assert header.source_duration_s == pytest.approx(50 / 24, abs=0.05)


@pytest.mark.parametrize("compression", [{"method": "none"}, {"retain_ratio": 1.0, "prune_layers": []}],
                         ids=["method none", "retain 1.0 without prune layers"])
def test_greedy_answer_through_rest_equals_monolithic_generate(gateway, encoder_service, full_model, clean_redis,
                                                                compression):
    video = make_video("mp4", n_frames=40, seed=5)
    question = "Describe what happens, then count the moving squares."
    max_tokens = 24
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=video_chat(data_url(video), question, max_tokens=max_tokens,
                        videollm={"num_frames": FRAMES, "compression": compression}),
        timeout=120,
    )
    assert response.status_code == 200, response.text
    answer = response.json()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(full_model.name_or_path)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    video_id = full_model.config.video_token_id
    at = ids.index(video_id)
    expanded = ids[:at] + [video_id] * (FRAMES * 196 + 1) + ids[at + 1 :]  # what the processor does
    with torch.inference_mode():
        generated = full_model.generate(
            input_ids=torch.tensor([expanded]),
            pixel_values_videos=pixels_of(encoder_service.engine, video, FRAMES),
            max_new_tokens=max_tokens,
            do_sample=False,
        )[0, len(expanded) :].tolist()

    assert answer["usage"]["completion_tokens"] == len(generated)
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode(generated, skip_special_tokens=True)
    assert answer["videollm"]["visual_tokens"] == FRAMES * 196 + 1
    assert answer["usage"]["prompt_tokens"] == len(expanded)


def test_encoder_loads_only_the_vision_half(encoder_service, full_model):
    vision = full_model.model.vision_tower, full_model.model.multi_modal_projector
    expected = sum(p.numel() for module in vision for p in module.parameters()) + full_model.model.image_newline.numel()
    total = sum(p.numel() for p in full_model.parameters())
    assert encoder_service.engine.vision.parameter_count() == expected
    assert expected < total
