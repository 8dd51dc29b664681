"""gRPC edge of the encoder: EncodeInput stream (request, then the video's chunks when it travels)
-> engine -> header + raw token chunks. How the video arrives is video_input.py's job."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc

from encoder_service.engine import EncoderEngine, EncodeResult, Overloaded
from encoder_service.pull_store import PullStore
from encoder_service.video_decode import VideoError
from encoder_service.video_input import InputError, VideoInputs
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, tensor_pb2
from videollm import tensors, transport
from videollm.checkpoint import peak_memory_bytes
from videollm.grpc_server import run_until_signalled, start_service
from videollm.frame_sampling import SamplingError
from videollm.proto_mapping import compression_from_proto, compression_to_proto, sampling_from_proto, sampling_to_proto
from videollm.service_metrics import encoder_registry, serve_metrics
from videollm.settings import EncoderSettings, public_settings

SERVICE_NAME = transport.ENCODER_SERVICE


def header_for(result: EncodeResult, tensor: tensor_pb2.TensorHeader, model_id: str,
               pull_ticket: str = "") -> encoder_pb2.EncodeHeader:
    trace = result.trace
    return encoder_pb2.EncodeHeader(
        tensor=tensor,
        frames_sampled=len(result.video.frame_indices),
        source_duration_s=result.video.duration_s,
        source_fps=result.video.fps,
        source_frames=result.video.source_frames,
        source_rotation=result.video.orientation.rotation,
        source_mirrored=result.video.orientation.mirrored,
        frame_timestamps_s=result.video.timestamps_s or [],
        source_color=encoder_pb2.SourceColor(**vars(result.video.color)),
        frame_indices=result.video.frame_indices,
        sampling=sampling_to_proto(result.sampling, result.video.window_s),
        output_spans=[encoder_pb2.TimeSpan(start_s=a, end_s=b) for a, b in output_spans(result)],
        timings=encoder_pb2.EncodeTimings(**vars(result.timings)),
        compression=encoder_pb2.CompressionInfo(
            method=result.settings.method,
            frames_after_merge=trace.frames_after_merge,
            segments=[encoder_pb2.Segment(first=a, last=b) for a, b in trace.segments],
            merged_frames=[encoder_pb2.Segment(first=a, last=b) for a, b in trace.merged_frames],
            kept=[encoder_pb2.KeptPositions(positions=p) for p in trace.kept],
            settings=compression_to_proto(result.settings),
            tokens_per_frame=trace.tokens_per_frame,
            layer_frames=trace.layer_frames,
            scaled_prune_layers=trace.prune_layers,
        ),
        model_id=model_id,
        flops=encoder_pb2.EncoderFlops(encoder=result.flops, encoder_uncompressed=result.flops_uncompressed),
        uncompressed_tokens=result.uncompressed_tokens,
        pull_ticket=pull_ticket,
        batch_requests=result.batch_requests,
        batch_frames=result.batch_frames,
    )


def output_spans(result: EncodeResult) -> list[tuple[float, float]]:
    """The time each output frame stands for: from the first sampled frame fused into it until the
    sampled frame after its last (the window's end after the last); none without timestamps."""
    times = result.video.timestamps_s
    if times is None:
        return []
    ends = [*times[1:], result.video.window_s[1]]
    return [(times[first], max(times[first], ends[last])) for first, last in result.trace.merged_frames]


def _chunk_responses(payload: memoryview):
    """EncodeResponse chunk messages, already serialized."""
    return transport.chunk_messages(payload, transport.ENCODE_CHUNK_FIELD)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, engine: EncoderEngine):
        self.engine = engine
        self.pulls = PullStore(engine.settings.pull_buffer_bytes, engine.settings.pull_ttl_s,
                               engine.settings.pull_shm_path())
        settings = engine.settings
        self.inputs = VideoInputs(settings.max_video_bytes, self.pulls.shm_dir,
                                  Path(settings.video_store_dir) if settings.video_store_dir else None)
        self.videos_taken = 0
        self._taken_lock = threading.Lock()

    def _video(self, first: encoder_pb2.EncodeInput, rest, context: grpc.ServicerContext):
        """The call's video: bytes, or a file mapped (one a sender on this host left, a stored upload,
        or the chunks that followed the request, written down)."""
        try:
            received = self.inputs.receive(first, rest)
        except InputError as err:
            context.abort(err.code, str(err))
        if received.taken:
            with self._taken_lock:
                self.videos_taken += 1
        return received.data

    def Encode(self, inputs, context: grpc.ServicerContext):
        first = next(inputs, None)
        if not isinstance(first, encoder_pb2.EncodeInput) or first.WhichOneof("item") != "request":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an Encode call starts with its request (EncodeInput."
                                                            "request); the video's chunks follow it")
        request = first.request
        try:
            compression = compression_from_proto(request.compression, self.engine.settings.compression)
            sampling = sampling_from_proto(request.sampling)
            video = self._video(first, inputs, context)  # after the settings: a bad one is refused before the video
            result = self.engine.encode(video, sampling, compression, request.max_visual_tokens,
                                        list(request.image_sizes))
        except SamplingError as err:
            context.set_trailing_metadata(((transport.PARAM_METADATA, err.param),))  # the REST field at fault
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (VideoError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        payload = tensors.tensor_bytes(result.tokens)
        ticket = self.pulls.put(payload) if request.offer_pull else ""
        header = header_for(result, tensors.describe(result.tokens, payload), self.engine.model_id, ticket)
        yield encoder_pb2.EncodeResponse(header=header)
        yield from _chunk_responses(payload)

    def Pull(self, request: encoder_pb2.PullRequest, context: grpc.ServicerContext):
        payload = self.pulls.take(request.ticket)
        if payload is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          "no tokens under this ticket here (used, expired, or another replica); "
                          "send them with the Generate call instead")
        yield from _chunk_responses(memoryview(payload))

    def Info(self, request, context):
        settings = self.engine.settings
        return encoder_pb2.EncoderInfo(
            model_id=self.engine.model_id,
            default_frames=settings.default_frames,
            max_frames=settings.max_frames,
            default_compression=compression_to_proto(settings.compression),
            encoder_layers=self.engine.vision.depth,
            tokens_per_frame=self.engine.vision.tokens_per_frame,
            hidden_size=self.engine.vision.hidden_size,
            dtype=settings.torch_dtype_name(),
            max_video_bytes=settings.max_video_bytes,
            encodes_completed=self.engine.encodes_completed,
            peak_memory_bytes=peak_memory_bytes(self.engine.vision.device),
            pulls_served=self.pulls.pulled,
            tower_batches=self.engine.batcher.batches_run,
            batch_max_frames=self.engine.batcher.max_frames,
            batch_max_requests=self.engine.batcher.max_requests,
            settings_json=json.dumps(public_settings(settings)),
            videos_taken=self.videos_taken,
        )


def start(settings: EncoderSettings, engine: EncoderEngine | None = None, servicer: EncoderServicer | None = None):
    """Start serving on settings.host:settings.port; returns (server, health, port)."""
    servicer = servicer or EncoderServicer(engine or EncoderEngine(settings))
    engine = servicer.engine
    # no message holds a whole video (it comes in chunks), so gRPC's default message limit is enough
    return start_service(settings, transport.ENCODE_MAX_MESSAGE_BYTES,
                         lambda server: transport.add_encoder_servicer(servicer, server),
                         SERVICE_NAME, "encoder", engine.model_id)


def serve(settings: EncoderSettings) -> None:
    servicer = EncoderServicer(EncoderEngine(settings))
    server, health, _ = start(settings, servicer=servicer)
    serve_metrics(encoder_registry(servicer.engine), settings.host, settings.metrics_port)
    try:
        run_until_signalled(server, health, [SERVICE_NAME], settings.drain_s)
    finally:
        servicer.pulls.close()  # no token files left in shared memory
        servicer.engine.close()
