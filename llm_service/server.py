"""gRPC edge of the LLM: GenerateSetup + visual token chunks -> engine -> text deltas + final."""

from __future__ import annotations

import json
import threading
import time

import grpc

from llm_service.pull import EncoderPuller
from llm_service.engine import ContextTooLong, Delta, GenerateRequestError, GenerationRequest, LLMEngine, Overloaded
from llm_service.prompt import VIDEO, Message
from llm_service.sampling import SamplingParams
from protos.videollm.v1 import llm_pb2, llm_pb2_grpc
from videollm import tensors, transport
from videollm.checkpoint import peak_memory_bytes
from videollm.grpc_server import MiB, run_until_signalled, start_service
from videollm.proto_mapping import inner_from_proto
from videollm.service_metrics import llm_registry, serve_metrics
from videollm.settings import InnerCompressionSettings, LLMSettings, public_settings

SERVICE_NAME = transport.LLM_SERVICE


def messages_from_proto(messages) -> list[Message]:
    return [
        Message(m.role, tuple(VIDEO if part.WhichOneof("part") == "video" else part.text for part in m.content))
        for m in messages
    ]


def sampling_from_proto(sampling: llm_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens or default_max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p if 0 < sampling.top_p else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


def final_to_proto(final) -> llm_pb2.GenerateResponse:
    return llm_pb2.GenerateResponse(
        final=llm_pb2.GenerateFinal(
            finish_reason=final.finish_reason,
            usage=llm_pb2.Usage(
                prompt_tokens=final.prompt_tokens,
                visual_tokens=final.visual_tokens,
                completion_tokens=final.completion_tokens,
            ),
            timings=llm_pb2.GenerateTimings(
                queue_ms=final.queue_ms,
                prefill_ms=final.prefill_ms,
                ttft_ms=final.ttft_ms,
                decode_ms=final.decode_ms,
                decode_tokens_per_s=final.decode_tokens_per_s,
                receive_ms=final.receive_ms,
            ),
            flops=llm_pb2.PrefillFlops(
                prefill=final.prefill_flops, prefill_uncompressed=final.prefill_flops_uncompressed
            ),
        )
    )


class LLMServicer(llm_pb2_grpc.LLMServicer):
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.puller = EncoderPuller(engine.settings.max_visual_bytes, engine.settings.pull_timeout_s,
                                    engine.settings.pull_shm_path())

    def _request_from_setup(self, setup: llm_pb2.GenerateSetup, context, arrived: float) -> GenerationRequest:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        return GenerationRequest(
            messages=messages_from_proto(setup.messages),
            sampling=sampling_from_proto(setup.sampling, self.engine.settings.default_max_tokens),
            is_cancelled=cancelled.is_set,
            arrived_at=arrived,
            uncompressed_visual_tokens=setup.uncompressed_visual_tokens,
            inner=self._inner(setup),
            video_key=setup.video_key,
        )

    @staticmethod
    def _inner(setup: llm_pb2.GenerateSetup) -> InnerCompressionSettings | None:
        if not setup.HasField("inner"):
            return None
        try:
            return inner_from_proto(setup.inner)
        except ValueError as err:
            raise GenerateRequestError(str(err)) from err

    def _read_visual(self, header, request_iterator):
        assembler = transport.TensorAssembler(header, self.engine.settings.max_visual_bytes)
        for message in request_iterator:
            if not isinstance(message, memoryview):  # chunks arrive as views of their data (transport)
                raise GenerateRequestError("only visual_chunk messages may follow the GenerateSetup")
            assembler.add(message)
        return tensors.received(assembler)  # [N, D]

    def Generate(self, request_iterator, context: grpc.ServicerContext):
        arrived = time.perf_counter()
        try:
            first = next(request_iterator, None)
            if first is None or isinstance(first, memoryview) or first.WhichOneof("item") != "setup":
                raise GenerateRequestError("the first message of Generate must be a GenerateSetup")
            setup = first.setup
            request = self._request_from_setup(setup, context, arrived)
            if setup.HasField("visual"):
                need_visual = self.engine.needs_visual(request)
                if need_visual and setup.pull.ticket:  # straight from the encoder, if it still has them
                    request.visual = self.puller.pull(setup.visual, setup.pull)
                    need_visual = request.visual is None
                yield llm_pb2.GenerateResponse(accepted=llm_pb2.Accepted(need_visual=need_visual))
                if need_visual:
                    request.visual = self._read_visual(setup.visual, request_iterator)
                elif request.visual is None:
                    request.visual_count = setup.visual.shape[0] if setup.visual.shape else 0
            request.receive_ms = (time.perf_counter() - arrived) * 1e3
            events = self.engine.generate(request)
            first_event = next(events)  # validation errors surface here, before any text is sent
        except ContextTooLong as err:  # the gateway turns the room left into advice in the request's terms
            context.set_trailing_metadata(((transport.VISUAL_FIT_METADATA, str(err.visual_fit)),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (GenerateRequestError, transport.WireError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        try:
            for event in _chain(first_event, events):
                if isinstance(event, Delta):
                    yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=event.text))
                else:
                    yield final_to_proto(event)
        finally:
            events.close()  # a cancelled call leaves the loop here: free the device and the KV cache

    def Info(self, request, context):
        settings = self.engine.settings
        return llm_pb2.LLMInfo(
            model_id=self.engine.model_id,
            hidden_size=self.engine.lm.hidden_size,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            max_context_tokens=settings.max_context_tokens,
            dtype=settings.torch_dtype_name(),
            generations_completed=self.engine.generations_completed,
            peak_memory_bytes=peak_memory_bytes(self.engine.lm.device),
            visual_pulls=self.puller.pulled,
            visual_pull_fallbacks=self.puller.failed,
            visual_pulls_shared_memory=self.puller.from_shared_memory,
            decode_slots=self.engine.runner.slots,
            active_sequences=self.engine.batcher.active,
            waiting_sequences=self.engine.batcher.waiting,
            settings_json=json.dumps(public_settings(settings)),
        )


def _chain(first, rest):
    yield first
    yield from rest


def start(settings: LLMSettings, engine: LLMEngine | None = None):
    """Start serving on settings.host:settings.port; returns (server, health, port)."""
    engine = engine or LLMEngine(settings)
    servicer = LLMServicer(engine)
    return start_service(settings, 16 * MiB, lambda server: transport.add_llm_servicer(servicer, server),
                         SERVICE_NAME, "LLM", engine.model_id)


def serve(settings: LLMSettings) -> None:
    engine = LLMEngine(settings)
    server, health, _ = start(settings, engine)
    serve_metrics(llm_registry(engine), settings.host, settings.metrics_port)
    run_until_signalled(server, health, [SERVICE_NAME], settings.drain_s)
