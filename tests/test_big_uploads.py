"""Big files (issue 16): uploads streamed to the video store on disk, questions by id that open the
stored file only on a miss, and videos that reach the encoder by file or in chunks, never as one
gRPC message.

A real gigabyte is not needed to show the streaming: gateways with small limits refuse a video of a
few MB while it streams (the partial file, seen growing in the store before the body ends, is
deleted), and a video larger than gRPC's 4 MiB message limit crosses to the encoder in chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from conftest import GatewayServer, free_port, gateway_settings, running_encoder
from gateway.video_store import PARTIAL_PREFIX, WRITE_BYTES, VideoStore
from helpers import assert_error, data_url, encoder_calls, video_chat
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc
from test_direct_pull import encoder_info
from videollm import transport
from videollm.settings import MiB, EncoderSettings
from videos import encode, make_video

TIMEOUT = 120


@pytest.fixture(scope="module")
def big_clip() -> bytes:
    """About 6 MB, over gRPC's 4 MiB message limit: lossless noise frames, which do not compress.
    Encoded once and reused (two encodes of the same frames need not be byte-identical)."""
    frames = np.random.default_rng(16).integers(0, 256, (20, 256, 320, 3), dtype=np.uint8)
    clip = encode(frames, "mp4-lossless", options={"preset": "ultrafast"})
    assert len(clip) > 5 * MiB, len(clip)
    return clip


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video("mp4", n_frames=12, seed=1601)


def upload(gateway, data: bytes, filename: str = "clip.mp4") -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/videos", files={"file": (filename, data, "video/mp4")}, timeout=TIMEOUT)


def ask(gateway, url: str, frames: int = 4) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=TIMEOUT,
                      json=video_chat(url, max_tokens=3, videollm={"num_frames": frames}))


def answered(response: httpx.Response, cache: str) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["x-videollm-cache"] == cache
    return response.json()


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def gateway_for(encoder: str, llm_service, store: Path, redis_url: str | None = None, **settings) -> GatewayServer:
    return GatewayServer(gateway_settings([encoder], [llm_service.address], redis_url, video_store_dir=str(store),
                                          **settings))


# -- uploads --------------------------------------------------------------------------------------


def test_an_upload_is_a_file_named_by_its_hash_asked_about_by_id_on_a_miss_and_a_hit(
        gateway, encoder_service, clean_redis, video_store_dir, clip):
    response = upload(gateway, clip)
    assert response.status_code == 200, response.text
    video_id = response.json()["id"]
    assert video_id == f"video-{hashlib.sha256(clip).hexdigest()}"
    stored = video_store_dir / video_id
    assert stored.read_bytes() == clip
    assert not [name for name in files_in(video_store_dir) if name.startswith(PARTIAL_PREFIX)]
    assert response.json()["expires_at"] - response.json()["created_at"] == gateway.settings.upload_ttl_s

    before, encodes = encoder_info(encoder_service.address).videos_taken, encoder_calls(encoder_service)
    miss = answered(ask(gateway, video_id), "miss")
    # the session's encoder sees the session's store: it mapped the file, nothing travelled
    assert encoder_info(encoder_service.address).videos_taken == before + 1
    assert gateway.app.state.runtime.encoders.replicas[0].shares_video_store is True
    hit = answered(ask(gateway, video_id), "hit")
    assert encoder_info(encoder_service.address).videos_taken == before + 1
    assert encoder_calls(encoder_service) == encodes + 1
    assert hit["choices"][0]["message"] == miss["choices"][0]["message"]
    # the same bytes inline are the same video
    assert answered(ask(gateway, data_url(clip)), "hit")["choices"][0]["message"] == miss["choices"][0]["message"]


class GrowingBody:
    """A chunked request body that pauses after `pause_after` bytes (past the gateway's first 4 MiB
    write) until the gateway's store holds a partial file of at least 1 MiB: proof that the upload is
    written to disk as it arrives, before the body has ended."""

    def __init__(self, payload: bytes, store: Path, pause_after: int | None = None, piece: int = 256 << 10):
        assert pause_after is None or pause_after > WRITE_BYTES + (64 << 10), "pause past the first write"
        self.payload, self.store, self.pause_after, self.piece = payload, store, pause_after, piece
        self.partial_seen = 0

    def __iter__(self):
        for start in range(0, len(self.payload), self.piece):
            yield self.payload[start:start + self.piece]
            if self.pause_after is not None and start < self.pause_after <= start + self.piece:
                self.partial_seen = self._wait_for_partial(MiB)

    def _wait_for_partial(self, at_least: int, wait_s: float = 30) -> int:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in self.store.glob(f"{PARTIAL_PREFIX}*")]
            if sizes and max(sizes) >= at_least:
                return max(sizes)
            time.sleep(0.01)
        return 0


def multipart(data: bytes, boundary: str = "videollm-test-boundary") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_upload_over_the_limit_is_refused_while_it_streams_and_leaves_no_file(
        encoder_service, llm_service, tmp_path, big_clip):
    store = tmp_path / "store"
    with gateway_for(encoder_service.address, llm_service, store, max_upload_bytes=9 * MiB) as gateway:
        # within the limit: written to disk as it arrives (the partial file grows before the body ends)
        body, content_type = multipart(big_clip)
        growing = GrowingBody(body, store, pause_after=5 * MiB)
        response = httpx.post(f"{gateway.url}/v1/videos", content=iter(growing), timeout=TIMEOUT,
                              headers={"content-type": content_type})
        assert response.status_code == 200, response.text
        assert growing.partial_seen >= MiB
        assert files_in(store) == [response.json()["id"]]

    limit = len(big_clip) - MiB
    with gateway_for(encoder_service.address, llm_service, store, max_upload_bytes=limit) as gateway:
        # no Content-Length: the gateway counts the video's bytes as they stream and stops at the limit,
        # with part of the video already on disk (seen here), which it deletes
        growing = GrowingBody(body, store, pause_after=limit - MiB // 2)
        response = httpx.post(f"{gateway.url}/v1/videos", content=iter(growing), timeout=TIMEOUT,
                              headers={"content-type": content_type})
        assert_error(response, 413, "video_too_large", str(limit))
        assert growing.partial_seen >= MiB
        assert files_in(store) == [f"video-{hashlib.sha256(big_clip).hexdigest()}"]  # the partial file is gone
        # a declared size over the limit is refused before a byte is read
        with gateway_for(encoder_service.address, llm_service, store, max_upload_bytes=3_000_000) as small:
            assert_error(upload(small, big_clip), 413, "request_too_large", "3000000")
        assert files_in(store) == [f"video-{hashlib.sha256(big_clip).hexdigest()}"]  # only the earlier upload


def test_a_multipart_body_cut_off_before_its_end_is_refused_and_leaves_no_file(encoder_service, llm_service,
                                                                               tmp_path, clip):
    store = tmp_path / "store"
    body, content_type = multipart(clip)
    with gateway_for(encoder_service.address, llm_service, store) as gateway:
        response = httpx.post(f"{gateway.url}/v1/videos", content=body[:-40], timeout=TIMEOUT,
                              headers={"content-type": content_type})
        assert_error(response, 400, "invalid_value", "closing boundary")
        assert files_in(store) == []
        not_multipart = httpx.post(f"{gateway.url}/v1/videos", content=clip, timeout=TIMEOUT,
                                   headers={"content-type": "video/mp4"})
        assert_error(not_multipart, 400, "invalid_value", "multipart/form-data")
        assert files_in(store) == []


def test_uploads_work_while_redis_is_down(encoder_service, llm_service, tmp_path, clip):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with gateway_for(encoder_service.address, llm_service, tmp_path / "store", redis_url=nowhere) as gateway:
        response = upload(gateway, clip)
        assert response.status_code == 200, response.text
        answered(ask(gateway, response.json()["id"]), "miss")


# -- stored files: damage and expiry ----------------------------------------------------------------


def test_a_damaged_file_sent_in_chunks_is_404_deleted_and_never_encoded(encoder_service, llm_service, clean_redis,
                                                                       tmp_path):
    store = tmp_path / "store"  # not the session encoder's store, nor a video in it: the video goes in chunks
    clip = make_video("mp4", n_frames=12, seed=1602)
    with gateway_for(encoder_service.address, llm_service, store) as gateway:
        video_id = upload(gateway, clip).json()["id"]
        damaged = bytearray(clip)
        damaged[len(damaged) // 3] ^= 0x01
        (store / video_id).write_bytes(damaged)
        encodes = encoder_calls(encoder_service)

        assert_error(ask(gateway, video_id), 404, "video_not_found", video_id, "damaged", "upload it again")
        assert files_in(store) == []
        assert encoder_calls(encoder_service) == encodes  # the check ended before the call's last message
        assert gateway.app.state.runtime.encoders.replicas[0].shares_video_store is False


def test_an_expired_upload_is_gone_and_the_sweep_removes_old_files(encoder_service, llm_service, tmp_path, clip):
    store = tmp_path / "store"
    with gateway_for(encoder_service.address, llm_service, store, upload_ttl_s=3600) as gateway:
        video_id = upload(gateway, clip).json()["id"]
        day_ago = time.time() - 24 * 3600
        os.utime(store / video_id, (day_ago, day_ago))
        assert_error(ask(gateway, video_id), 404, "video_not_found", "expired")  # read as gone before any sweep
        assert files_in(store) == []

    swept = VideoStore(tmp_path / "swept", ttl_s=3600)
    now = time.time()
    for name, age_s in [("video-" + "a" * 64, 7200), ("video-" + "b" * 64, 60), (PARTIAL_PREFIX + "dead", 2 * 86400),
                        (PARTIAL_PREFIX + "uploading", 7200), ("not-ours", 10 * 86400)]:
        path = swept.directory / name
        path.write_bytes(b"x")
        os.utime(path, (now - age_s, now - age_s))
    assert swept.sweep(now) == 2
    assert files_in(swept.directory) == sorted([PARTIAL_PREFIX + "uploading", "not-ours", "video-" + "b" * 64])


# -- to the encoder: chunks, the store, shared memory --------------------------------------------------


def test_a_video_over_grpcs_message_limit_reaches_the_encoder_in_chunks(encoder_service, big_clip):
    request = encoder_pb2.EncodeRequest(sampling=encoder_pb2.FrameSampling(num_frames=4),
                                        compression=encoder_pb2.Compression(method="none"))
    whole = encoder_pb2.EncodeRequest(video=big_clip)
    whole.MergeFrom(request)
    small_messages = [("grpc.max_send_message_length", 3 * MiB), ("grpc.max_receive_message_length", 2 * MiB)]
    with grpc.insecure_channel(encoder_service.address, options=small_messages) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        responses = list(stub.Encode(transport.encode_inputs(request, big_clip), timeout=TIMEOUT))
        assert responses[0].header.frames_sampled == 4
        assert sum(len(r.chunk.data) for r in responses[1:]) == responses[0].header.tensor.num_bytes
        with pytest.raises(grpc.RpcError) as caught:  # the same video in one message cannot leave this channel
            list(stub.Encode(iter([encoder_pb2.EncodeInput(request=whole)]), timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(encoder_service.address) as channel:  # nor reach the encoder
        with pytest.raises(grpc.RpcError) as caught:
            list(encoder_pb2_grpc.EncoderStub(channel).Encode(iter([encoder_pb2.EncodeInput(request=whole)]),
                                                              timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_encoder_checks_the_announced_size_and_the_chunks_that_follow(encoder_service, clip):
    limit = encoder_service.engine.settings.max_video_bytes
    sampling = encoder_pb2.FrameSampling(num_frames=2)

    def encode(*inputs):
        with grpc.insecure_channel(encoder_service.address) as channel:
            try:
                return list(encoder_pb2_grpc.EncoderStub(channel).Encode(iter(inputs), timeout=TIMEOUT))
            except grpc.RpcError as err:
                return err

    def chunk(data: bytes):
        return encoder_pb2.EncodeInput(video_chunk={"data": data})

    def request(size: int):
        return encoder_pb2.EncodeInput(request=encoder_pb2.EncodeRequest(video_size=size, sampling=sampling))

    over = encode(request(limit + 1), chunk(clip))
    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT and str(limit) in over.details()
    short = encode(request(len(clip) + 1), chunk(clip))
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended after" in short.details()
    extra = encode(request(len(clip) - 1), chunk(clip))
    assert extra.code() == grpc.StatusCode.INVALID_ARGUMENT and "more video bytes" in extra.details()
    no_request = encode(chunk(clip))
    assert no_request.code() == grpc.StatusCode.INVALID_ARGUMENT and "starts with its request" in no_request.details()
    half = len(clip) // 2
    whole = encode(request(len(clip)), chunk(clip[:half]), chunk(clip[half:]))
    assert whole[0].header.frames_sampled == 2


@pytest.fixture(params=["another directory", "off"])
def encoder_without_our_store(request, tiny_model_dir, tmp_path):
    """An encoder that does not see the gateway's store, as on another host (or with its store off)."""
    store = str(tmp_path / "elsewhere") if request.param == "another directory" else ""
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, video_store_dir=store)) as service:
        yield service.address


