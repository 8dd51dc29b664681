from protos.videollm.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LLMInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LLMInfo(_message.Message):
    __slots__ = ("model_id", "hidden_size", "default_max_tokens", "max_tokens_limit", "max_context_tokens", "dtype", "generations_completed", "peak_memory_bytes", "visual_pulls", "visual_pull_fallbacks", "decode_slots", "active_sequences", "waiting_sequences", "visual_pulls_shared_memory", "settings_json")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VISUAL_PULLS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_PULL_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    VISUAL_PULLS_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    hidden_size: int
    default_max_tokens: int
    max_tokens_limit: int
    max_context_tokens: int
    dtype: str
    generations_completed: int
    peak_memory_bytes: int
    visual_pulls: int
    visual_pull_fallbacks: int
    decode_slots: int
    active_sequences: int
    waiting_sequences: int
    visual_pulls_shared_memory: int
    settings_json: str
    def __init__(self, model_id: _Optional[str] = ..., hidden_size: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., generations_completed: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., visual_pulls: _Optional[int] = ..., visual_pull_fallbacks: _Optional[int] = ..., decode_slots: _Optional[int] = ..., active_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., visual_pulls_shared_memory: _Optional[int] = ..., settings_json: _Optional[str] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    video: bool
    def __init__(self, text: _Optional[str] = ..., video: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class InnerCompression(_message.Message):
    __slots__ = ("layer", "drop_ratio")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DROP_RATIO_FIELD_NUMBER: _ClassVar[int]
    layer: int
    drop_ratio: float
    def __init__(self, layer: _Optional[int] = ..., drop_ratio: _Optional[float] = ...) -> None: ...

class GenerateSetup(_message.Message):
    __slots__ = ("messages", "sampling", "visual", "request_id", "uncompressed_visual_tokens", "inner", "video_key", "pull")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    VISUAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INNER_FIELD_NUMBER: _ClassVar[int]
    VIDEO_KEY_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sampling: SamplingParams
    visual: _tensor_pb2.TensorHeader
    request_id: str
    uncompressed_visual_tokens: int
    inner: InnerCompression
    video_key: str
    pull: VisualPull
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., visual: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., request_id: _Optional[str] = ..., uncompressed_visual_tokens: _Optional[int] = ..., inner: _Optional[_Union[InnerCompression, _Mapping]] = ..., video_key: _Optional[str] = ..., pull: _Optional[_Union[VisualPull, _Mapping]] = ...) -> None: ...

class VisualPull(_message.Message):
    __slots__ = ("address", "ticket")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    address: str
    ticket: str
    def __init__(self, address: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("setup", "visual_chunk")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    VISUAL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    setup: GenerateSetup
    visual_chunk: _tensor_pb2.TensorChunk
    def __init__(self, setup: _Optional[_Union[GenerateSetup, _Mapping]] = ..., visual_chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "visual_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., visual_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateTimings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_tokens_per_s", "receive_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    receive_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., receive_ms: _Optional[float] = ...) -> None: ...

class PrefillFlops(_message.Message):
    __slots__ = ("prefill", "prefill_uncompressed")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_UNCOMPRESSED_FIELD_NUMBER: _ClassVar[int]
    prefill: float
    prefill_uncompressed: float
    def __init__(self, prefill: _Optional[float] = ..., prefill_uncompressed: _Optional[float] = ...) -> None: ...

class GenerateFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "flops")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    usage: Usage
    timings: GenerateTimings
    flops: PrefillFlops
    def __init__(self, finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[GenerateTimings, _Mapping]] = ..., flops: _Optional[_Union[PrefillFlops, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("need_visual",)
    NEED_VISUAL_FIELD_NUMBER: _ClassVar[int]
    need_visual: bool
    def __init__(self, need_visual: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "final", "accepted")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: GenerateFinal
    accepted: Accepted
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateFinal, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ...) -> None: ...
