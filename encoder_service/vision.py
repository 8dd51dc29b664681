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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from encoder_service import earlytom
from encoder_service.tower_graphs import TowerGraphs
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
class VisionTimings:
    vision_ms: float = 0.0
    projector_ms: float = 0.0
    stage1_ms: float = 0.0
    importance_ms: float = 0.0
    stage2_ms: float = 0.0


@dataclass
class CompressionTrace:
    """What compression did, in terms a client can check."""

    frames_after_merge: int
    segments: list[tuple[int, int]]  # final segments in original frame indices, inclusive
    kept: list[list[int]]  # per output frame, kept positions on the pooled grid (raster order)
    tokens_per_frame: int
    layer_frames: list[int]  # frames each encoder layer processed
    prune_layers: list[int]  # after scaling to this encoder's depth


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # [N, D_llm] visual tokens in LLM order, newline last
    frames: int
    trace: CompressionTrace
    timings: VisionTimings = field(default_factory=VisionTimings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One SigLIP encoder layer: hidden [T, S, D] -> [T, S, D]."""
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


class VisionEncoder:
    def __init__(self, model_dir: Path, device: str, dtype: str):
        from transformers import AutoModel
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            LlavaOnevisionMultiModalProjector,
        )

        self.config = load_config(model_dir)
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
        # On CUDA the layers run compiled (fused norms, GELU and residual adds: the tower alone
        # 62.5 -> 47 ms for 32 frames of the 7B shape on an H200), one compiled graph for every
        # layer and frame count, compiled now on 1 and 2 frames so that no request waits for it;
        # runs of layers between prune points then replay as CUDA graphs (tower_graphs.py).
        self.run_layer = _layer_forward
        self.graphs: TowerGraphs | None = None
        if self.device.type == "cuda":
            self.run_layer = torch.compile(_layer_forward, dynamic=True)
            for frames in (1, 2):
                self._warm_up(frames)
            self.graphs = TowerGraphs(self._call_layers)

    @torch.inference_mode()
    def _warm_up(self, frames: int) -> None:
        size = self.config.vision_config.image_size
        hidden = self.tower.embeddings(torch.zeros(frames, 3, size, size, device=self.device, dtype=self.dtype))
        self.run_layer(self.tower.encoder.layers[0], hidden)

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
        # compute each output alike) without the copy, and on CUDA ~15x faster for this shape
        grid = features.view(frames, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        pooled = nn.functional.interpolate(grid, size=[self.pooled_grid, self.pooled_grid], mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, dim)  # [T, 196, D]

    def importance(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, S, D] entering `layer` -> [T, S] attention received per token (Stage II scores).

        Recomputes only this layer's queries and keys; the layer itself still runs through SDPA.
        """
        frames, tokens, _ = hidden.shape
        heads = self.config.vision_config.num_attention_heads
        head_dim = self.config.vision_config.hidden_size // heads
        x = layer.layer_norm1(hidden)
        queries = layer.self_attn.q_proj(x).view(frames, tokens, heads, head_dim).transpose(1, 2)  # [T, H, S, dh]
        keys = layer.self_attn.k_proj(x).view(frames, tokens, heads, head_dim).transpose(1, 2)  # [T, H, S, dh]
        return earlytom.attention_received(queries, keys, head_dim**-0.5)

    def _run_layers(self, first: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder layers first..end-1 on hidden [T, S, D] -> [T, S, D], replayed as a graph on CUDA."""
        if self.graphs is not None:
            try:
                return self.graphs.run(first, end, hidden)
            except RuntimeError as err:  # a capture this build of torch cannot do: run the layers as they are
                log.warning("CUDA graphs of the vision tower are off: %s", err)
                self.graphs = None
        return self._call_layers(first, end, hidden)

    def _call_layers(self, first: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder layers first..end-1 called one by one: hidden [T, S, D] -> [T, S, D]."""
        for layer in self.tower.encoder.layers[first:end]:
            hidden = self.run_layer(layer, hidden)
        return hidden

    def _segments(self, hidden: torch.Tensor, settings: CompressionSettings) -> list[tuple[int, int]]:
        normed = earlytom.normalize_frames(hidden)
        return earlytom.segment_frames(normed, settings.tau, settings.ema, settings.max_window)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, settings: CompressionSettings) -> VisionOutput:
        """pixel_values [T, 3, H, W] -> visual tokens [N, D_llm] (N = T*196 + 1 without compression)."""
        timings = VisionTimings()
        compress = settings.method == "earlytom"
        prune = [p for p in settings.scaled_prune_layers(self.depth) if p < self.layers_to_run] if compress else []
        score_layer = prune[-1] if prune else self.layers_to_run - 1

        start = time.perf_counter()
        pixels = pixel_values.to(self.device, self.dtype)
        frames = pixels.shape[0]
        hidden = self.tower.embeddings(pixels)  # [T, S, D_vision]
        spans = [(i, i) for i in range(frames)]  # original frames behind each live frame
        scores = segments = None
        layer_frames = []
        layers = self.tower.encoder.layers
        # runs of layers with nothing between them: a run ends at a prune layer or before the score layer
        starts = {0} | {p + 1 for p in prune if p + 1 < self.layers_to_run} | ({score_layer} if compress else set())
        starts = sorted(starts)
        for first, end in zip(starts, [*starts[1:], self.layers_to_run]):
            if compress and first == score_layer:
                mark = time.perf_counter()
                scores = self.importance(layers[first], hidden)  # [T', S]
                timings.importance_ms += (time.perf_counter() - mark) * 1e3
            layer_frames += [hidden.shape[0]] * (end - first)
            hidden = self._run_layers(first, end, hidden)  # [T', S, D]
            index = end - 1
            if index in prune:
                mark = time.perf_counter()
                normed = earlytom.normalize_frames(hidden)  # [T', S, D] float32
                plan = earlytom.plan_fusion(
                    normed, earlytom.segment_frames(normed, settings.tau, settings.ema, settings.max_window)
                )
                hidden = earlytom.fuse(hidden, plan)  # [T'', S, D]
                spans = earlytom.merge_spans(spans, plan)
                if scores is not None:
                    scores = earlytom.fuse(scores, plan)
                if index == score_layer:  # the final segments drive Stage II
                    segments = self._segments(hidden, settings)
                timings.stage1_ms += (time.perf_counter() - mark) * 1e3
        if compress and segments is None:
            segments = self._segments(hidden, settings)
        if self.drop_first_token:
            hidden = hidden[:, 1:]
            scores = scores[:, 1:] if scores is not None else None
        _synchronize(self.device)
        timings.vision_ms = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        features = self.pool(self.projector(hidden))  # [T', 196, D_llm]
        _synchronize(self.device)
        timings.projector_ms = (time.perf_counter() - start) * 1e3

        merged = features.shape[0]
        grid = list(range(self.tokens_per_frame))
        if compress:
            start = time.perf_counter()
            n = earlytom.tokens_per_frame(settings.retain_ratio, frames, merged, self.tokens_per_frame)
            pooled_scores = earlytom.pool_scores(scores.float(), self.grid, self.pooled_grid)  # [T', 196]
            selection = earlytom.select_tokens(
                features, pooled_scores, segments, n, settings.d, settings.k, settings.beta
            )
            kept_tokens, kept = selection.tokens, selection.positions.tolist()  # [T', n, D]
            _synchronize(self.device)
            timings.stage2_ms = (time.perf_counter() - start) * 1e3
        else:
            n, kept_tokens, kept, segments = self.tokens_per_frame, features, [grid] * merged, [(i, i) for i in range(merged)]
        tokens = torch.cat([kept_tokens.reshape(-1, kept_tokens.shape[-1]), self.newline[None]], dim=0)  # [T'*n + 1, D]
        trace = CompressionTrace(
            frames_after_merge=merged,
            segments=[(spans[first][0], spans[last][1]) for first, last in segments],
            kept=kept,
            tokens_per_frame=n,
            layer_frames=layer_frames,
            prune_layers=prune,
        )
        return VisionOutput(tokens=tokens, frames=frames, trace=trace, timings=timings)
