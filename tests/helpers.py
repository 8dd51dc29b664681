"""Request builders and checks shared by the end-to-end tests."""

from __future__ import annotations

import base64

import httpx
import torch

from protos.videollm.v1 import tensor_pb2
from videollm import tensors, transport


def data_url(video: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(video).decode()}"


def video_chat(url: str, question: str = "What happens in this video?", **fields) -> dict:
    body = {
        "model": "videollm",
        "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}
        ],
        "max_tokens": 12,
    }
    body.update(fields)
    return body


def encoder_calls(encoder_service) -> int:
    return encoder_service.engine.encodes_completed


def assemble(header: tensor_pb2.TensorHeader, pieces, max_bytes: int) -> torch.Tensor:
    """The tensor a receiver gets from these chunks (transport.WireError when they do not match)."""
    assembler = transport.TensorAssembler(header, max_bytes)
    for piece in pieces:
        assembler.add(piece)
    return tensors.received(assembler)


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> dict:
    """An OpenAI-shaped error of this status and code whose message has every word; its body."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    return error