def test_an_upload_goes_by_file_to_an_encoder_that_shares_the_store_and_in_chunks_elsewhere(
        encoder_service, encoder_without_our_store, llm_service, video_store_dir, big_clip):
    # pull_shm_dir off: the store is the only same-host way; big_clip is over gRPC's message limit
    with gateway_for(encoder_service.address, llm_service, video_store_dir, pull_shm_dir="") as gateway:
        video_id = upload(gateway, big_clip).json()["id"]
        before = encoder_info(encoder_service.address).videos_taken
        by_file = answered(ask(gateway, video_id, frames=3), "miss")
        assert encoder_info(encoder_service.address).videos_taken == before + 1
        assert gateway.app.state.runtime.encoders.replicas[0].shares_video_store is True

    with gateway_for(encoder_without_our_store, llm_service, video_store_dir, pull_shm_dir="") as gateway:
        by_chunks = answered(ask(gateway, video_id, frames=3), "miss")
        replica = gateway.app.state.runtime.encoders.replicas[0]
        assert replica.shares_video_store is False  # refused once (FAILED_PRECONDITION), then chunks
        answered(ask(gateway, video_id, frames=2), "miss")
        assert replica.shares_video_store is False
    assert encoder_info(encoder_without_our_store).videos_taken == 0
    assert encoder_info(encoder_without_our_store).encodes_completed == 2
    assert by_chunks["choices"][0]["message"] == by_file["choices"][0]["message"]  # the same video, both ways


