from protos.videollm.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncoderInfo(_message.Message):
    __slots__ = ("model_id", "default_frames", "max_frames", "default_compression", "encoder_layers", "tokens_per_frame", "hidden_size", "dtype", "max_video_bytes", "encodes_completed", "peak_memory_bytes", "pulls_served", "tower_batches", "batch_max_frames", "batch_max_requests", "settings_json", "videos_taken")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_VIDEO_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODES_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    TOWER_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_TAKEN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    default_frames: int
    max_frames: int
    default_compression: Compression
    encoder_layers: int
    tokens_per_frame: int
    hidden_size: int
    dtype: str
    max_video_bytes: int
    encodes_completed: int
    peak_memory_bytes: int
    pulls_served: int
    tower_batches: int
    batch_max_frames: int
    batch_max_requests: int
    settings_json: str
    videos_taken: int
    def __init__(self, model_id: _Optional[str] = ..., default_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., default_compression: _Optional[_Union[Compression, _Mapping]] = ..., encoder_layers: _Optional[int] = ..., tokens_per_frame: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., max_video_bytes: _Optional[int] = ..., encodes_completed: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., pulls_served: _Optional[int] = ..., tower_batches: _Optional[int] = ..., batch_max_frames: _Optional[int] = ..., batch_max_requests: _Optional[int] = ..., settings_json: _Optional[str] = ..., videos_taken: _Optional[int] = ...) -> None: ...

class FrameSampling(_message.Message):
    __slots__ = ("num_frames", "fps", "max_frames", "start_s", "end_s")
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    num_frames: int
    fps: float
    max_frames: int
    start_s: float
    end_s: float
    def __init__(self, num_frames: _Optional[int] = ..., fps: _Optional[float] = ..., max_frames: _Optional[int] = ..., start_s: _Optional[float] = ..., end_s: _Optional[float] = ...) -> None: ...

