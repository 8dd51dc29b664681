"""On a cache miss the LLM takes the visual tokens straight from the encoder (Encoder.Pull)."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import GatewayServer, free_port, gateway_settings, running_encoder, running_llm
from encoder_service.pull_store import PullStore
from llm_service.pull import EncoderPuller
from helpers import data_url, video_chat
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc, tensor_pb2
from videollm import pull_files, transport
from videollm.settings import EncoderSettings, LLMSettings
from videos import make_video


SHM = Path(LLMSettings.model_fields["pull_shm_dir"].default)  # where the services of these tests meet


def llm_info(address: str) -> llm_pb2.LLMInfo:
    with grpc.insecure_channel(address) as channel:
        return llm_pb2_grpc.LLMStub(channel).Info(llm_pb2.LLMInfoRequest(), timeout=10)


def encoder_info(address: str) -> encoder_pb2.EncoderInfo:
    with grpc.insecure_channel(address) as channel:
        return encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest(), timeout=10)


def answer(gateway_url: str, video: str, seed_question: str) -> httpx.Response:
    body = video_chat(video, seed_question, max_tokens=6, videollm={"num_frames": 4})
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def pull_files_left() -> set[Path]:
    return set(SHM.glob(f"{pull_files.PREFIX}*"))


def test_a_miss_is_pulled_by_the_llm_and_answers_as_when_relayed(encoder_service, llm_service, llm_over_grpc,
                                                                 redis_server, clean_redis):
    video = data_url(make_video("mp4", seed=501))
    files_before = pull_files_left()
    before_llm, before_encoder = llm_info(llm_service.address), encoder_info(encoder_service.address)
    settings = gateway_settings([encoder_service.address], [llm_service.address], None)  # no cache: all misses
    with GatewayServer(settings) as gateway:
        from_memory = answer(gateway.url, video, "What moves?")
    after_llm, after_encoder = llm_info(llm_service.address), encoder_info(encoder_service.address)
    assert from_memory.headers["x-videollm-cache"] == "miss"
    # same host: the LLM took the encoder's file in shared memory, no gRPC pull, no file left behind
    assert after_llm.visual_pulls == before_llm.visual_pulls + 1
    assert after_llm.visual_pulls_shared_memory == before_llm.visual_pulls_shared_memory + 1
    assert after_llm.visual_pull_fallbacks == before_llm.visual_pull_fallbacks
    assert after_encoder.pulls_served == before_encoder.pulls_served
    assert pull_files_left() <= files_before  # none new (older ones may expire meanwhile)

    # an LLM that shares no directory with the encoder pulls the same file over gRPC
    over_grpc = settings.model_copy(update={"port": free_port(), "llms": [llm_over_grpc]})
    with GatewayServer(over_grpc) as gateway:
        pulled = answer(gateway.url, video, "What moves?")
    grpc_llm = llm_info(llm_over_grpc)
    assert (grpc_llm.visual_pulls, grpc_llm.visual_pulls_shared_memory, grpc_llm.visual_pull_fallbacks) == (1, 0, 0)
    assert encoder_info(encoder_service.address).pulls_served == after_encoder.pulls_served + 1
    assert pull_files_left() <= files_before  # none new (older ones may expire meanwhile)

    relay_only = settings.model_copy(update={"port": free_port(), "direct_pull": False})
    with GatewayServer(relay_only) as gateway:
        relayed = answer(gateway.url, video, "What moves?")
    assert llm_info(llm_service.address).visual_pulls == after_llm.visual_pulls  # not offered
    message = relayed.json()["choices"][0]["message"]
    assert from_memory.json()["choices"][0]["message"] == message == pulled.json()["choices"][0]["message"]


@pytest.fixture
def llm_over_grpc(tiny_model_dir):
    """An LLM service that shares no memory directory with the encoder: it pulls over gRPC."""
    with running_llm(LLMSettings(model=tiny_model_dir, port=0, pull_shm_dir="")) as service:
        yield service.address


@pytest.fixture
def forgetful_encoder(tiny_model_dir):
    """An encoder whose tokens expire before anyone can pull them (kept in its memory, not in files)."""
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, pull_ttl_s=1e-9, pull_shm_dir="")) as service:
        yield service.address


def test_a_failed_pull_falls_back_to_the_gateway(forgetful_encoder, llm_service, encoder_service):
    video = data_url(make_video("mp4", seed=502))
    before = llm_info(llm_service.address)
    settings = gateway_settings([forgetful_encoder], [llm_service.address], None)
    with GatewayServer(settings) as gateway:
        fallback = answer(gateway.url, video, "What moves?")
    after = llm_info(llm_service.address)
    assert after.visual_pull_fallbacks == before.visual_pull_fallbacks + 1
    assert after.visual_pulls == before.visual_pulls
    settings = gateway_settings([encoder_service.address], [llm_service.address], None)
    with GatewayServer(settings) as gateway:
        pulled = answer(gateway.url, video, "What moves?")
    assert pulled.json()["choices"][0]["message"] == fallback.json()["choices"][0]["message"]


def test_a_ticket_is_taken_once_and_unknown_tickets_are_not_found(encoder_service):
    with grpc.insecure_channel(encoder_service.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        video = make_video("mp4", seed=503)
        unoffered = list(stub.Encode(transport.encode_inputs(encoder_pb2.EncodeRequest(
            sampling=encoder_pb2.FrameSampling(num_frames=2)), video), timeout=60))
        assert not unoffered[0].header.pull_ticket  # nothing kept unless asked
        responses = list(stub.Encode(transport.encode_inputs(encoder_pb2.EncodeRequest(
            offer_pull=True, sampling=encoder_pb2.FrameSampling(num_frames=2)), video), timeout=60))
        header = responses[0].header
        assert header.pull_ticket
        pulled = b"".join(r.chunk.data for r in stub.Pull(encoder_pb2.PullRequest(ticket=header.pull_ticket),
                                                          timeout=10))
        assert pulled == b"".join(r.chunk.data for r in responses[1:])  # the same bytes as the Encode stream
        for ticket in (header.pull_ticket, "no-such-ticket"):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Pull(encoder_pb2.PullRequest(ticket=ticket), timeout=10))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "send them with the Generate call" in caught.value.details()


def test_the_pull_store_is_bounded_by_bytes_and_time():
    store = PullStore(max_bytes=100, ttl_s=0.2)
    first, second = store.put(memoryview(b"a" * 60)), store.put(memoryview(b"b" * 60))
    assert store.take(first) is None  # evicted to make room
    assert bytes(store.take(second)) == b"b" * 60
    assert store.put(memoryview(b"c" * 101)) == ""  # larger than the store: not kept
    late = store.put(memoryview(b"d" * 10))
    time.sleep(0.3)
    assert store.take(late) is None  # expired
    assert PullStore(max_bytes=100, ttl_s=0).put(memoryview(b"e")) == ""  # off


def test_a_file_backed_store_hands_each_ticket_out_once_and_leaves_no_file(tmp_path):
    store = PullStore(max_bytes=100, ttl_s=0.2, shm_dir=tmp_path)
    first = store.put(memoryview(b"a" * 40))
    path = pull_files.path_for(tmp_path, first)
    assert path.read_bytes() == b"a" * 40 and path.stat().st_mode & 0o777 == 0o600
    assert bytes(pull_files.take(tmp_path, first, 40)) == b"a" * 40  # the LLM's side, on the same host
    assert store.take(first) is None and not list(tmp_path.iterdir())  # taken already: Pull says NOT_FOUND
    second = store.put(memoryview(b"b" * 40))
    assert bytes(store.take(second)) == b"b" * 40  # Encoder.Pull's side
    assert pull_files.take(tmp_path, second, 40) is None and not list(tmp_path.iterdir())
    third, fourth, fifth = (store.put(memoryview(c * 40)) for c in (b"c", b"d", b"e"))
    assert not pull_files.path_for(tmp_path, third).exists()  # evicted to make room, file and all
    assert pull_files.take(tmp_path, fourth, 39) is None  # not the announced size: refused, and gone
    assert not pull_files.path_for(tmp_path, fourth).exists()
    deadline = time.monotonic() + 10
    while pull_files.path_for(tmp_path, fifth).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pull_files.path_for(tmp_path, fifth).exists()  # expired, with no further call
    store.put(memoryview(b"f" * 10))
    store.close()
    assert not list(tmp_path.iterdir())
    with pytest.raises(pull_files.PullFileError):
        pull_files.path_for(tmp_path, "../../etc/passwd")


def test_files_left_by_a_killed_encoder_are_swept_at_start(tmp_path):
    stale = pull_files.path_for(tmp_path, "ab" * 16)
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = pull_files.path_for(tmp_path, "cd" * 16)
    fresh.write_bytes(b"new")  # another encoder's live entry
    PullStore(max_bytes=100, ttl_s=30, shm_dir=tmp_path)
    assert not stale.exists() and fresh.exists()


def test_a_truncated_file_in_shared_memory_is_refused_and_the_tokens_come_another_way(tmp_path):
    good = bytes(range(256)) * 4  # [2, 128] float32
    header = tensor_pb2.TensorHeader(dtype="float32", shape=[2, 128], num_bytes=len(good), crc32=zlib.crc32(good))
    puller = EncoderPuller(max_bytes=1 << 20, timeout_s=1, shm_dir=tmp_path)
    ticket = "ef" * 16
    pull_files.path_for(tmp_path, ticket).write_bytes(good[:-1])
    pull = llm_pb2.VisualPull(address=f"127.0.0.1:{free_port()}", ticket=ticket)  # and no encoder there
    assert puller.pull(header, pull) is None
    assert (puller.failed, puller.from_shared_memory, puller.pulled) == (1, 0, 0)
    assert not list(tmp_path.iterdir())
    pull_files.path_for(tmp_path, ticket).write_bytes(good)
    tensor = puller.pull(header, pull)
    assert tensor is not None and tensor.shape == (2, 128) and bytes(tensor.numpy().tobytes()) == good
    assert (puller.failed, puller.from_shared_memory, puller.pulled) == (1, 1, 1)
