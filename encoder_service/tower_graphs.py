"""Runs of consecutive SigLIP encoder layers replayed as CUDA graphs (CUDA only).

Between EarlyTom's prune layers the frame count is fixed, so each run of layers is one graph per
(first layer, end, frame bucket). Frames never interact inside a SigLIP layer (attention is within
a frame), so a run pads its frames up to a multiple of FRAME_BUCKET with whatever its input buffer
held before and drops them after: few graphs, each captured the first time its shape is needed.
A compiled layer call costs about 1.2 ms of host time, close to its GPU time once Stage I has
merged frames (about 1.1 ms at 22 frames of the 7B shape on an H200); a replay takes that host
work off each request (the tower alone measured the same with and without, 47 ms at 32 frames).

All graphs share one memory pool, one input and one output buffer per bucket; an output is valid
until the next replay of that bucket, which the encoder's layer loop respects (it fuses or copies
every run's output before the next run). Callers hold the encoder's device lock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

FRAME_BUCKET = 4


class TowerGraphs:
    def __init__(self, forward: Callable[[int, int, torch.Tensor], torch.Tensor]):
        self.forward = forward  # (first, end, hidden [T, S, D]) -> layers first..end-1 called one by one
        self.pool = None
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.inputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, S, D]
        self.outputs: dict[int, torch.Tensor] = {}

    def run(self, first: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layers first..end-1 on hidden [T, S, D] -> [T, S, D] (a view of a shared output buffer)."""
        frames = hidden.shape[0]
        bucket = math.ceil(frames / FRAME_BUCKET) * FRAME_BUCKET
        if bucket not in self.inputs:
            self.inputs[bucket] = torch.zeros((bucket, *hidden.shape[1:]), dtype=hidden.dtype, device=hidden.device)
            self.outputs[bucket] = torch.zeros_like(self.inputs[bucket])
        static_in, static_out = self.inputs[bucket], self.outputs[bucket]
        static_in[:frames].copy_(hidden)
        graph = self.graphs.get((first, end, bucket))
        if graph is None:
            graph = self.graphs[(first, end, bucket)] = self._capture(first, end, static_in, static_out)
        graph.replay()
        return static_out[:frames]

    def _capture(self, first: int, end: int, static_in: torch.Tensor, static_out: torch.Tensor):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and cuBLAS outside capture
            static_out.copy_(self.forward(first, end, static_in))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out.copy_(self.forward(first, end, static_in))
        self.pool = graph.pool()
        log.info("captured encoder layers %d-%d for %d frames", first, end - 1, static_in.shape[0])
        return graph
