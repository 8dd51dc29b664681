"""Continuous batching and the hand-written forward passes over the static KV cache."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llm_service.engine import Delta, Final, GenerationRequest
from llm_service.inner_merge import merge_visual_tokens
from llm_service.prompt import VIDEO, Message
from llm_service.runner import ModelRunner, StageThree
from llm_service.sampling import SamplingParams
from videollm.settings import InnerCompressionSettings


def visual_tokens(engine, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, engine.lm.hidden_size, generator=torch.Generator().manual_seed(seed))  # [N, D]


def request_for(engine, index: int, max_tokens: int) -> GenerationRequest:
    """A mix: text-only chats, videos of different sizes, Stage III, sampling with a seed."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.8 if index % 4 == 3 else 0.0, seed=index)
    if index % 3 == 0:
        return GenerationRequest([Message("user", (f"Tell me a story number {index}.",))], sampling)
    inner = InnerCompressionSettings(layer=1) if index % 5 == 1 else None
    return GenerationRequest([Message("user", (VIDEO, f"What happens in part {index}?"))], sampling,
                             visual=visual_tokens(engine, 40 + 37 * index, seed=index), inner=inner)


def wait_until_idle(engine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.batcher.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.active == 0, "finished requests still hold decode slots"


def run(engine, request: GenerationRequest) -> tuple[str, Final]:
    events = list(engine.generate(request))
    return "".join(e.text for e in events if isinstance(e, Delta)), events[-1]


@pytest.fixture
def endless(llm_service):
    """Answers end at max_tokens only, so each request's length is known."""
    engine = llm_service.engine
    saved = engine.lm.eos_token_ids
    engine.lm.eos_token_ids = set()
    yield engine
    engine.lm.eos_token_ids = saved


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(endless):
    engine = endless
    count = 10
    lengths = [12 + 5 * (i % 4) for i in range(count)]  # they finish at different steps: slots are refilled
    alone = [run(engine, request_for(engine, i, lengths[i])) for i in range(count)]
    steps = engine.runner.steps
    together: list = [None] * count
    barrier = threading.Barrier(count)

    def worker(i):
        barrier.wait()
        together[i] = run(engine, request_for(engine, i, lengths[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert [final.completion_tokens for _, final in together] == lengths
    # Alone, each answer of n tokens takes n - 1 decode steps; together they share steps.
    assert engine.runner.steps - steps < sum(n - 1 for n in lengths) // 2
    wait_until_idle(engine)  # every slot is given back


def test_more_requests_than_slots_wait_for_a_slot(tiny_model_dir):
    from llm_service.engine import LLMEngine
    from videollm.settings import LLMSettings

    engine = LLMEngine(LLMSettings(model=tiny_model_dir, port=0, decode_slots=2, max_context_tokens=2048))
    engine.lm.eos_token_ids = set()
    alone = [run(engine, request_for(engine, i, 16))[0] for i in range(5)]
    results: list = [None] * 5
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(engine, request_for(engine, i, 16))))
               for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [text for text, _ in results] == alone
    assert max(final.queue_ms for _, final in results) > 0.0


@pytest.mark.parametrize("prompt", [247, 2100])  # one prompt chunk / layer by layer with causal attention
def test_the_runner_decodes_as_transformers_does_across_key_buckets(llm_service, prompt):
    """Greedy tokens from the runner equal transformers' generate while the keys cross a bucket edge."""
    engine = llm_service.engine
    lm, runner = engine.lm, engine.runner
    assert (prompt <= runner.prompt_buckets[-1]) == (prompt == 247)
    embeds = lm.model.get_input_embeddings()(torch.arange(3, 3 + prompt)[None] % 200)  # [1, L, D]
    new_tokens = 30  # 247 -> 277 keys: crosses the 256 bucket
    with torch.inference_mode():
        expected = lm.model.generate(inputs_embeds=embeds, max_new_tokens=new_tokens, do_sample=False,
                                     min_new_tokens=new_tokens, pad_token_id=0)[0].tolist()
    wait_until_idle(engine)  # the batcher is idle: this test borrows slot 0
    with torch.inference_mode():
        logits = runner.prefill(0, embeds[0], 0)
        tokens = [int(logits.argmax())]
        for _ in range(new_tokens - 1):
            tokens.append(int(runner.decode(1, tokens[-1:])[0].argmax()))
        runner.free(0)
    assert tokens == expected[-new_tokens:]


def test_stage_three_prefill_matches_a_reference_built_from_transformers_layers(llm_service):
    engine = llm_service.engine
    lm, runner = engine.lm, engine.runner
    model = lm.model.model
    start, count = 5, 60
    embeds = model.embed_tokens(torch.arange(2, 2 + 80) % 900)  # [80, D], rows 5..64 stand for visual tokens
    settings = InnerCompressionSettings(layer=1, drop_ratio=0.5)
    with torch.inference_mode():
        # Reference: layer 0 through transformers on the full sequence, the merge, layer 1 on the rest.
        positions = torch.arange(80)[None]
        hidden = embeds[None]
        cos, sin = model.rotary_emb(hidden, positions)
        layer0 = model.layers[0]
        from llm_service.inner_merge import last_token_attention
        scores = last_token_attention(layer0.self_attn, layer0.input_layernorm(hidden), (cos, sin))[start:start + count]
        hidden = layer0(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        merged, kept = merge_visual_tokens(hidden[0], scores, start, 30)
        cos, sin = model.rotary_emb(merged[None], kept[None])
        out = model.layers[1](merged[None], attention_mask=None, position_ids=kept[None], position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        expected = lm.model.lm_head(model.norm(out[0, -1:]))[0]
        slot = runner.slots - 1
        got = runner.prefill(slot, embeds, 0, StageThree(settings, start, count))
        rows = runner.lengths[:, slot].tolist()
        runner.free(slot)
    assert rows == [80, 80 - 30]  # layer 1 holds the shortened sequence
    assert torch.allclose(got, expected.float(), atol=1e-4)


def test_a_runner_refuses_a_prompt_longer_than_its_slot(llm_service):
    lm = llm_service.engine.lm
    runner = ModelRunner(lm.model, slots=1, max_length=64)
    with pytest.raises(ValueError, match="do not fit a KV cache slot of 64"):
        runner.prefill(0, torch.zeros(65, lm.hidden_size), 0)


def failing_once(original, failures: list, message: str):
    """A stand-in for `original` that raises RuntimeError(message) on its first call (recording that
    call's arguments in `failures`) and behaves as the original afterwards."""

    def wrapper(*args):
        if not failures:
            failures.append(args)
            raise RuntimeError(message)
        return original(*args)

    return wrapper


def test_a_failing_step_fails_its_requests_and_the_batcher_keeps_serving(endless, monkeypatch):
    """A device error in one decode step (caused here by a stand-in: it cannot be caused for real on
    the CPU) ends the requests in that step with the error; the next request is served normally."""
    engine = endless
    expected = run(engine, request_for(engine, 0, 8))[0]
    failures = []
    monkeypatch.setattr(engine.runner, "decode", failing_once(engine.runner.decode, failures,
                                                             "CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(engine, request_for(engine, 0, 8))
    wait_until_idle(engine)
    assert run(engine, request_for(engine, 0, 8))[0] == expected
    assert [call[0] for call in failures] == [1]  # the step that failed held one sequence


def test_the_batcher_ends_a_sequence_at_its_stop_string_without_waiting_for_the_consumer(endless):
    """The stop string is found where the text is made, on the batcher's thread: the slot is given back
    at once, while the consumer still holds its generator open."""
    engine = endless
    full = run(engine, request_for(engine, 0, 16))[0]
    assert len(full) >= 12, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    request = request_for(engine, 0, 4000)
    request.sampling = SamplingParams(max_tokens=4000, stop=(stop,))
    events = engine.generate(request)
    try:
        received = []
        for event in events:
            received.append(event)
            if isinstance(event, Final):
                break  # the generator stays open: its consumer has not stopped reading
        final = received[-1]
        assert "".join(e.text for e in received[:-1]) == full[: full.find(stop)]
        assert final.finish_reason == "stop" and final.completion_tokens < 16
        wait_until_idle(engine, timeout_s=1.0)
    finally:
        events.close()


def test_a_failing_detokenization_fails_its_request_and_the_batcher_keeps_serving(endless, monkeypatch):
    """Text is made on the batcher's thread: a tokenizer error there ends that request with the error
    (a stand-in raises it), not the batcher; the next request is served normally."""
    from llm_service.detokenizer import TextOutput

    engine = endless
    expected = run(engine, request_for(engine, 0, 8))[0]
    failures = []
    monkeypatch.setattr(TextOutput, "add", failing_once(TextOutput.add, failures, "the tokenizer failed"))
    with pytest.raises(RuntimeError, match="the tokenizer failed"):
        run(engine, request_for(engine, 0, 8))
    wait_until_idle(engine)
    assert run(engine, request_for(engine, 0, 8))[0] == expected
    assert len(failures) == 1
