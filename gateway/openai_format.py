"""OpenAI's chat completions format <-> the gateway's own terms.

In: a ChatCompletionRequest becomes a ChatRequest (the prompt as the LLM's messages, the sampling,
the video with its `videollm` options, Stage III). Out: the chat.completion object or the stream's
chat.completion.chunk events, the usage, and the `videollm` object that reports what the stack did.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

from pydantic import ValidationError

from gateway.errors import bad_request
from gateway.requests import ChatRequest, Outcome, VideoRequest
from gateway.schemas import ChatCompletionRequest, ChatMessage, ImagePart, ImageURL, TextPart, VideoPart, VideoURL
from gateway.videos import VideoSources
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.frame_sampling import FrameSampling
from videollm.proto_mapping import compression_from_proto, describe_validation_error, inner_to_proto, sampling_dict
from videollm.settings import CompressionSettings

ENCODER_STAGES = ("decode", "preprocess", "queue", "vision", "stage1", "importance", "projector", "stage2", "total")

# -- in -------------------------------------------------------------------------------------------


async def to_chat_request(body: ChatCompletionRequest, videos: VideoSources, preset: dict) -> ChatRequest:
    """preset: the compression overrides of the model the request named (a preset), under its own."""
    messages, visual = prompt_messages(body.messages)
    video = None
    if visual is not None:
        options = body.videollm
        overrides = {**preset, **(options.compression.encoder_fields() if options.compression else {})}
        if isinstance(visual, VideoURL):
            source, sampling = await videos.resolve(visual.url, visual.payload), frame_sampling(body)
        else:  # frames as images: taken as they are
            if body.videollm.sampling().model_dump(exclude_none=True) or body.media_io_kwargs is not None:
                raise bad_request("frames sent as images are taken as they are, every one in order: leave out the "
                                  "frame sampling (videollm.num_frames, fps, max_frames, start_s, end_s, "
                                  "media_io_kwargs)", "videollm")
            source = await videos.resolve_images([image.url for image in visual])
            sampling = FrameSampling(num_frames=len(visual))
        video = VideoRequest(source, sampling, overrides, options.max_visual_tokens)
    elif any(value is not None for value in body.videollm.model_dump().values()):
        raise bad_request("videollm options need a video_url content part", "videollm")
    elif body.media_io_kwargs is not None and body.media_io_kwargs.video is not None:
        raise bad_request("media_io_kwargs.video needs a video_url content part", "media_io_kwargs")
    inner = body.videollm.inner_compression
    return ChatRequest(messages, sampling_params(body), video, inner_to_proto(inner) if inner is not None else None)


def frame_sampling(body: ChatCompletionRequest) -> FrameSampling:
    """The request's frame sampling, from `videollm` or from vLLM's `media_io_kwargs.video`."""
    asked = body.videollm.sampling()
    vllm = body.media_io_kwargs.video if body.media_io_kwargs is not None else None
    if vllm is None:
        return asked
    if asked.model_dump(exclude_none=True, exclude={"start_s", "end_s"}):
        raise bad_request("give the frame sampling in videollm or in media_io_kwargs.video, not both",
                          "media_io_kwargs.video")
    try:
        return vllm.sampling().model_copy(update={"start_s": asked.start_s, "end_s": asked.end_s})
    except ValidationError as err:
        raise bad_request(describe_validation_error(err, "media_io_kwargs.video", FrameSampling),
                          "media_io_kwargs.video") from err


def prompt_messages(messages: list[ChatMessage]) -> tuple[list[llm_pb2.ChatMessage], VideoURL | list[ImageURL] | None]:
    """The LLM's messages and what the video is: a video part's URL, or the image parts of a message
    (one video's frames, in order). The video takes its place in the prompt where its part is, or
    where the first image is."""
    out, visual, visual_message = [], None, None
    for message in messages:
        parts = [message.content] if isinstance(message.content, str) else message.content
        converted = llm_pb2.ChatMessage(role=message.role)
        for part in parts:
            if isinstance(part, str):
                converted.content.add(text=part)
            elif isinstance(part, TextPart):
                converted.content.add(text=part.text)
            elif isinstance(part, VideoPart):
                if visual is not None:
                    raise bad_request("at most one video per request is supported (a video_url part, or the "
                                      "image_url parts of one message as its frames)", "messages")
                visual = part.video_url
                converted.content.add(video=True)
            elif isinstance(part, ImagePart):
                if isinstance(visual, list) and visual_message is message:
                    visual.append(part.image_url)  # the next frame
                    continue
                if visual is not None:
                    raise bad_request("at most one video per request is supported: the image_url parts of one "
                                      "message are its frames, beside no video_url part", "messages")
                visual, visual_message = [part.image_url], message
                converted.content.add(video=True)
        out.append(converted)
    return out, visual


def sampling_params(body: ChatCompletionRequest) -> llm_pb2.SamplingParams:
    sampling = llm_pb2.SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or 0,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_list(),
    )
    if body.seed is not None:
        sampling.seed = body.seed
    return sampling


# -- out ------------------------------------------------------------------------------------------


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Completion:
    """The OpenAI objects of one chat completion's response: the whole answer, or the stream's chunks."""

    def __init__(self, model: str, received_at: float):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.received_at = received_at

    def whole(self, text: str, outcome: Outcome) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason(outcome),
                    "logprobs": None,
                }
            ],
            "usage": usage_object(outcome.final),
            "videollm": videollm_object(outcome, self.received_at),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra)

    def closing_chunks(self, outcome: Outcome, include_usage: bool) -> Iterator[str]:
        """After the text: the finish reason with the `videollm` object, the usage if asked, [DONE]."""
        yield self.chunk({}, finish_reason(outcome), videollm=videollm_object(outcome, self.received_at))
        if include_usage:
            yield self._event([], usage=usage_object(outcome.final))
        yield "data: [DONE]\n\n"

    def _event(self, choices: list, **extra) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": choices, **extra})


def finish_reason(outcome: Outcome) -> str:
    return outcome.final.finish_reason if outcome.final else "stop"


def usage_object(final: llm_pb2.GenerateFinal | None) -> dict | None:
    if final is None:
        return None
    prompt = final.usage.prompt_tokens + final.usage.visual_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": final.usage.completion_tokens,
        "total_tokens": prompt + final.usage.completion_tokens,
    }


def videollm_object(outcome: Outcome, received_at: float) -> dict:
    header, final = outcome.header, outcome.final
    body = {
        "cache": outcome.cache,
        "frames": header.frames_sampled if header is not None else 0,
        "visual_tokens": final.usage.visual_tokens if final else 0,
        "max_visual_tokens": outcome.max_visual_tokens or None,
        "timings_ms": timings_object(outcome, received_at),
        "decode_tokens_per_s": round(final.timings.decode_tokens_per_s, 2) if final else None,
    }
    if header is not None:
        body.update(encoding_report(header, final))
    return body


def _since(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1e3, 3) if start is not None and end is not None else None


def timings_object(outcome: Outcome, received_at: float) -> dict:
    header, final = outcome.header, outcome.final
    now = time.perf_counter()
    ttft = (outcome.first_token_at or now) - received_at
    encoded = header is not None and outcome.cache == "miss"
    return {
        "encode": round(header.timings.total_ms, 3) if encoded else 0.0,
        "prefill": round(final.timings.prefill_ms, 3) if final else None,
        "ttft": round(ttft * 1e3, 3),
        "llm_ttft": round(final.timings.ttft_ms, 3) if final else None,  # LLM call start -> first token
        "total": round((now - received_at) * 1e3, 3),
        "llm_queue": round(final.timings.queue_ms, 3) if final else None,
        # from the LLM call's start until the whole visual tensor arrived there and was checked
        "handoff": round(final.timings.receive_ms, 3) if final else None,
        # the gateway's hops: the body (received, parsed and validated before the route runs), then from
        # the route ("request in") to the Encode call (the video's bytes, hashing, cache lookup), the
        # Encode call until its header (encoder and gRPC), request in -> Generate call
        "body": _since(outcome.arrived_at, received_at),
        "gateway_in": _since(received_at, outcome.encode_called_at),
        "encode_call": _since(outcome.encode_called_at, outcome.encode_header_at),
        "to_llm_call": _since(received_at, outcome.llm_called_at),
    }


def encoding_report(header: encoder_pb2.EncodeHeader, final: llm_pb2.GenerateFinal | None) -> dict:
    """What the encoder did: the source, EarlyTom's segments and kept positions, timings, FLOPs."""
    info = header.compression
    return {
        "source": {
            "duration_s": round(header.source_duration_s, 3),
            "fps": round(header.source_fps, 3),
            "frames": header.source_frames,
            "frame_indices": list(header.frame_indices),
            # when each sampled frame is shown, from the frames' own timestamps (null when the file has none)
            "timestamps_s": [round(t, 6) for t in header.frame_timestamps_s] or None,
            # how the frames were turned upright from their storage (the display matrix)
            "rotation": header.source_rotation,
            "mirrored": header.source_mirrored,
            # the source's colour tags, and whether HDR (PQ, HLG) was tone-mapped to the SDR the model knows
            "color": {"transfer": header.source_color.transfer, "primaries": header.source_color.primaries,
                      "bit_depth": header.source_color.bit_depth, "conversion": header.source_color.conversion},
        },
        # the sampling as resolved against the video (the window in seconds), and the frames it took
        "sampling": {**sampling_dict(header.sampling), "frame_indices": list(header.frame_indices),
                     "timestamps_s": [round(t, 6) for t in header.frame_timestamps_s] or None},
        "frames_after_merge": info.frames_after_merge,
        "segments": [[s.first, s.last] for s in info.segments],
        # per output frame: the sampled frames Stage I fused into it, and the time they stand for
        # (until the next sampled frame)
        "merged_frames": [[s.first, s.last] for s in info.merged_frames],
        "output_spans_s": [[round(s.start_s, 6), round(s.end_s, 6)] for s in header.output_spans] or None,
        "kept": [list(k.positions) for k in info.kept],
        "compression": {
            "method": info.method,
            "tokens_per_frame": info.tokens_per_frame,
            "uncompressed_tokens": header.uncompressed_tokens,
            "layer_frames": list(info.layer_frames),
            "settings": compression_settings_dict(info.settings),
        },
        "encoder_timings_ms": {name: round(getattr(header.timings, name + "_ms"), 3) for name in ENCODER_STAGES},
        # the requests whose frames shared the vision tower's pass with this one's (itself included)
        "encoder_batch": {"requests": header.batch_requests, "frames": header.batch_frames},
        "flops": {
            "encoder": header.flops.encoder,
            "encoder_uncompressed": header.flops.encoder_uncompressed,
            "prefill": final.flops.prefill if final else None,
            "prefill_uncompressed": final.flops.prefill_uncompressed if final else None,
        },
    }


def compression_settings_dict(message: encoder_pb2.Compression) -> dict:
    """The encoder's resolved compression settings, as the request's `videollm.compression` spells them."""
    return compression_from_proto(message, CompressionSettings()).model_dump() if message.method else {}
