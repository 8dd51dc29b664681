"""The vision half of LLaVA-OneVision: SigLIP tower, projector, 2x2 pooling and newline.

Loads only those weights from a local checkpoint. The encoder layers run in our own short loop
over transformers' own SigLIP layers (nothing copied, nothing patched), so that token compression
can act between layers and after the projector. With compression off, the output equals
`LlavaOnevisionModel.get_video_features(...).pooler_output` exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from encoder_service import earlytom
from encoder_service.tower_graphs import TowerGraphs, buckets_up_to
from videollm.checkpoint import (
    NEWLINE,
    PROJECTOR,
    VISION_TOWER,
    CheckpointError,
    load_config,
    load_into,
    read_tensors,
    resolve_dtype,
)
from videollm.settings import CompressionSettings


log = logging.getLogger(__name__)


@dataclass
class EncodeTimings:
    """One request's encoder timings in milliseconds: the fields of the proto's EncodeTimings, which the
    gateway reports as `encoder_timings_ms`. The tower fills its part (`encode_batch`: the batch's
    times, which every request of the batch reports), the engine the rest (decode, preprocess,
    queue, total)."""

    decode_ms: float = 0.0  # container demux + frame decode
    preprocess_ms: float = 0.0  # resize + normalise
    vision_ms: float = 0.0  # vision tower
    projector_ms: float = 0.0  # projector + pooling
    queue_ms: float = 0.0  # waiting for room among the frames in flight, then for the device
    total_ms: float = 0.0
    stage1_ms: float = 0.0  # frame similarity, segmentation and fusion (inside vision_ms)
    importance_ms: float = 0.0  # attention received at the last prune layer (inside vision_ms)
    stage2_ms: float = 0.0  # final segmentation and spatial selection


@dataclass
class CompressionTrace:
    """What compression did, in terms a client can check."""

    frames_after_merge: int
    segments: list[tuple[int, int]]  # final segments in original frame indices, inclusive
    merged_frames: list[tuple[int, int]]  # per output frame: the original frames Stage I fused into it, inclusive
    kept: list[list[int]]  # per output frame, kept positions on the pooled grid (raster order)
    tokens_per_frame: int
    layer_frames: list[int]  # frames each encoder layer processed
    prune_layers: list[int]  # after scaling to this encoder's depth


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # [N, D_llm] visual tokens in LLM order, newline last
    frames: int
    trace: CompressionTrace
    timings: EncodeTimings = field(default_factory=EncodeTimings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _importance(layer: nn.Module, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """hidden [T, S, D] entering a SigLIP layer -> [T, S] attention each token receives there."""
    frames, tokens, dim = hidden.shape
    head_dim = dim // heads
    x = layer.layer_norm1(hidden)
    queries = layer.self_attn.q_proj(x).view(frames, tokens, heads, head_dim).transpose(1, 2)  # [T, H, S, dh]
    keys = layer.self_attn.k_proj(x).view(frames, tokens, heads, head_dim).transpose(1, 2)  # [T, H, S, dh]
    return earlytom.attention_received(queries, keys, head_dim**-0.5)


def _layer_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One SigLIP encoder layer: hidden [T, S, D] -> [T, S, D]."""
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


