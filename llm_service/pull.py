"""Taking visual tokens straight from the encoder that produced them (Encoder.Pull).

One hop instead of two: the gateway names the encoder replica and the ticket in the
GenerateSetup, and the LLM reads the same TensorChunk stream the gateway would have relayed,
checking length and CRC-32 against the header. Any failure (the encoder gone, the ticket used or
expired, a damaged stream) returns None, and the caller asks the gateway for the tokens instead.
Pulls use plaintext gRPC; a gateway that reaches its services over TLS does not offer them.
"""

from __future__ import annotations

import logging
import threading

import grpc
import torch

from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, tensor_pb2
from videollm import wire

log = logging.getLogger(__name__)


class EncoderPuller:
    def __init__(self, max_bytes: int, timeout_s: float):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._stubs: dict[str, encoder_pb2_grpc.EncoderStub] = {}
        self._lock = threading.Lock()
        self.pulled = 0
        self.failed = 0

    def _stub(self, address: str) -> encoder_pb2_grpc.EncoderStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=[
                    ("grpc.max_receive_message_length", 2 * wire.CHUNK_BYTES)])
                stub = self._stubs[address] = encoder_pb2_grpc.EncoderStub(channel)
            return stub

    def pull(self, header: tensor_pb2.TensorHeader, source: llm_pb2.VisualPull) -> torch.Tensor | None:
        """The tensor described by header, from the encoder at source.address, or None."""
        try:
            assembler = wire.TensorAssembler(header, self.max_bytes)
            for response in self._stub(source.address).Pull(encoder_pb2.PullRequest(ticket=source.ticket),
                                                            timeout=self.timeout_s):
                assembler.add(response.chunk.data)
            tensor = assembler.tensor()  # [N, D]
        except (grpc.RpcError, wire.WireError) as err:
            self.failed += 1
            detail = err.details() if isinstance(err, grpc.RpcError) else str(err)
            log.info("pull from %s failed (%s); the tokens come through the gateway", source.address, detail)
            return None
        self.pulled += 1
        return tensor
