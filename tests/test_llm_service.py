"""The LLM engine and its gRPC server, on the real tiny model (llm_service fixture)."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_service.detokenizer import IncrementalDetokenizer, StopMatcher
from llm_service.engine import Delta, Final, GenerationRequest
from llm_service.prompt import VIDEO, Message
from llm_service.sampling import SamplingParams
from protos.videollm.v1 import llm_pb2, llm_pb2_grpc, tensor_pb2
from videollm import tensors, transport
from videollm.checkpoint import model_identity
from videollm.tiny_model import TEXT_HIDDEN

TIMEOUT_S = 120
HIDDEN = TEXT_HIDDEN  # the tiny model's hidden size


# --- helpers -----------------------------------------------------------------------------------


def user(*parts) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(
        role="user",
        content=[llm_pb2.ContentPart(video=True) if p is VIDEO else llm_pb2.ContentPart(text=p) for p in parts],
    )


def setup_message(messages, visual_header=None, **sampling) -> llm_pb2.GenerateRequest:
    setup = llm_pb2.GenerateSetup(messages=messages, sampling=llm_pb2.SamplingParams(**sampling))
    if visual_header is not None:
        setup.visual.CopyFrom(visual_header)
    return llm_pb2.GenerateRequest(setup=setup)


def chunk_message(data: bytes) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(visual_chunk=tensor_pb2.TensorChunk(data=data))


def generate_requests(messages, visual: torch.Tensor | None = None, **sampling):
    """A well-formed Generate stream: the setup, then the visual tensor in wire chunks."""
    if visual is None:
        yield setup_message(messages, **sampling)
        return
    payload = tensors.tensor_bytes(visual)
    yield setup_message(messages, tensors.describe(visual, payload), **sampling)
    for piece in transport.pieces(payload):
        yield chunk_message(bytes(piece))


def collect(responses) -> tuple[list[str], llm_pb2.GenerateFinal]:
    deltas, final = [], None
    for index, response in enumerate(responses):
        kind = response.WhichOneof("item")
        assert final is None, "nothing may follow the GenerateFinal"
        if kind == "accepted":
            assert index == 0, "Accepted comes first or not at all"
        elif kind == "delta":
            deltas.append(response.delta.text)
        else:
            assert kind == "final"
            final = response.final
    assert final is not None, "the stream ended without a GenerateFinal"
    return deltas, final


def generate(stub, messages, visual=None, **sampling) -> tuple[str, llm_pb2.GenerateFinal]:
    deltas, final = collect(stub.Generate(generate_requests(messages, visual, **sampling), timeout=TIMEOUT_S))
    return "".join(deltas), final


def generate_direct(engine, messages: list[Message], visual=None, **sampling) -> tuple[str, Final]:
    events = list(engine.generate(GenerationRequest(messages, SamplingParams(**sampling), visual)))
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Final)
    return "".join(e.text for e in events[:-1]), events[-1]


def visual_tokens(rows: int, seed: int = 0, hidden: int = HIDDEN) -> torch.Tensor:
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))


def assert_server_still_answers(stub) -> None:
    _, final = generate(stub, [user("Is the server still there?")], max_tokens=3)
    assert final.finish_reason in ("length", "stop")
    assert 1 <= final.usage.completion_tokens <= 3


@pytest.fixture(scope="module")
def channel(llm_service):
    with grpc.insecure_channel(llm_service.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> llm_pb2_grpc.LLMStub:
    return llm_pb2_grpc.LLMStub(channel)


# --- incremental detokenization ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["视频里有什么？", "🎬 a video 🎥!", "naïve café, 問題は？", "👩‍💻 codes; 日本語のテキスト ok"],
)
def test_the_detokenizer_never_emits_half_a_character_when_one_spans_several_tokens(llm_service, text):
    tokenizer = llm_service.engine.lm.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # the point of the test: some character's bytes are spread over several byte-level tokens
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids), "no token of this text ends mid-character"

    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(i) for i in ids]
    emitted = ""
    for delta in deltas:
        assert "\ufffd" not in delta, f"a delta carried a replacement character: {deltas}"
        emitted += delta
        assert text.startswith(emitted), f"the deltas so far are not a prefix of the text: {emitted!r}"
    assert emitted == text
    assert detokenizer.flush() == ""
    assert "" in deltas  # a token that only starts a character emits nothing yet


def test_the_detokenizer_flush_returns_a_trailing_incomplete_character(llm_service):
    tokenizer = llm_service.engine.lm.tokenizer
    ids = tokenizer("ok 🎬", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    emitted = "".join(detokenizer.add(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert emitted.rstrip() == "ok" and "\ufffd" not in emitted
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert emitted + tail == tokenizer.decode(ids[:-1])
    assert detokenizer.flush() == ""


# --- stop strings -------------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.rest())
    return out, False


def test_a_stop_string_spanning_two_deltas_cuts_the_text_before_it():
    matcher = StopMatcher(("STOP",))
    first, hit = matcher.feed("Hello ST")
    assert not hit
    assert "S" not in first  # "ST" may begin the stop string: held back
    assert "Hello".startswith(first)
    second, hit = matcher.feed("OP and more")
    assert hit
    assert first + second == "Hello "


def test_a_stop_string_split_over_many_single_character_deltas_is_found():
    out, hit = feed_all(StopMatcher(("</answer>",)), list("the answer</answer> and beyond"))
    assert hit
    assert "".join(out) == "the answer"


def test_the_earliest_of_several_stop_strings_wins():
    out, hit = feed_all(StopMatcher(("world", "lo w")), list("hello world"))
    assert hit and "".join(out) == "hel"
    out, hit = feed_all(StopMatcher(("world", "lo w")), ["hello world"])
    assert hit and "".join(out) == "hel"


def test_a_held_back_prefix_that_is_no_stop_string_is_released_in_full():
    matcher = StopMatcher(("STOP",))
    pieces = ["abc ST", "ART then ", "STO", "RY end"]
    out, hit = feed_all(matcher, pieces)
    assert not hit
    assert "".join(out) == "".join(pieces)
    assert not out[0].endswith(("S", "ST"))


def test_a_stop_string_inside_one_delta_drops_it_and_everything_after():
    out, hit = feed_all(StopMatcher(("\n\n",)), ["line one\n", "\nline two"])
    assert hit and "".join(out) == "line one"
    out, hit = feed_all(StopMatcher(("x",)), ["abxcd"])
    assert hit and out == ["ab"]


def test_without_stop_strings_text_passes_straight_through():
    matcher = StopMatcher(())
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.feed("d") == ("d", False)
    assert matcher.rest() == ""


def test_a_stop_string_in_the_generated_text_ends_the_generation_before_it(stub):
    full, final = generate(stub, [user("Describe the video.")], max_tokens=16)
    assert final.finish_reason == "length"
    assert len(full) >= 12, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]

    text, final = generate(stub, [user("Describe the video.")], max_tokens=16, stop=["never appears", stop])
    assert text == expected
    assert final.finish_reason == "stop"
    assert final.usage.completion_tokens < 16


# --- sampling -----------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic(stub):
    messages = [user("What happens in this video?")]
    first, final_a = generate(stub, messages, max_tokens=12)
    second, final_b = generate(stub, messages, max_tokens=12)
    assert first and first == second
    assert final_a.usage == final_b.usage


def test_sampling_with_the_same_seed_repeats_and_different_seeds_differ(stub):
    messages = [user("Count the people in the room.")]
    same = {generate(stub, messages, max_tokens=10, temperature=1.0, seed=1234)[0] for _ in range(3)}
    assert len(same) == 1 and next(iter(same))
    seeded = {generate(stub, messages, max_tokens=10, temperature=1.0, seed=seed)[0] for seed in (1, 2, 3, 4)}
    assert len(seeded) > 1, f"four different seeds all gave {seeded}"


def test_sampling_without_a_seed_varies(stub):
    messages = [user("Count the people in the room.")]
    texts = {generate(stub, messages, max_tokens=10, temperature=1.0)[0] for _ in range(4)}
    assert len(texts) > 1


@pytest.mark.parametrize("sampling", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "tiny-top_p"])
def test_sampling_restricted_to_the_most_likely_token_equals_greedy(stub, sampling):
    messages = [user("Who opens the door?")]
    greedy, _ = generate(stub, messages, max_tokens=12)
    for seed in (5, 6):
        sampled, _ = generate(stub, messages, max_tokens=12, temperature=1.0, seed=seed, **sampling)
        assert sampled == greedy


# --- length and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 5, 12])
def test_max_tokens_bounds_the_completion_and_ends_with_length(stub, llm_service, monkeypatch, max_tokens):
    monkeypatch.setattr(llm_service.engine.lm, "eos_token_ids", set())  # no EOS can end it early
    _, final = generate(stub, [user("Hi")], max_tokens=max_tokens)
    assert final.finish_reason == "length"
    assert final.usage.completion_tokens == max_tokens


def test_the_default_max_tokens_applies_when_none_is_given(stub, llm_service, monkeypatch):
    engine = llm_service.engine
    monkeypatch.setattr(engine.lm, "eos_token_ids", set())
    monkeypatch.setattr(engine.settings, "default_max_tokens", 7)
    _, final = generate(stub, [user("Hi")])
    assert final.usage.completion_tokens == 7 and final.finish_reason == "length"


def expected_prompt_ids(tokenizer, text: str, video: bool) -> list[int]:
    """The tiny model's Qwen-style chat prompt, written out by hand (independent of llm_service.prompt)."""
    prompt = f"<|im_start|>user {'<video>' if video else ''}\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(prompt)["input_ids"]