class VisionEncoder:
    def __init__(self, model_dir: Path, device: str, dtype: str, chunk_frames: int = 64):
        """chunk_frames: the most frames any step of the tower takes at once (EncoderSettings.chunk_frames)."""
        from transformers import AutoModel
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            LlavaOnevisionMultiModalProjector,
        )

        self.config = load_config(model_dir)
        self.chunk_frames = chunk_frames
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise CheckpointError(f"vision_feature_layer {layer!r} is not supported; only a single layer is")
        depth = self.config.vision_config.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1.
        self.layers_to_run = layer if layer >= 0 else depth + 1 + layer
        self.drop_first_token = self.config.vision_feature_select_strategy == "default"

        tensors = read_tensors(model_dir, {"vision tower": VISION_TOWER, "projector": PROJECTOR, "newline": NEWLINE})
        with torch.device(self.device):
            self.tower = AutoModel.from_config(self.config.vision_config, dtype=self.dtype).eval()
            self.projector = LlavaOnevisionMultiModalProjector(self.config).to(self.dtype).eval()
        load_into(self.tower, tensors["vision tower"], "vision tower")
        load_into(self.projector, tensors["projector"], "projector")
        self.newline = nn.Parameter(tensors["newline"][""].to(self.device, self.dtype), requires_grad=False)  # [D_llm]

        grid = self.config.vision_config.image_size // self.config.vision_config.patch_size
        self.grid = grid  # 27 for 384 px / 14 px
        self.pooled_grid = math.ceil(grid / 2)  # 14
        self.tokens_per_frame = self.pooled_grid**2  # 196
        self.hidden_size = self.config.text_config.hidden_size
        # On CUDA the layers run compiled: torch.compile fuses the norms, GELU and residual adds that
        # eager mode runs as separate kernels (the tower's times both ways are in
        # docs/bench/7b-h200-encoder-steps.md). One compiled graph serves every layer and frame
        # count; it is compiled now, on 1 and 2 frames, so that no request waits for it. Runs of
        # layers between prune points then replay as CUDA graphs (tower_graphs.py).
        self.run_layer = _layer_forward
        self.run_importance = _importance
        self.graphs: TowerGraphs | None = None
        if self.device.type == "cuda":
            self.run_layer = torch.compile(_layer_forward, dynamic=True)
            # compiled too, so that the chunked float32 softmax of the importance scores runs as fused
            # kernels instead of one kernel per elementwise step
            self.run_importance = torch.compile(_importance, dynamic=True)
            for frames in (1, 2):
                self._warm_up(frames)
            self.graphs = TowerGraphs(self.call_layers)

    @torch.inference_mode()
    def _warm_up(self, frames: int) -> None:
        size = self.config.vision_config.image_size
        hidden = self.tower.embeddings(torch.zeros(frames, 3, size, size, device=self.device, dtype=self.dtype))
        self.run_layer(self.tower.encoder.layers[0], hidden)
        self.importance(self.tower.encoder.layers[0], hidden)

    @property
    def depth(self) -> int:
        return self.config.vision_config.num_hidden_layers

    def parameter_count(self) -> int:
        return (
            sum(p.numel() for p in self.tower.parameters())
            + sum(p.numel() for p in self.projector.parameters())
            + self.newline.numel()
        )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """2x2 bilinear pooling of the patch grid, as LLaVA-OneVision does for video frames."""
        frames, _, dim = features.shape  # [T, S, D]
        # [T, D, 27, 27] in channels-last memory: the same values as a contiguous grid (the kernels
        # compute each output alike) without the copy, and on CUDA the channels-last kernel is far
        # faster than the contiguous one for this shape (docs/bench/7b-h200-encoder-steps.md)
        grid = features.view(frames, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        pooled = nn.functional.interpolate(grid, size=[self.pooled_grid, self.pooled_grid], mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, dim)  # [T, 196, D]

    @property
    def attention_implementation(self) -> str:
        """The attention kernel family the tower's layers use (transformers' choice: sdpa, eager, ...)."""
        return self.tower.config._attn_implementation

    def importance(self, layer, hidden: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """hidden [T, S, D] entering `layer` -> [T, S] attention received per token (Stage II scores).

        Recomputes only this layer's queries and keys; the layer itself still runs through SDPA.
        Compiled on CUDA; `eager` runs it uncompiled (the benchmark compares the two).
        """
        run = _importance if eager else self.run_importance
        return run(layer, hidden, self.config.vision_config.num_attention_heads)

    def run_layers(self, first: int, end: int, parts: list[torch.Tensor]) -> torch.Tensor:
        """Encoder layers first..end-1 on the frames of every part [T_i, S, D] -> [sum T_i, S, D], as
        a request runs them.

        On CUDA a graph replay, whose output stays valid until the next replay.
        """
        if self.graphs is not None:
            try:
                return self.graphs.run(first, end, parts)
            except RuntimeError as err:  # a capture this build of torch cannot do: run the layers as they are
                log.warning("CUDA graphs of the vision tower are off: %s", err)
                self.graphs = None
        return self.call_layers(first, end, _joined(parts))

    def call_layers(self, first: int, end: int, hidden: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """Encoder layers first..end-1 called one by one, no graphs: hidden [T, S, D] -> [T, S, D].

        Compiled on CUDA; `eager` calls transformers' layers as they are (the benchmark compares them).
        """
        run = _layer_forward if eager else self.run_layer
        for layer in self.tower.encoder.layers[first:end]:
            hidden = run(layer, hidden)
        return hidden

    def schedule(self, settings: CompressionSettings) -> LayerSchedule:
        """Where a request's frames stop between layers; requests with equal schedules can share
        the tower's passes (`encode_batch`)."""
        if settings.method != "earlytom":
            return LayerSchedule((), None, self.layers_to_run)
        prune = tuple(p for p in settings.scaled_prune_layers(self.depth) if p < self.layers_to_run)
        return LayerSchedule(prune, prune[-1] if prune else self.layers_to_run - 1, self.layers_to_run)

    def capture_graphs(self, max_frames: int, schedules: list[LayerSchedule]) -> int:
        """Capture the CUDA graphs of every frame bucket up to max_frames for these schedules now,
        so that no request waits for a capture. Returns how many graphs exist."""
        if self.graphs is None:
            return 0
        started = time.perf_counter()
        size = self.config.vision_config.image_size
        with torch.inference_mode():
            # the largest first: the buffers are allocated once
            hidden = self.tower.embeddings(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype))
            for frames in buckets_up_to(max_frames):
                part = hidden.expand(frames, -1, -1)
                for schedule in schedules:
                    for first, end in schedule.runs():
                        self.run_layers(first, end, [part])
        count = len(self.graphs.graphs) if self.graphs is not None else 0
        log.info("captured %d graphs of the tower's layers in %.1f s", count, time.perf_counter() - started)
        return count

    def encode(self, pixel_values: torch.Tensor, settings: CompressionSettings) -> VisionOutput:
        """pixel_values [T, 3, H, W] -> visual tokens [N, D_llm] (N = T*196 + 1 without compression)."""
        return self.encode_batch([(pixel_values, settings)])[0]

    def encode_batch(self, requests: list[tuple[torch.Tensor, CompressionSettings]]) -> list[VisionOutput]:
        """Several requests' frames through the tower together: [(pixels [T_i, 3, H, W], settings)] ->
        one VisionOutput each, the same as `encode` of each alone (`encode_steps` run to its end)."""
        steps = self.encode_steps(requests)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def encode_steps(self, requests: list[tuple[torch.Tensor, CompressionSettings]]
                     ) -> Generator[None, None, list[VisionOutput]]:
        """`encode_batch` a chunk at a time: yields after each chunk of at most `chunk_frames` frames
        has gone through a run of layers or the projector, so that the caller may run another
        request's chunks in between (tower_batcher.py); returns the outputs.

        Every request must have the same `schedule`. Frames never interact inside a layer, so the
        embeddings, the layers, the importance scores and the projector run on all frames at once,
        or in chunks of frames with the same result (a long video's activations then never exceed a
        chunk's); EarlyTom's frame merging and token selection run per request between them, on
        all of a request's frames. The timings are wall time, which includes the chunks of other
        requests run in between.
        """
        schedule = self.schedule(requests[0][1])
        if any(self.schedule(settings) != schedule for _, settings in requests[1:]):
            raise ValueError("encode_batch: the requests' layer schedules differ; batch only equal schedules")
        flows = [_Flow(settings, pixels.shape[0]) for pixels, settings in requests]
        timings = EncodeTimings()  # the batch's; every request reports them

        start = time.perf_counter()
        pixels = _joined([p.to(self.device, self.dtype) for p, _ in requests])  # [sum T, 3, H, W]
        parts = list(self._in_chunks(self.tower.embeddings, pixels).split([f.frames for f in flows]))  # [T_i, S, D]
        layers = self.tower.encoder.layers
        for first, end in schedule.runs():
            live = [part.shape[0] for part in parts]
            hidden = _joined(parts)  # [sum T'_i, S, D]
            if first == schedule.score_layer:
                mark = time.perf_counter()
                scores = self._in_chunks(lambda chunk: self.importance(layers[first], chunk), hidden)  # [sum T'_i, S]
                for flow, score in zip(flows, scores.split(live)):
                    flow.scores = score
                timings.importance_ms += (time.perf_counter() - mark) * 1e3
            for flow, count in zip(flows, live):
                flow.layer_frames += [count] * (end - first)
            # contiguous, however `hidden` is laid out: Stage I's reductions then run alike chunked or not
            out = hidden.new_empty(hidden.shape)
            for chunk in range(0, hidden.shape[0], self.chunk_frames):
                rows = slice(chunk, chunk + self.chunk_frames)
                # copied out at once: a graph's output is overwritten by the next replay, maybe another request's
                out[rows] = self.run_layers(first, end, [hidden[rows]])
                yield
            parts = list(out.split(live))  # [T'_i, S, D]
            index = end - 1
            if index in schedule.prune:
                mark = time.perf_counter()
                parts = [flow.merge_frames(hidden, index == schedule.score_layer) for flow, hidden in zip(flows, parts)]
                timings.stage1_ms += (time.perf_counter() - mark) * 1e3
        if schedule.compresses:
            for flow, hidden in zip(flows, parts):
                if flow.segments is None:
                    flow.segments = _segments(hidden, flow.settings)
        if self.drop_first_token:
            parts = [hidden[:, 1:] for hidden in parts]
            for flow in flows:
                flow.scores = flow.scores[:, 1:] if flow.scores is not None else None
        _synchronize(self.device)
        timings.vision_ms = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        merged = [hidden.shape[0] for hidden in parts]
        hidden = _joined(parts)
        chunks = []
        for chunk in range(0, hidden.shape[0], self.chunk_frames):
            chunks.append(self.pool(self.projector(hidden[chunk : chunk + self.chunk_frames])))  # [<=c, 196, D_llm]
            yield
        features = _joined(chunks).split(merged)  # [T'_i, 196, D_llm]
        _synchronize(self.device)
        timings.projector_ms = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        outputs = [self._select(flow, feature) for flow, feature in zip(flows, features)]
        _synchronize(self.device)
        if schedule.compresses:
            timings.stage2_ms = (time.perf_counter() - start) * 1e3
        for output in outputs:
            output.timings = replace(timings)
        return outputs

    def _in_chunks(self, run: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
        return in_chunks(run, frames, self.chunk_frames)

    def _select(self, flow: _Flow, features: torch.Tensor) -> VisionOutput:
        """Stage II for one request: features [T', 196, D_llm] -> its VisionOutput (tokens, trace)."""
        merged, settings = features.shape[0], flow.settings
        if settings.method == "earlytom":
            n = earlytom.tokens_per_frame(settings.retain_ratio, flow.frames, merged, self.tokens_per_frame)
            pooled_scores = earlytom.pool_scores(flow.scores.float(), self.grid, self.pooled_grid)  # [T', 196]
            selection = earlytom.select_tokens(
                features, pooled_scores, flow.segments, n, settings.d, settings.k, settings.beta
            )
            kept_tokens, kept, segments = selection.tokens, selection.positions.tolist(), flow.segments  # [T', n, D]
        else:
            n, kept_tokens, segments = self.tokens_per_frame, features, [(i, i) for i in range(merged)]
            kept = [list(range(self.tokens_per_frame))] * merged
        tokens = torch.cat([kept_tokens.reshape(-1, kept_tokens.shape[-1]), self.newline[None]], dim=0)  # [T'*n + 1, D]
        trace = CompressionTrace(
            frames_after_merge=merged,
            segments=[(flow.spans[first][0], flow.spans[last][1]) for first, last in segments],
            merged_frames=list(flow.spans),
            kept=kept,
            tokens_per_frame=n,
            layer_frames=flow.layer_frames,
            prune_layers=list(self.schedule(settings).prune),
        )
        return VisionOutput(tokens=tokens, frames=flow.frames, trace=trace)


def in_chunks(run: Callable, frames, chunk_frames: int) -> torch.Tensor:
    """run over frames [T, ...] (a tensor or an array) in chunks of chunk_frames, joined along the
    first dimension: run(frames) for any per-frame step, without the activations of more than a
    chunk at once."""
    if frames.shape[0] <= chunk_frames:
        return run(frames)
    return torch.cat([run(frames[i : i + chunk_frames]) for i in range(0, frames.shape[0], chunk_frames)])


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Parts [T_i, ...] -> [sum T_i, ...]; a lone part as it is (no copy: one request per pass is the default)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _segments(hidden: torch.Tensor, settings: CompressionSettings) -> list[tuple[int, int]]:
    normed = earlytom.normalize_frames(hidden)
    return earlytom.segment_frames(normed, settings.tau, settings.ema, settings.max_window)


@dataclass(frozen=True)
class LayerSchedule:
    """Where EarlyTom acts between the encoder's layers, for one request's settings."""

    prune: tuple[int, ...]  # Stage I merges frames after these layers
    score_layer: int | None  # Stage II's importance comes from this layer's attention (None: no compression)
    depth: int  # layers run

    @property
    def compresses(self) -> bool:
        return self.score_layer is not None

    def runs(self) -> list[tuple[int, int]]:
        """(first, end) of each run of layers with nothing between them: a run ends at a prune layer
        or before the score layer."""
        starts = {0} | {p + 1 for p in self.prune if p + 1 < self.depth}
        if self.score_layer is not None:
            starts.add(self.score_layer)
        starts = sorted(starts)
        return list(zip(starts, [*starts[1:], self.depth]))


class _Flow:
    """One request's EarlyTom state while its frames go through the tower in a batch."""

    def __init__(self, settings: CompressionSettings, frames: int):
        self.settings = settings
        self.frames = frames
        self.spans = [(i, i) for i in range(frames)]  # original frames behind each live frame
        self.scores: torch.Tensor | None = None  # [T', S] attention received at the score layer
        self.segments: list[tuple[int, int]] | None = None  # the final segments, which drive Stage II
        self.layer_frames: list[int] = []  # frames each encoder layer processed

    def merge_frames(self, hidden: torch.Tensor, final: bool) -> torch.Tensor:
        """Stage I after a prune layer: hidden [T', S, D] -> [T'', S, D] (a new tensor)."""
        settings = self.settings
        normed = earlytom.normalize_frames(hidden)  # [T', S, D] float32
        similar = earlytom.FrameSimilarity(normed, earlytom.similarity_width(settings.max_window))  # one round trip
        segments = earlytom.segment_frames(normed, settings.tau, settings.ema, settings.max_window, similar)
        plan = earlytom.plan_fusion(normed, segments, similar)
        hidden = earlytom.fuse(hidden, plan)  # [T'', S, D]
        self.spans = earlytom.merge_spans(self.spans, plan)
        if self.scores is not None:
            self.scores = earlytom.fuse(self.scores, plan)
        if final:  # the final segments drive Stage II
            self.segments = _segments(hidden, settings)
        return hidden