class TimeSpan(_message.Message):
    __slots__ = ("start_s", "end_s")
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    start_s: float
    end_s: float
    def __init__(self, start_s: _Optional[float] = ..., end_s: _Optional[float] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("method", "retain_ratio", "tau", "max_window", "ema", "prune_layers", "d", "k", "beta")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RETAIN_RATIO_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOW_FIELD_NUMBER: _ClassVar[int]
    EMA_FIELD_NUMBER: _ClassVar[int]
    PRUNE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    method: str
    retain_ratio: float
    tau: float
    max_window: int
    ema: float
    prune_layers: LayerList
    d: float
    k: int
    beta: float
    def __init__(self, method: _Optional[str] = ..., retain_ratio: _Optional[float] = ..., tau: _Optional[float] = ..., max_window: _Optional[int] = ..., ema: _Optional[float] = ..., prune_layers: _Optional[_Union[LayerList, _Mapping]] = ..., d: _Optional[float] = ..., k: _Optional[int] = ..., beta: _Optional[float] = ...) -> None: ...

class LayerList(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layers: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("video", "sampling", "compression", "request_id", "offer_pull", "video_ticket", "video_size", "max_visual_tokens", "image_sizes")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OFFER_PULL_FIELD_NUMBER: _ClassVar[int]
    VIDEO_TICKET_FIELD_NUMBER: _ClassVar[int]
    VIDEO_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZES_FIELD_NUMBER: _ClassVar[int]
    video: bytes
    sampling: FrameSampling
    compression: Compression
    request_id: str
    offer_pull: bool
    video_ticket: str
    video_size: int
    max_visual_tokens: int
    image_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, video: _Optional[bytes] = ..., sampling: _Optional[_Union[FrameSampling, _Mapping]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., request_id: _Optional[str] = ..., offer_pull: _Optional[bool] = ..., video_ticket: _Optional[str] = ..., video_size: _Optional[int] = ..., max_visual_tokens: _Optional[int] = ..., image_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeInput(_message.Message):
    __slots__ = ("request", "video_chunk", "stored_video")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    VIDEO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    STORED_VIDEO_FIELD_NUMBER: _ClassVar[int]
    request: EncodeRequest
    video_chunk: _tensor_pb2.TensorChunk
    stored_video: str
    def __init__(self, request: _Optional[_Union[EncodeRequest, _Mapping]] = ..., video_chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., stored_video: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class KeptPositions(_message.Message):
    __slots__ = ("positions",)
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, positions: _Optional[_Iterable[int]] = ...) -> None: ...

class CompressionInfo(_message.Message):
    __slots__ = ("method", "frames_after_merge", "segments", "kept", "settings", "tokens_per_frame", "layer_frames", "scaled_prune_layers", "merged_frames")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FRAMES_AFTER_MERGE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SCALED_PRUNE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    method: str
    frames_after_merge: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    kept: _containers.RepeatedCompositeFieldContainer[KeptPositions]
    settings: Compression
    tokens_per_frame: int
    layer_frames: _containers.RepeatedScalarFieldContainer[int]
    scaled_prune_layers: _containers.RepeatedScalarFieldContainer[int]
    merged_frames: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, method: _Optional[str] = ..., frames_after_merge: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., kept: _Optional[_Iterable[_Union[KeptPositions, _Mapping]]] = ..., settings: _Optional[_Union[Compression, _Mapping]] = ..., tokens_per_frame: _Optional[int] = ..., layer_frames: _Optional[_Iterable[int]] = ..., scaled_prune_layers: _Optional[_Iterable[int]] = ..., merged_frames: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class EncodeTimings(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "vision_ms", "projector_ms", "queue_ms", "total_ms", "stage1_ms", "importance_ms", "stage2_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    VISION_MS_FIELD_NUMBER: _ClassVar[int]
    PROJECTOR_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE1_MS_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE2_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    vision_ms: float
    projector_ms: float
    queue_ms: float
    total_ms: float
    stage1_ms: float
    importance_ms: float
    stage2_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., vision_ms: _Optional[float] = ..., projector_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., stage1_ms: _Optional[float] = ..., importance_ms: _Optional[float] = ..., stage2_ms: _Optional[float] = ...) -> None: ...

class EncoderFlops(_message.Message):
    __slots__ = ("encoder", "encoder_uncompressed")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_UNCOMPRESSED_FIELD_NUMBER: _ClassVar[int]
    encoder: float
    encoder_uncompressed: float
    def __init__(self, encoder: _Optional[float] = ..., encoder_uncompressed: _Optional[float] = ...) -> None: ...

class EncodeHeader(_message.Message):
    __slots__ = ("tensor", "frames_sampled", "source_duration_s", "source_fps", "source_frames", "frame_indices", "timings", "compression", "model_id", "flops", "uncompressed_tokens", "pull_ticket", "batch_requests", "batch_frames", "source_rotation", "source_mirrored", "frame_timestamps_s", "source_color", "sampling", "output_spans")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PULL_TICKET_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ROTATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MIRRORED_FIELD_NUMBER: _ClassVar[int]
    FRAME_TIMESTAMPS_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_COLOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SPANS_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.TensorHeader
    frames_sampled: int
    source_duration_s: float
    source_fps: float
    source_frames: int
    frame_indices: _containers.RepeatedScalarFieldContainer[int]
    timings: EncodeTimings
    compression: CompressionInfo
    model_id: str
    flops: EncoderFlops
    uncompressed_tokens: int
    pull_ticket: str
    batch_requests: int
    batch_frames: int
    source_rotation: int
    source_mirrored: bool
    frame_timestamps_s: _containers.RepeatedScalarFieldContainer[float]
    source_color: SourceColor
    sampling: FrameSampling
    output_spans: _containers.RepeatedCompositeFieldContainer[TimeSpan]
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., frames_sampled: _Optional[int] = ..., source_duration_s: _Optional[float] = ..., source_fps: _Optional[float] = ..., source_frames: _Optional[int] = ..., frame_indices: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[EncodeTimings, _Mapping]] = ..., compression: _Optional[_Union[CompressionInfo, _Mapping]] = ..., model_id: _Optional[str] = ..., flops: _Optional[_Union[EncoderFlops, _Mapping]] = ..., uncompressed_tokens: _Optional[int] = ..., pull_ticket: _Optional[str] = ..., batch_requests: _Optional[int] = ..., batch_frames: _Optional[int] = ..., source_rotation: _Optional[int] = ..., source_mirrored: _Optional[bool] = ..., frame_timestamps_s: _Optional[_Iterable[float]] = ..., source_color: _Optional[_Union[SourceColor, _Mapping]] = ..., sampling: _Optional[_Union[FrameSampling, _Mapping]] = ..., output_spans: _Optional[_Iterable[_Union[TimeSpan, _Mapping]]] = ...) -> None: ...

class SourceColor(_message.Message):
    __slots__ = ("transfer", "primaries", "bit_depth", "conversion")
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PRIMARIES_FIELD_NUMBER: _ClassVar[int]
    BIT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    transfer: str
    primaries: str
    bit_depth: int
    conversion: str
    def __init__(self, transfer: _Optional[str] = ..., primaries: _Optional[str] = ..., bit_depth: _Optional[int] = ..., conversion: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    def __init__(self, ticket: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EncodeHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[EncodeHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...
