"""The wire between the services, in one place: how a token tensor travels, which gRPC fields and
methods carry it, and the server and client registrations that send and read it without copies.

A token tensor never travels as one message (gRPC caps messages at 4 MiB by default) nor as a
list of floats. The sender describes it (shape, dtype, byte length, CRC-32) in a TensorHeader and
streams its raw little-endian bytes in chunk messages; the receiver joins them once and checks
length and checksum before use (`TensorAssembler`). The streams that carry chunks write and read
the protobuf encoding of a chunk message directly, so the bytes are copied once instead of three
times; it is byte for byte what protobuf writes and reads (tests/test_transport.py checks both
ways). Nothing here imports torch: the gateway only frames bytes. videollm/tensors.py turns a
tensor into bytes and back, for the encoder and the LLM.

A video that travels to the encoder goes the same way: Encode takes a stream whose first message
is the request (with the video's size) and whose following messages are the video's bytes in
chunks (`{video_chunk: TensorChunk{data}}`), so the encoder's message limit stays at gRPC's 4 MiB
default however large the video.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import grpc

from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc, tensor_pb2

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default, large enough to amortise overhead
VIDEO_CHUNK_BYTES = 2 << 20  # a video's chunks: fewer messages for a 1 GB file, still half the limit below
# The encoder's limit on one received message: gRPC's default, since no message holds a whole video
ENCODE_MAX_MESSAGE_BYTES = 4 << 20
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a tensor may travel in

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name
# trailing metadata of an INVALID_ARGUMENT: the REST field at fault (an error's `param` in the gateway)
PARAM_METADATA = "videollm-param"
# trailing metadata of the LLM's INVALID_ARGUMENT for a prompt over its context: the visual tokens that would fit
VISUAL_FIT_METADATA = "videollm-visual-fit"
ENCODE_CHUNK_FIELD = encoder_pb2.EncodeResponse.DESCRIPTOR.fields_by_name["chunk"].number
VIDEO_CHUNK_FIELD = encoder_pb2.EncodeInput.DESCRIPTOR.fields_by_name["video_chunk"].number
VISUAL_CHUNK_FIELD = llm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["visual_chunk"].number


def method_path(service: str, method: str) -> str:
    return f"/{service}/{method}"


class WireError(ValueError):
    """The tensor that arrived does not match its header."""


# -- the header and the joined payload ------------------------------------------------------------


def describe(shape: Sequence[int], dtype: str, payload: memoryview) -> tensor_pb2.TensorHeader:
    if dtype not in ELEMENT_BYTES:
        raise WireError(f"cannot send dtype {dtype}; use one of {sorted(ELEMENT_BYTES)}")
    return tensor_pb2.TensorHeader(shape=list(shape), dtype=dtype, num_bytes=payload.nbytes,
                                   crc32=zlib.crc32(payload))


def checked_size(header: tensor_pb2.TensorHeader, max_bytes: int) -> int:
    """The payload size the header announces, once it agrees with the shape and fits max_bytes."""
    if header.dtype not in ELEMENT_BYTES:
        raise WireError(f"unknown tensor dtype {header.dtype!r}; expected one of {sorted(ELEMENT_BYTES)}")
    if any(dim < 0 for dim in header.shape):
        raise WireError(f"negative dimension in tensor shape {list(header.shape)}")
    size = ELEMENT_BYTES[header.dtype]
    for dim in header.shape:
        size *= dim
    if size != header.num_bytes:
        raise WireError(f"header says {header.num_bytes} bytes but shape {list(header.shape)} needs {size}")
    if size > max_bytes:
        raise WireError(f"tensor of {size} bytes exceeds the limit of {max_bytes} bytes")
    return size


class TensorAssembler:
    """Collects the chunks of one header into one buffer and returns it once it is whole and intact."""

    def __init__(self, header: tensor_pb2.TensorHeader, max_bytes: int):
        self.header = header
        self._buffer = bytearray(checked_size(header, max_bytes))
        self._filled = 0
        self._crc = 0

    def add(self, data: bytes | memoryview) -> None:
        end = self._filled + len(data)
        if end > len(self._buffer):
            raise WireError(f"received more than the {len(self._buffer)} bytes the header announced")
        self._buffer[self._filled : end] = data
        self._crc = zlib.crc32(data, self._crc)
        self._filled = end

    def payload(self) -> bytearray:
        if self._filled != len(self._buffer):
            raise WireError(f"tensor incomplete: {self._filled} of {len(self._buffer)} bytes arrived")
        if self._crc != self.header.crc32:
            raise WireError("tensor checksum mismatch: the payload was corrupted in transit")
        return self._buffer


def pieces(payload: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The payload in chunk-sized views (no copies)."""
    for start in range(0, payload.nbytes, chunk_bytes):
        yield payload[start : start + chunk_bytes]


# -- chunk messages, written and read directly ----------------------------------------------------
# A chunk message is `{field: TensorChunk{data: 1}}`.

_DATA_TAG = b"\x0a"  # TensorChunk.data: field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(view) and shift < 64:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WireError("malformed chunk message: truncated length")


