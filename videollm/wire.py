"""Tensor framing shared by every hop: a TensorHeader, then raw little-endian chunks.

A token tensor never travels as one message (gRPC caps messages at 4 MiB by default) nor as a
list of floats. The sender describes it (shape, dtype, byte length, CRC-32) and streams its bytes
in fixed-size chunks; the receiver joins them once and checks length and checksum before use.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable, Iterator

import torch

from protos.videollm.v1 import tensor_pb2

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default, large enough to amortise overhead

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

assert sys.byteorder == "little", "the wire format is little-endian and so must the host be"


class WireError(ValueError):
    """The tensor that arrived does not match its header."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)  # [num_bytes]
    return memoryview(flat.numpy())


def describe(tensor: torch.Tensor, payload: memoryview) -> tensor_pb2.TensorHeader:
    if tensor.dtype not in DTYPE_NAMES:
        raise WireError(f"cannot send dtype {tensor.dtype}; use one of {sorted(WIRE_DTYPES)}")
    return tensor_pb2.TensorHeader(
        shape=list(tensor.shape),
        dtype=DTYPE_NAMES[tensor.dtype],
        num_bytes=payload.nbytes,
        crc32=zlib.crc32(payload),
    )


def chunks(payload: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    for start in range(0, payload.nbytes, chunk_bytes):
        yield bytes(payload[start : start + chunk_bytes])


# A chunk message on the token streams is `{field: TensorChunk{data: 1}}`. Streams that carry only
# chunks write and read that protobuf encoding directly: one copy of the bytes instead of three.
# It is byte for byte what protobuf writes and reads (tests/test_wire.py checks both ways).
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
    for start in range(0, payload.nbytes, chunk_bytes):
        yield chunk_message(payload[start : start + chunk_bytes], field)


def serialize(message) -> bytes:
    """gRPC serializer for streams that mix protobuf messages and pre-serialized chunk messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


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


def expected_bytes(header: tensor_pb2.TensorHeader) -> int:
    if header.dtype not in WIRE_DTYPES:
        raise WireError(f"unknown tensor dtype {header.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    if any(dim < 0 for dim in header.shape):
        raise WireError(f"negative dimension in tensor shape {list(header.shape)}")
    count = 1
    for dim in header.shape:
        count *= dim
    return count * torch.empty((), dtype=WIRE_DTYPES[header.dtype]).element_size()


def checked_size(header: tensor_pb2.TensorHeader, max_bytes: int) -> int:
    """The payload size the header announces, once it agrees with the shape and fits max_bytes."""
    size = expected_bytes(header)
    if size != header.num_bytes:
        raise WireError(f"header says {header.num_bytes} bytes but shape {list(header.shape)} needs {size}")
    if size > max_bytes:
        raise WireError(f"tensor of {size} bytes exceeds the limit of {max_bytes} bytes")
    return size


def as_tensor(header: tensor_pb2.TensorHeader, buffer) -> torch.Tensor:
    """A writable buffer of exactly the header's checked size -> the tensor, sharing its memory."""
    dtype = WIRE_DTYPES[header.dtype]
    if not buffer:
        return torch.empty(tuple(header.shape), dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8)  # shares the buffer, no copy
    return flat.view(dtype).reshape(tuple(header.shape))


class TensorAssembler:
    """Collects chunks for one header and returns the checked tensor."""

    def __init__(self, header: tensor_pb2.TensorHeader, max_bytes: int):
        self.header = header
        self._buffer = bytearray(checked_size(header, max_bytes))
        self._filled = 0
        self._crc = 0

    def add(self, data: bytes) -> None:
        end = self._filled + len(data)
        if end > len(self._buffer):
            raise WireError(f"received more than the {len(self._buffer)} bytes the header announced")
        self._buffer[self._filled : end] = data
        self._crc = zlib.crc32(data, self._crc)
        self._filled = end

    @property
    def complete(self) -> bool:
        return self._filled == len(self._buffer)

    def tensor(self) -> torch.Tensor:
        if not self.complete:
            raise WireError(f"tensor incomplete: {self._filled} of {len(self._buffer)} bytes arrived")
        if self._crc != self.header.crc32:
            raise WireError("tensor checksum mismatch: the payload was corrupted in transit")
        return as_tensor(self.header, self._buffer)


def assemble(header: tensor_pb2.TensorHeader, pieces: Iterable[bytes], max_bytes: int) -> torch.Tensor:
    assembler = TensorAssembler(header, max_bytes)
    for piece in pieces:
        assembler.add(piece)
    return assembler.tensor()
