"""Taking visual tokens straight from the encoder that produced them.

One hop instead of two: the gateway names the encoder replica and the ticket in the
GenerateSetup. On the same host (a shared memory directory both services name, see
videollm.pull_files) the LLM maps the ticket's file without any gRPC and checks its size;
otherwise it reads the same TensorChunk stream the gateway would have relayed (Encoder.Pull) and
checks length and CRC-32 against the header. Any failure (the encoder gone, the ticket used or
expired, a damaged stream) returns None, and the caller asks the gateway for the tokens instead.
Pulls use plaintext gRPC; a gateway that reaches its services over TLS does not offer them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import torch

from protos.videollm.v1 import encoder_pb2, llm_pb2, tensor_pb2
from videollm import pull_files, tensors, transport

log = logging.getLogger(__name__)


class EncoderPuller:
    def __init__(self, max_bytes: int, timeout_s: float, shm_dir: Path | None = None):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.shm_dir = shm_dir if shm_dir is not None and shm_dir.is_dir() else None
        self._pulls: dict[str, grpc.UnaryStreamMultiCallable] = {}
        self._lock = threading.Lock()
        self.pulled = 0
        self.from_shared_memory = 0
        self.failed = 0

    def _pull_call(self, address: str) -> grpc.UnaryStreamMultiCallable:
        """Encoder.Pull on `address`, reading each chunk as a view into the received message."""
        with self._lock:
            call = self._pulls.get(address)
            if call is None:
                channel = grpc.insecure_channel(address, options=[
                    ("grpc.max_receive_message_length", 2 * transport.CHUNK_BYTES)])
                call = self._pulls[address] = transport.pull_call(channel)
            return call

    def pull(self, header: tensor_pb2.TensorHeader, source: llm_pb2.VisualPull) -> torch.Tensor | None:
        """The tensor described by header, from the encoder at source.address, or None."""
        try:
            if self.shm_dir is not None:
                # the file's size is checked; nothing travelled, so there is no CRC to check
                payload = pull_files.take(self.shm_dir, source.ticket, transport.checked_size(header, self.max_bytes))
                if payload is not None:
                    tensor = tensors.as_tensor(header, payload)  # [N, D]
                    with self._lock:
                        self.pulled += 1
                        self.from_shared_memory += 1
                    return tensor
            assembler = transport.TensorAssembler(header, self.max_bytes)
            for data in self._pull_call(source.address)(encoder_pb2.PullRequest(ticket=source.ticket),
                                                        timeout=self.timeout_s):
                assembler.add(data)
            tensor = tensors.received(assembler)  # [N, D]
        except (grpc.RpcError, transport.WireError, pull_files.PullFileError, OSError) as err:
            with self._lock:
                self.failed += 1
            detail = err.details() if isinstance(err, grpc.RpcError) else str(err)
            log.info("pull from %s failed (%s); the tokens come through the gateway", source.address, detail)
            return None
        with self._lock:
            self.pulled += 1
        return tensor
