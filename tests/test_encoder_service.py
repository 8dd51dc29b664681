"""The encoder's gRPC edge: errors, limits, health and Info, against the real server."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc
from videollm import transport
from videos import make_video


@pytest.fixture
def stub(encoder_service):
    with grpc.insecure_channel(encoder_service.address) as channel:
        yield encoder_pb2_grpc.EncoderStub(channel)


def encode(stub, video: bytes, frames: int = 4, method: str = "none"):
    return list(stub.Encode(transport.encode_inputs(encoder_pb2.EncodeRequest(
        sampling=encoder_pb2.FrameSampling(num_frames=frames), compression=encoder_pb2.Compression(method=method)),
        video)))


@pytest.mark.parametrize(
    ("video", "frames", "message"),
    [
        (b"", 4, "empty"),
        (b"this is not a video at all" * 100, 4, "could not read"),
        (make_video("mp4")[:3000], 4, ""),
        (make_video("mp4"), 65, "videollm.num_frames: must be at most 64"),
    ],
    ids=["empty", "not-a-video", "truncated", "too-many-frames"],
)
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(stub, video, frames, message):
    with pytest.raises(grpc.RpcError) as caught:
        encode(stub, video, frames)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert encode(stub, make_video("mp4"), 2)[0].header.frames_sampled == 2


def test_a_compression_method_this_encoder_lacks_is_refused(stub):
    with pytest.raises(grpc.RpcError) as caught:
        encode(stub, make_video("mp4"), 2, method="unknown")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression" in caught.value.details()


def test_tokens_arrive_in_chunks_that_add_up_to_the_header(stub):
    responses = encode(stub, make_video("mp4"), 24)
    header = responses[0].header
    payload = b"".join(r.chunk.data for r in responses[1:])
    assert len(responses) > 2  # 24 * 196 + 1 tokens of 64 floats do not fit one 1 MiB chunk
    assert len(payload) == header.tensor.num_bytes
    assert header.compression.method == "none" and header.compression.frames_after_merge == 24
    assert [(s.first, s.last) for s in header.compression.segments] == [(i, i) for i in range(24)]
    assert all(len(k.positions) == 196 for k in header.compression.kept)
    assert header.timings.total_ms >= header.timings.vision_ms > 0


def test_info_reports_model_and_defaults(stub, encoder_service):
    info = stub.Info(encoder_pb2.InfoRequest())
    assert info.model_id == encoder_service.engine.model_id
    assert (info.default_frames, info.max_frames, info.encoder_layers, info.tokens_per_frame) == (32, 64, 26, 196)


def test_health_is_serving(encoder_service):
    with grpc.insecure_channel(encoder_service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "videollm.v1.Encoder"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
