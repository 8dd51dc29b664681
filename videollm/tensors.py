"""Token tensors to the wire's bytes and back (videollm/transport.py frames the bytes).

The bytes are the tensor's own memory, row-major and little-endian; a received payload becomes a
tensor that shares its buffer. The encoder and the LLM use this; the gateway never needs torch.
"""

from __future__ import annotations

import sys

import torch

from protos.videollm.v1 import tensor_pb2
from videollm import transport

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert set(DTYPES) == set(transport.ELEMENT_BYTES), "the wire's dtypes and torch's must be the same"
assert sys.byteorder == "little", "the wire format is little-endian and so must the host be"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)  # [num_bytes]
    return memoryview(flat.numpy())


def describe(tensor: torch.Tensor, payload: memoryview) -> tensor_pb2.TensorHeader:
    """The header of `tensor_bytes(tensor)`."""
    if tensor.dtype not in DTYPE_NAMES:
        raise transport.WireError(f"cannot send dtype {tensor.dtype}; use one of {sorted(DTYPES)}")
    return transport.describe(tensor.shape, DTYPE_NAMES[tensor.dtype], payload)


def as_tensor(header: tensor_pb2.TensorHeader, buffer) -> torch.Tensor:
    """A writable buffer of exactly the header's checked size -> the tensor, sharing its memory."""
    dtype = DTYPES[header.dtype]
    if not buffer:
        return torch.empty(tuple(header.shape), dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8)  # shares the buffer, no copy
    return flat.view(dtype).reshape(tuple(header.shape))


def received(assembler: transport.TensorAssembler) -> torch.Tensor:
    """The assembled, checked tensor."""
    return as_tensor(assembler.header, assembler.payload())
