"""On a miss the gateway leaves the video in shared memory for an encoder on the same host, and
sends the bytes over gRPC to an encoder that cannot take the file (another host)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from conftest import GatewayServer, gateway_settings, running_encoder
from helpers import data_url, video_chat
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc
from test_direct_pull import SHM, encoder_info
from videollm import pull_files
from videollm.settings import EncoderSettings
from videos import make_video


def video_files_left() -> set:
    return set(SHM.glob(f"{pull_files.VIDEO_PREFIX}*"))


def answer(gateway_url: str, video: bytes) -> dict:
    body = video_chat(data_url(video), "What moves?", max_tokens=4, videollm={"num_frames": 4})
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["x-videollm-cache"] == "miss"
    return response.json()


def test_a_miss_on_the_same_host_hands_the_video_over_in_shared_memory(encoder_service, llm_service):
    before, files_before = encoder_info(encoder_service.address), video_files_left()
    with GatewayServer(gateway_settings([encoder_service.address], [llm_service.address], None)) as gateway:
        video = make_video("mp4", seed=601)  # one encode: two encodes of the same frames may differ
        by_file = answer(gateway.url, video)
        replica = gateway.app.state.runtime.encoders.replicas[0]
    assert encoder_info(encoder_service.address).videos_taken == before.videos_taken + 1
    assert replica.takes_video_files is True
    assert video_files_left() <= files_before  # the encoder took the file and removed it

    # the same video as bytes over gRPC gives the same answer
    no_handoff = gateway_settings([encoder_service.address], [llm_service.address], None, pull_shm_dir="")
    with GatewayServer(no_handoff) as gateway:
        assert gateway.app.state.runtime.pipeline.video_handoff is None
        by_bytes = answer(gateway.url, video)
    assert encoder_info(encoder_service.address).videos_taken == before.videos_taken + 1
    assert by_file["choices"][0]["message"] == by_bytes["choices"][0]["message"]


@pytest.fixture
def encoder_elsewhere(tiny_model_dir, tmp_path):
    """An encoder whose shared-memory directory is not the gateway's, as on another host."""
    (tmp_path / "elsewhere").mkdir()
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, pull_shm_dir=str(tmp_path / "elsewhere"))) \
            as service:
        yield service.address


def test_an_encoder_on_another_host_gets_the_bytes_and_the_gateway_stops_trying(encoder_elsewhere, llm_service,
                                                                                  tmp_path):
    (tmp_path / "gateway").mkdir()
    settings = gateway_settings([encoder_elsewhere], [llm_service.address], None,
                                pull_shm_dir=str(tmp_path / "gateway"))
    with GatewayServer(settings) as gateway:
        handoff = gateway.app.state.runtime.pipeline.video_handoff
        left = []
        leave = handoff.leave

        async def counting_leave(video):
            left.append(len(video))
            return await leave(video)

        handoff.leave = counting_leave
        answer(gateway.url, make_video("mp4", seed=602))
        answer(gateway.url, make_video("mp4", seed=603))
        replica = gateway.app.state.runtime.encoders.replicas[0]
    assert replica.takes_video_files is False
    assert len(left) == 1  # tried once, refused (FAILED_PRECONDITION), then bytes only
    assert encoder_info(encoder_elsewhere).videos_taken == 0
    assert not list((tmp_path / "gateway").iterdir())  # the refused file was removed


def encode(address: str, request: encoder_pb2.EncodeRequest) -> grpc.RpcError | encoder_pb2.EncodeResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            return next(iter(encoder_pb2_grpc.EncoderStub(channel).Encode(
                iter([encoder_pb2.EncodeInput(request=request)]), timeout=60)))
        except grpc.RpcError as err:
            return err


def test_the_encoder_takes_only_a_file_of_the_named_ticket_and_size(encoder_service):
    sampling = encoder_pb2.FrameSampling(num_frames=4)
    bad_ticket = encode(encoder_service.address, encoder_pb2.EncodeRequest(
        video_ticket="../../etc/passwd", video_size=10, sampling=sampling))
    assert bad_ticket.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = encode(encoder_service.address, encoder_pb2.EncodeRequest(
        video_ticket="ab" * 16, video_size=10, sampling=sampling))
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION and "send the video's bytes" in missing.details()
    too_large = encode(encoder_service.address, encoder_pb2.EncodeRequest(
        video_ticket="cd" * 16, video_size=encoder_service.engine.settings.max_video_bytes + 1, sampling=sampling))
    assert too_large.code() == grpc.StatusCode.INVALID_ARGUMENT

    video = make_video("mp4", seed=604)
    pull_files.write(SHM, "ef" * 16, video, pull_files.VIDEO_PREFIX)
    wrong_size = encode(encoder_service.address, encoder_pb2.EncodeRequest(
        video_ticket="ef" * 16, video_size=len(video) + 1, sampling=sampling))
    assert wrong_size.code() == grpc.StatusCode.FAILED_PRECONDITION  # and the file is gone: taken, then refused
    assert not pull_files.path_for(SHM, "ef" * 16, pull_files.VIDEO_PREFIX).exists()

    pull_files.write(SHM, "12" * 16, video, pull_files.VIDEO_PREFIX)
    encoded = encode(encoder_service.address, encoder_pb2.EncodeRequest(
        video_ticket="12" * 16, video_size=len(video), sampling=sampling))
    assert encoded.header.frames_sampled == 4
    assert not pull_files.path_for(SHM, "12" * 16, pull_files.VIDEO_PREFIX).exists()