def test_usage_counts_visual_rows_and_prompt_tokens_without_the_placeholder(stub, llm_service):
    lm = llm_service.engine.lm
    question = "What is the man holding?"
    ids = expected_prompt_ids(lm.tokenizer, question, video=True)
    assert ids.count(lm.video_token_id) == 1

    _, final = generate(stub, [user(VIDEO, question)], visual=visual_tokens(37), max_tokens=2)
    assert final.usage.visual_tokens == 37
    assert final.usage.prompt_tokens == len(ids) - 1

    _, final = generate(stub, [user(VIDEO, question)], visual=visual_tokens(5), max_tokens=2)
    assert final.usage.visual_tokens == 5
    assert final.usage.prompt_tokens == len(ids) - 1

    _, final = generate(stub, [user(question)], max_tokens=2)
    assert final.usage.visual_tokens == 0
    assert final.usage.prompt_tokens == len(expected_prompt_ids(lm.tokenizer, question, video=False))


def test_a_visual_tensor_over_4_mib_arrives_intact_in_chunks(stub, llm_service, monkeypatch):
    engine = llm_service.engine
    visual = visual_tokens(20000, seed=42)  # 20000 x HIDDEN float32 > 4 MiB
    payload = tensors.tensor_bytes(visual)
    assert payload.nbytes > 4 << 20
    assert len(list(transport.pieces(payload))) > 1

    received = []
    original_prepare = engine.prepare

    def recording_prepare(request):
        received.append(request.visual)
        return original_prepare(request)

    monkeypatch.setattr(engine, "prepare", recording_prepare)
    question = "What happens in this video?"
    text, final = generate(stub, [user(VIDEO, question)], visual=visual, max_tokens=4)
    monkeypatch.undo()

    assert len(received) == 1
    assert received[0].dtype == torch.float32 and torch.equal(received[0], visual)
    assert final.usage.visual_tokens == 20000
    direct, direct_final = generate_direct(engine, [Message("user", (VIDEO, question))], visual, max_tokens=4)
    assert text == direct
    assert final.usage.completion_tokens == direct_final.completion_tokens
    assert final.finish_reason == direct_final.finish_reason


