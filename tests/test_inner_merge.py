"""EarlyTom Stage III in the LLM: visual tokens merged at one decoder layer, per request."""

from __future__ import annotations

import pytest
import torch

from llm_service.engine import Delta, GenerateRequestError, GenerationRequest
from llm_service.inner_merge import merge_visual_tokens
from llm_service.prompt import VIDEO, Message
from llm_service.sampling import SamplingParams
from videollm.settings import InnerCompressionSettings


def test_kept_tokens_are_the_top_scored_and_dropped_ones_are_averaged_into_the_most_similar():
    hidden = torch.tensor([[9.0, 9.0],  # text
                           [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9],  # 4 visual tokens
                           [7.0, 7.0]])  # text
    scores = torch.tensor([0.5, 0.1, 0.3, 0.2])
    merged, index = merge_visual_tokens(hidden, scores, start=1, keep=2)
    assert index.tolist() == [0, 1, 3, 5]  # positions of the rows that remain, in order
    assert torch.equal(merged[0], hidden[0]) and torch.equal(merged[-1], hidden[-1])
    assert torch.allclose(merged[1], (hidden[1] + hidden[2]) / 2)  # token 2 joins token 1
    assert torch.allclose(merged[2], (hidden[3] + hidden[4]) / 2)  # token 4 joins token 3


def test_default_layer_scales_with_depth_and_bad_values_are_refused():
    assert InnerCompressionSettings().resolve(28) == InnerCompressionSettings(layer=18, drop_ratio=0.5)
    assert InnerCompressionSettings().resolve(2).layer == 1
    assert InnerCompressionSettings(drop_ratio=0.25).resolve(14) == InnerCompressionSettings(layer=9, drop_ratio=0.25)
    assert InnerCompressionSettings(layer=5).resolve(28).layer == 5  # a given layer is kept
    with pytest.raises(ValueError, match=r"inner_compression.layer must be in 1..1 for this 2-layer LLM"):
        InnerCompressionSettings(layer=2).resolve(2)
    with pytest.raises(ValueError, match="drop_ratio"):
        InnerCompressionSettings(layer=18, drop_ratio=1.5)


def run(engine, visual, inner, max_tokens=6):
    request = GenerationRequest([Message("user", (VIDEO, "What happens?"))], SamplingParams(max_tokens=max_tokens),
                                visual=visual, inner=inner)
    events = list(engine.generate(request))
    return "".join(e.text for e in events if isinstance(e, Delta)), events[-1]


def rows_entering(engine, layer: int, inner, visual) -> list[int]:
    """Rows of the hidden state that reach the MLP of `layer`: the prompt's, then one per decode step."""
    rows = []
    down = engine.lm.model.model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        run(engine, visual, inner)
    finally:
        handle.remove()
    return rows


def test_layers_from_k_run_on_the_shorter_sequence_and_decoding_continues(llm_service):
    engine = llm_service.engine
    visual = torch.randn(200, engine.lm.hidden_size, generator=torch.Generator().manual_seed(3))
    full = rows_entering(engine, 1, None, visual)
    inner = InnerCompressionSettings(layer=1, drop_ratio=0.75)
    merged = rows_entering(engine, 1, inner, visual)
    assert merged[0] == full[0] - 150  # 200 visual tokens, 50 kept
    assert merged[1:] == full[1:] == [1] * (len(full) - 1)  # one token per decode step
    assert rows_entering(engine, 0, inner, visual)[0] == full[0]  # layers before k see everything
    text, final = run(engine, visual, inner)
    assert final.finish_reason == "length" or final.completion_tokens < 6
    assert run(engine, visual, inner)[0] == text  # deterministic


def test_stage_three_needs_a_video_and_a_valid_layer(llm_service):
    engine = llm_service.engine
    with pytest.raises(GenerateRequestError, match="needs a video"):
        next(engine.generate(GenerationRequest([Message("user", ("Hi",))], SamplingParams(max_tokens=2),
                                                   inner=InnerCompressionSettings())))
    with pytest.raises(GenerateRequestError, match="inner_compression.layer must be in"):
        next(engine.generate(GenerationRequest([Message("user", (VIDEO, "Hi"))], SamplingParams(max_tokens=2),
                                               visual=torch.zeros(4, engine.lm.hidden_size),
                                               inner=InnerCompressionSettings(layer=5))))


def test_stage_three_is_enabled_per_request_through_rest(gateway, clean_redis):
    import httpx

    from helpers import data_url, video_chat
    from videos import make_video

    video = data_url(make_video("mp4", seed=81))
    answers = {}
    for name, inner in {"off": None, "on": {"drop_ratio": 0.9}}.items():
        body = video_chat(video, max_tokens=8, videollm={"num_frames": 4, "inner_compression": inner})
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    assert answers["on"]["videollm"]["cache"] == "hit"  # Stage III does not change the encoder's tokens
    bad = video_chat(video, videollm={"num_frames": 4, "inner_compression": {"layer": 7}})
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=bad, timeout=120)
    assert response.status_code == 400 and "inner_compression.layer must be in" in response.json()["error"]["message"]
