"""Runs of consecutive SigLIP encoder layers replayed as CUDA graphs (CUDA only).

Between EarlyTom's prune layers the frame count is fixed, so each run of layers is one graph per
(first layer, end, frame bucket). Frames never interact inside a SigLIP layer (attention is within
a frame), so a run pads its frames up to its bucket (`bucket_of`) with whatever its input buffer
held before and drops them after: few graphs, each captured the first time its shape is needed.
Once Stage I has merged frames, launching a compiled layer takes the host about as long as the
GPU takes to run it, so the host would set the pace; a replay launches a whole run of layers at
once and takes that host work off each request. The tower is not faster with graphs when the GPU
is the bottleneck; what a replay saves is host time, which the other requests' decoding and
preprocessing need (docs/bench/7b-h200-encoder-steps.md).

The frames of a batch of requests (`VisionEncoder.encode_batch`) go through as one input: each
request's part is copied into its rows. All graphs share one memory pool and one input and one
output buffer (a bucket's graph uses its first rows; a larger pass than ever before reallocates
them and captures anew, which `VisionEncoder.capture_graphs` does up front); an output is valid
until the next replay, which the encoder's layer loop respects (it fuses or copies every run's
output before the next run). One thread at a time runs the tower (the encoder's batch worker).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

FRAME_BUCKET = 4  # frame counts are padded to a multiple of this up to SMALL_PASS frames,
SMALL_PASS = 64  # and above it (batches of several requests) to a multiple of
LARGE_FRAME_BUCKET = 16  # this, so that there are fewer graphs to capture


def bucket_of(frames: int) -> int:
    """The frame count a pass of `frames` frames is padded to."""
    step = FRAME_BUCKET if frames <= SMALL_PASS else LARGE_FRAME_BUCKET
    return math.ceil(frames / step) * step


def buckets_up_to(frames: int) -> list[int]:
    """Every bucket a pass of at most `frames` frames can use, largest first."""
    return sorted({bucket_of(n) for n in range(1, frames + 1)}, reverse=True)


class TowerGraphs:
    def __init__(self, forward: Callable[[int, int, torch.Tensor], torch.Tensor]):
        self.forward = forward  # (first, end, hidden [T, S, D]) -> layers first..end-1 called one by one
        self.pool = None
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.inputs: torch.Tensor | None = None  # [largest bucket so far, S, D]
        self.outputs: torch.Tensor | None = None

    def run(self, first: int, end: int, parts: list[torch.Tensor]) -> torch.Tensor:
        """Layers first..end-1 on the frames of all parts [T_i, S, D] -> [sum T_i, S, D], a view of the
        shared output buffer."""
        frames = sum(part.shape[0] for part in parts)
        bucket = bucket_of(frames)
        if self.inputs is None or bucket > self.inputs.shape[0]:
            if self.graphs:
                log.warning("%d frames in one pass, more than captured so far: capturing the tower's graphs again",
                            frames)
            self.graphs.clear()  # they read and write the old buffers
            self.inputs = parts[0].new_zeros((bucket, *parts[0].shape[1:]))
            self.outputs = torch.zeros_like(self.inputs)
        static_in, static_out = self.inputs[:bucket], self.outputs[:bucket]
        row = 0
        for part in parts:
            static_in[row : row + part.shape[0]].copy_(part)
            row += part.shape[0]
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
