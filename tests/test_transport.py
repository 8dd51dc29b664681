"""Unit tests of the tensor framing (videollm/transport.py and videollm/tensors.py): header, chunks,
reassembly and its checks."""

from __future__ import annotations

import zlib

import pytest
import torch

from protos.videollm.v1 import tensor_pb2
from helpers import assemble
from videollm import tensors, transport

UNLIMITED = 1 << 40
INT_VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """A [4, 8] tensor with random values plus the ones a lossy path would mangle (NaN, inf, -0, tiny)."""
    generator = torch.Generator().manual_seed(7)
    tensor = torch.randn(4, 8, generator=generator).to(dtype)
    tensor[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40]).to(dtype)
    return tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEWS[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def send(tensor: torch.Tensor, chunk_bytes: int = transport.CHUNK_BYTES):
    payload = tensors.tensor_bytes(tensor)
    return tensors.describe(tensor, payload), list(map(bytes, transport.pieces(payload, chunk_bytes)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_tensor_round_trips_bit_exactly_in_each_wire_dtype(dtype):
    original = special_values(dtype)
    header, pieces = send(original)

    assert header.dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert list(header.shape) == [4, 8]
    assert header.num_bytes == original.numel() * original.element_size()
    received = assemble(header, pieces, max_bytes=UNLIMITED)
    assert same_bits(received, original)


def test_the_header_describes_the_payload_with_its_length_and_crc32():
    original = special_values(torch.float32)
    payload = tensors.tensor_bytes(original)
    header = tensors.describe(original, payload)
    assert header.num_bytes == 4 * 8 * 4
    assert header.crc32 == zlib.crc32(original.numpy().tobytes())
    assert bytes(payload) == original.numpy().astype("<f4").tobytes()  # little-endian, row-major


def test_a_non_contiguous_tensor_is_sent_in_row_major_order():
    original = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    header, pieces = send(original)
    received = assemble(header, pieces, max_bytes=UNLIMITED)
    assert torch.equal(received, original)


def test_a_tensor_over_4_mib_is_split_into_several_chunks_and_reassembles_exactly():
    generator = torch.Generator().manual_seed(3)
    original = torch.randn(1200, 1024, generator=generator)  # 4.9 MB, over gRPC's 4 MiB default message
    assert original.numel() * 4 > 4 << 20
    header, pieces = send(original)

    assert len(pieces) == 5
    assert all(len(piece) == transport.CHUNK_BYTES for piece in pieces[:-1])
    assert all(len(piece) <= transport.CHUNK_BYTES < 4 << 20 for piece in pieces)
    assert sum(len(piece) for piece in pieces) == header.num_bytes
    received = assemble(header, pieces, max_bytes=UNLIMITED)
    assert same_bits(received, original)


def test_chunks_of_any_size_reassemble_to_the_same_tensor():
    original = special_values(torch.bfloat16)
    header, pieces = send(original, chunk_bytes=7)  # boundaries fall inside elements
    assert len(pieces) == -(-header.num_bytes // 7)
    assert same_bits(assemble(header, pieces, max_bytes=UNLIMITED), original)


def test_an_empty_tensor_round_trips():
    original = torch.empty(0, 64)
    header, pieces = send(original)
    assert pieces == []
    received = assemble(header, pieces, max_bytes=UNLIMITED)
    assert received.shape == (0, 64) and received.dtype == torch.float32


def test_a_flipped_byte_gives_a_checksum_error():
    header, pieces = send(special_values(torch.float32))
    corrupted = bytearray(pieces[0])
    corrupted[5] ^= 0x01
    with pytest.raises(transport.WireError, match="checksum"):
        assemble(header, [bytes(corrupted)], max_bytes=UNLIMITED)


def test_missing_bytes_give_an_incomplete_error():
    header, pieces = send(special_values(torch.float32), chunk_bytes=16)
    with pytest.raises(transport.WireError, match="incomplete"):
        assemble(header, pieces[:-1], max_bytes=UNLIMITED)
    with pytest.raises(transport.WireError, match="incomplete"):
        assemble(header, [], max_bytes=UNLIMITED)


def test_more_bytes_than_announced_are_refused():
    header, pieces = send(special_values(torch.float32))
    with pytest.raises(transport.WireError, match="more than"):
        assemble(header, [*pieces, b"\x00"], max_bytes=UNLIMITED)


def test_a_header_whose_byte_count_disagrees_with_its_shape_and_dtype_is_refused():
    header, pieces = send(special_values(torch.float32))
    for wrong in (header.num_bytes - 4, header.num_bytes + 4, header.num_bytes // 2):
        lying = tensor_pb2.TensorHeader(shape=header.shape, dtype=header.dtype, num_bytes=wrong, crc32=header.crc32)
        with pytest.raises(transport.WireError, match="bytes"):
            transport.TensorAssembler(lying, max_bytes=UNLIMITED)
    # the same bytes described as another dtype of a different width
    as_half = tensor_pb2.TensorHeader(shape=header.shape, dtype="float16", num_bytes=header.num_bytes,
                                      crc32=header.crc32)
    with pytest.raises(transport.WireError, match="needs"):
        assemble(as_half, pieces, max_bytes=UNLIMITED)


@pytest.mark.parametrize("dtype", ["float64", "int8", "", "FLOAT32"])
def test_an_unknown_dtype_in_a_header_is_refused(dtype):
    header = tensor_pb2.TensorHeader(shape=[2, 2], dtype=dtype, num_bytes=16, crc32=0)
    with pytest.raises(transport.WireError, match="dtype"):
        transport.TensorAssembler(header, max_bytes=UNLIMITED)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_a_tensor_of_a_dtype_the_wire_does_not_carry_cannot_be_described(dtype):
    tensor = torch.zeros(2, 2, dtype=dtype)
    with pytest.raises(transport.WireError, match="dtype"):
        tensors.describe(tensor, tensors.tensor_bytes(tensor))


def test_a_negative_dimension_is_refused():
    header = tensor_pb2.TensorHeader(shape=[-2, -2], dtype="float32", num_bytes=16, crc32=0)
    with pytest.raises(transport.WireError, match="negative"):
        transport.TensorAssembler(header, max_bytes=UNLIMITED)


def test_max_bytes_is_enforced_before_any_chunk_is_read():
    original = special_values(torch.float32)
    header, pieces = send(original)
    size = header.num_bytes

    def never_read():
        raise AssertionError("the chunks of a too-large tensor must not be read")
        yield b""  # pragma: no cover

    with pytest.raises(transport.WireError, match="exceeds the limit"):
        assemble(header, never_read(), max_bytes=size - 1)
    assert same_bits(assemble(header, pieces, max_bytes=size), original)  # exactly at the limit is fine


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, (1 << 20) + 5, 3 * (1 << 20)])
def test_hand_written_chunk_messages_are_what_protobuf_writes_and_reads(size):
    from protos.videollm.v1 import encoder_pb2, llm_pb2

    payload = memoryview(bytes(i % 251 for i in range(size)))
    for message_cls, field in ((encoder_pb2.EncodeResponse, "chunk"), (llm_pb2.GenerateRequest, "visual_chunk")):
        number = message_cls.DESCRIPTOR.fields_by_name[field].number
        written = list(transport.chunk_messages(payload, number))
        expected = [message_cls(**{field: tensor_pb2.TensorChunk(data=piece)}).SerializeToString()
                    for piece in map(bytes, transport.pieces(payload))]
        assert written == expected
        assert b"".join(bytes(transport.chunk_data(message, number)) for message in written) == bytes(payload)
    empty = encoder_pb2.EncodeResponse(chunk=tensor_pb2.TensorChunk()).SerializeToString()
    assert bytes(transport.chunk_data(empty, 2)) == b""


def test_chunk_data_refuses_other_messages():
    from protos.videollm.v1 import encoder_pb2

    header = encoder_pb2.EncodeResponse(header=encoder_pb2.EncodeHeader(model_id="m")).SerializeToString()
    good = next(transport.chunk_messages(memoryview(b"abc"), 2))
    for bad in (header, good[:-1], good + b"x", b"", b"\x12"):
        with pytest.raises(transport.WireError):
            transport.chunk_data(bad, 2)


def test_the_gateway_frames_bytes_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, gateway.app, videollm.transport; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