def chunk_message(piece: bytes | memoryview, field: int) -> bytes:
    """The serialized message `{field: TensorChunk{data: piece}}`."""
    inner = _DATA_TAG + _varint(len(piece))
    return b"".join((_varint(field << 3 | 2), _varint(len(inner) + len(piece)), inner, piece))


def chunk_messages(payload: memoryview, field: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized `{field: TensorChunk{data}}` messages carrying payload in chunks."""
    for piece in pieces(payload, chunk_bytes):
        yield chunk_message(piece, field)


def chunk_data(message: bytes, field: int) -> memoryview:
    """The data of a serialized `{field: TensorChunk{data}}` message, as a view (no copy)."""
    view = memoryview(message)
    tag = _varint(field << 3 | 2)
    if bytes(view[: len(tag)]) != tag:
        raise WireError("expected a tensor chunk message")
    size, pos = _read_varint(view, len(tag))
    if pos + size != len(view):
        raise WireError("malformed chunk message: length mismatch")
    if size == 0:
        return view[pos:pos]
    if bytes(view[pos : pos + 1]) != _DATA_TAG:
        raise WireError("malformed chunk message: expected the data field")
    length, pos = _read_varint(view, pos + 1)
    if pos + length != len(view):
        raise WireError("malformed chunk message: data length mismatch")
    return view[pos:]


def serialize(message) -> bytes:
    """gRPC serializer for streams that mix protobuf messages and pre-serialized chunk messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def encode_inputs(request: encoder_pb2.EncodeRequest, video: bytes | memoryview,
                  chunk_bytes: int = VIDEO_CHUNK_BYTES) -> Iterator[encoder_pb2.EncodeInput]:
    """The messages of an Encode call that sends `video` in chunks: the request with the video's
    size, then the chunks (for direct callers with the generated stub; the gateway writes the chunk
    messages pre-serialized)."""
    first = encoder_pb2.EncodeRequest(video_size=len(video))
    first.MergeFrom(request)
    yield encoder_pb2.EncodeInput(request=first)
    for piece in pieces(memoryview(video), chunk_bytes):
        yield encoder_pb2.EncodeInput(video_chunk=tensor_pb2.TensorChunk(data=bytes(piece)))


def _encode_input(message: bytes):
    """A video chunk as a view of its data (no protobuf object, no copy); any other message parsed."""
    try:
        return chunk_data(message, VIDEO_CHUNK_FIELD)
    except WireError:
        return encoder_pb2.EncodeInput.FromString(message)


def _generate_request(message: bytes):
    """A visual chunk as a view of its data (no protobuf object, no copy); any other message parsed."""
    try:
        return chunk_data(message, VISUAL_CHUNK_FIELD)
    except WireError:
        return llm_pb2.GenerateRequest.FromString(message)


# -- servers: the generated registrations, except where chunks pass -------------------------------


def add_encoder_servicer(servicer, server: grpc.Server) -> None:
    """Encode and Pull may stream pre-serialized chunk messages (bytes); Encode reads each video
    chunk as a view of its data (see `_encode_input`)."""
    handlers = {
        "Encode": grpc.stream_stream_rpc_method_handler(
            servicer.Encode, request_deserializer=_encode_input, response_serializer=serialize),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=encoder_pb2.PullRequest.FromString, response_serializer=serialize),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=encoder_pb2.InfoRequest.FromString,
            response_serializer=encoder_pb2.EncoderInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ENCODER_SERVICE, handlers),))


def add_llm_servicer(servicer, server: grpc.Server) -> None:
    """Generate reads each visual chunk as a view of its data (see `_generate_request`)."""
    handlers = {
        "Generate": grpc.stream_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_generate_request,
            response_serializer=llm_pb2.GenerateResponse.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=llm_pb2.LLMInfoRequest.FromString,
            response_serializer=llm_pb2.LLMInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(LLM_SERVICE, handlers),))


# -- clients ---------------------------------------------------------------------------------------


def llm_stub(channel: grpc.aio.Channel) -> llm_pb2_grpc.LLMStub:
    """The generated stub, except that Generate also takes pre-serialized chunk messages (bytes)."""
    stub = llm_pb2_grpc.LLMStub(channel)
    stub.Generate = channel.stream_stream(method_path(LLM_SERVICE, "Generate"), request_serializer=serialize,
                                          response_deserializer=llm_pb2.GenerateResponse.FromString)
    return stub


def encoder_stub(channel: grpc.aio.Channel) -> encoder_pb2_grpc.EncoderStub:
    """The generated stub, except that Encode also takes pre-serialized chunk messages (bytes)."""
    stub = encoder_pb2_grpc.EncoderStub(channel)
    stub.Encode = channel.stream_stream(method_path(ENCODER_SERVICE, "Encode"), request_serializer=serialize,
                                        response_deserializer=encoder_pb2.EncodeResponse.FromString)
    return stub


def pull_call(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    """Encoder.Pull, reading each chunk as a view into the received message."""
    return channel.unary_stream(method_path(ENCODER_SERVICE, "Pull"),
                                request_serializer=encoder_pb2.PullRequest.SerializeToString,
                                response_deserializer=lambda message: chunk_data(message, ENCODE_CHUNK_FIELD))