def test_an_inline_video_over_grpcs_message_limit_goes_in_chunks_without_shared_memory(
        encoder_service, llm_service, tmp_path, big_clip):
    with gateway_for(encoder_service.address, llm_service, tmp_path / "store", pull_shm_dir="",
                     max_inline_bytes=16 * MiB) as gateway:
        before = encoder_info(encoder_service.address).videos_taken
        answered(ask(gateway, data_url(big_clip)), "miss")
        assert encoder_info(encoder_service.address).videos_taken == before  # bytes, not a file


# -- limits ----------------------------------------------------------------------------------------


def test_an_inline_video_over_the_inline_limit_gets_413_naming_the_upload_route(
        encoder_service, llm_service, tmp_path, big_clip):
    with gateway_for(encoder_service.address, llm_service, tmp_path / "store", max_inline_bytes=2 * MiB) as gateway:
        settings = gateway.settings
        assert settings.max_body_bytes == 2 * MiB * 4 // 3 + MiB  # the chat body's limit follows the inline one
        over_inline = big_clip[: 2 * MiB + 1000]  # its body is within the body limit: the video's check refuses
        assert len(data_url(over_inline)) < settings.max_body_bytes
        assert_error(ask(gateway, data_url(over_inline)), 413, "video_too_large", "POST /v1/videos", str(2 * MiB))
        assert_error(ask(gateway, data_url(big_clip)), 413, "request_too_large", "POST /v1/videos")  # body over its limit
        # the upload route keeps its own, larger limit
        assert len(big_clip) > settings.max_body_bytes
        video_id = upload(gateway, big_clip).json()["id"]
        assert (tmp_path / "store" / video_id).stat().st_size == len(big_clip)


def test_defaults_allow_two_gib_uploads_and_keep_inline_videos_at_256_mib(monkeypatch):
    for name in ("VIDEOLLM_GATEWAY_VIDEO_STORE_DIR", "VIDEOLLM_ENCODER_VIDEO_STORE_DIR"):
        monkeypatch.delenv(name, raising=False)
    gateway, encoder = gateway_settings(["e:1"], ["l:1"], None), EncoderSettings()
    assert gateway.max_upload_bytes == encoder.max_video_bytes == 2048 * MiB
    assert gateway.max_inline_bytes == 256 * MiB
    assert gateway.video_store_dir == encoder.video_store_dir  # one host: the encoder maps what the gateway stores
    assert json.dumps(gateway.video_store_dir).endswith('videollm/videos"')