def test_the_visual_tokens_change_the_answer(stub):
    question = "What happens in this video?"
    answers = {generate(stub, [user(VIDEO, question)], visual=visual_tokens(8, seed=s) * 10, max_tokens=8)[0]
               for s in (1, 2, 3)}
    assert len(answers) > 1  # the tensor really reaches the model


# --- invalid requests ---------------------------------------------------------------------------


def wrong_hidden_size():
    yield from generate_requests([user(VIDEO, "Hi")], visual_tokens(3, hidden=HIDDEN // 2), max_tokens=2)


def corrupted_chunk():
    visual = visual_tokens(3)
    payload = tensors.tensor_bytes(visual)
    header = tensors.describe(visual, payload)
    data = bytearray(payload)
    data[10] ^= 0xFF
    yield setup_message([user(VIDEO, "Hi")], header, max_tokens=2)
    yield chunk_message(bytes(data))


def missing_chunks():
    visual = visual_tokens(3)
    payload = tensors.tensor_bytes(visual)
    yield setup_message([user(VIDEO, "Hi")], tensors.describe(visual, payload), max_tokens=2)
    yield chunk_message(bytes(payload[:100]))


def placeholder_in_text():
    yield from generate_requests([user(VIDEO, "look at <video> please")], visual_tokens(3), max_tokens=2)


def placeholder_in_text_only_chat():
    yield from generate_requests([user("what is <video>?")], max_tokens=2)


def chunk_before_setup():
    yield chunk_message(b"\x00" * 16)
    yield from generate_requests([user("Hi")], max_tokens=2)


def nothing_sent():
    return
    yield  # pragma: no cover


def two_setups():
    visual = visual_tokens(3)
    yield from generate_requests([user(VIDEO, "Hi")], visual, max_tokens=2)
    yield setup_message([user("Hi")], max_tokens=2)


def max_tokens_over_the_limit():
    yield from generate_requests([user("Hi")], max_tokens=4097)


def video_part_without_tensor():
    yield from generate_requests([user(VIDEO, "Hi")], max_tokens=2)


def tensor_without_video_part():
    yield from generate_requests([user("Hi")], visual_tokens(3), max_tokens=2)


def two_video_parts():
    yield from generate_requests([user(VIDEO, VIDEO, "Hi")], visual_tokens(3), max_tokens=2)


def unknown_role():
    yield setup_message([llm_pb2.ChatMessage(role="robot", content=[llm_pb2.ContentPart(text="Hi")])], max_tokens=2)


def no_messages():
    yield setup_message([], max_tokens=2)


def temperature_too_high():
    yield from generate_requests([user("Hi")], max_tokens=2, temperature=3.0)


def context_over_the_limit():
    yield from generate_requests([user(VIDEO, "Hi")], torch.zeros(30000, HIDDEN), max_tokens=4096)


INVALID = {
    "wrong hidden size": (wrong_hidden_size, rf"shape \[N, {HIDDEN}\], got \[3, {HIDDEN // 2}\]"),
    "corrupted chunk": (corrupted_chunk, "checksum"),
    "missing chunks": (missing_chunks, "incomplete"),
    "placeholder in text": (placeholder_in_text, "must not contain the video placeholder '<video>'"),
    "placeholder in a text-only chat": (placeholder_in_text_only_chat, "must not contain the video placeholder"),
    "chunk before setup": (chunk_before_setup, "first message of Generate must be a GenerateSetup"),
    "empty stream": (nothing_sent, "first message of Generate must be a GenerateSetup"),
    "second setup": (two_setups, "only visual_chunk messages may follow"),
    "max_tokens over the limit": (max_tokens_over_the_limit, r"max_tokens must be in \[1, 4096\], got 4097"),
    "video part without tensor": (video_part_without_tensor, "visual tokens are needed"),
    "tensor without video part": (tensor_without_video_part, "visual tokens are needed"),
    "two video parts": (two_video_parts, "at most one video"),
    "unknown role": (unknown_role, "role must be one of"),
    "no messages": (no_messages, "messages must not be empty"),
    "temperature too high": (temperature_too_high, "temperature must be in"),
    "context over the limit": (context_over_the_limit, "the limit is 32768"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_an_invalid_request_gives_invalid_argument_and_the_server_keeps_serving(stub, llm_service, case):
    requests, message = INVALID[case]
    completed = llm_service.engine.generations_completed
    with pytest.raises(grpc.RpcError) as caught:
        collect(stub.Generate(requests(), timeout=TIMEOUT_S))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details() and re.search(message, caught.value.details()), caught.value.details()
    assert llm_service.engine.generations_completed == completed  # nothing was generated
    assert_server_still_answers(stub)


# --- cancellation -------------------------------------------------------------------------------


def test_cancelling_a_generate_call_stops_decoding_soon(stub, llm_service, monkeypatch):
    engine = llm_service.engine
    max_tokens = 2000
    monkeypatch.setattr(engine.lm, "eos_token_ids", set())  # only max_tokens or cancellation can end it

    finished = threading.Event()
    original_generate = engine.generate

    def tracked_generate(request):
        try:
            yield from original_generate(request)
        finally:
            finished.set()

    monkeypatch.setattr(engine, "generate", tracked_generate)
    forwards = []
    hook = engine.lm.model.lm_head.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        call = stub.Generate(generate_requests([user("Hi")], max_tokens=max_tokens), timeout=TIMEOUT_S)
        first = next(call)
        assert first.WhichOneof("item") == "delta"
        call.cancel()
        assert finished.wait(timeout=30), "the engine kept generating after the call was cancelled"
        deadline = time.monotonic() + 5
        while engine.batcher.active and time.monotonic() < deadline:  # the slot is freed at the next step
            time.sleep(0.01)
        assert engine.batcher.active == 0, "the cancelled request still holds a decode slot"
        decoded = len(forwards)
        time.sleep(0.3)
        assert len(forwards) == decoded, "decoding went on after the generation ended"
        assert decoded < max_tokens // 4, f"{decoded} forward passes after cancelling a call of {max_tokens}"
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
    finally:
        hook.remove()
    monkeypatch.undo()
    assert_server_still_answers(stub)


def test_the_engine_stops_at_the_next_token_once_its_request_is_cancelled(llm_service, monkeypatch):
    engine = llm_service.engine
    monkeypatch.setattr(engine.lm, "eos_token_ids", set())
    cancelled = threading.Event()
    request = GenerationRequest([Message("user", ("Hi",))], SamplingParams(max_tokens=2000),
                                is_cancelled=cancelled.is_set)
    completed = engine.generations_completed
    events = []
    for event in engine.generate(request):
        events.append(event)
        cancelled.set()  # as soon as the first delta is out
    assert isinstance(events[0], Delta)
    assert len(events) == 2, "nothing but the final may follow the cancellation"
    final = events[-1]
    assert isinstance(final, Final) and final.finish_reason == "cancelled"
    assert final.completion_tokens < 50
    assert engine.generations_completed == completed + 1


# --- Info, health, what is loaded ---------------------------------------------------------------


def test_info_reports_the_model_and_its_limits(stub, llm_service, tiny_model_dir):
    info = stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S)
    assert info.model_id == model_identity(tiny_model_dir) == llm_service.engine.model_id
    assert info.model_id.startswith("videollm-tiny-llava-onevision@")
    assert info.hidden_size == HIDDEN
    assert info.max_tokens_limit == llm_service.engine.settings.max_tokens_limit
    assert info.max_context_tokens == llm_service.engine.settings.max_context_tokens == 32768
    assert info.dtype == "float32"

    before = info.generations_completed
    generate(stub, [user("Hi")], max_tokens=2)
    assert stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S).generations_completed == before + 1


def test_info_reports_decode_slots_in_use(stub, llm_service, monkeypatch):
    monkeypatch.setattr(llm_service.engine.lm, "eos_token_ids", set())  # the answer runs until cancelled
    idle = stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S)
    assert idle.decode_slots == llm_service.engine.settings.decode_slots == 16
    assert (idle.active_sequences, idle.waiting_sequences) == (0, 0)
    call = stub.Generate(generate_requests([user("Hi")], max_tokens=2000), timeout=TIMEOUT_S)
    assert next(call).WhichOneof("item") == "delta"
    busy = stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S)
    call.cancel()
    assert busy.active_sequences == 1
    deadline = time.monotonic() + 5
    while stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S).active_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stub.Info(llm_pb2.LLMInfoRequest(), timeout=TIMEOUT_S).active_sequences == 0


@pytest.mark.parametrize("service", ["", "videollm.v1.LLM"])
def test_the_health_service_reports_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_health_service_does_not_know_other_services(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="videollm.v1.Encoder"), timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_llm_service_loads_only_the_language_model_and_its_head(llm_service, tiny_model_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    full = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    language_and_head = count(full.model.language_model) + count(full.lm_head)
    lm = llm_service.engine.lm
    assert lm.parameter_count() == language_and_head
    assert lm.parameter_count() < count(full)
    assert not any("vision" in name or "projector" in name for name, _ in lm.model.named_parameters())
    # and the weights are the checkpoint's own
    assert torch.equal(lm.model.lm_head.weight, full.lm_head.weight)
    assert torch.equal(lm.model.model.embed_tokens.weight, full.model.language_model.embed_tokens.weight)
