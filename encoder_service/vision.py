"""The vision half of LLaVA-OneVision: SigLIP tower, projector, 2x2 pooling and newline.

Loads only those weights from a local checkpoint. The encoder layers run in our own short loop
over transformers' own SigLIP layers (nothing copied, nothing patched), so that token compression
can act between layers and after the projector. With compression off, the output equals
`LlavaOnevisionModel.get_video_features(...).pooler_output` exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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


@dataclass
class VisionTimings:
    vision_ms: float = 0.0
    projector_ms: float = 0.0


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # [N, D_llm] visual tokens in LLM order, newline last
    frames: int
    timings: VisionTimings = field(default_factory=VisionTimings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        grid = features.view(frames, self.grid, self.grid, dim).permute(0, 3, 1, 2).contiguous()  # [T, D, 27, 27]
        pooled = nn.functional.interpolate(grid, size=[self.pooled_grid, self.pooled_grid], mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, dim)  # [T, 196, D]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> VisionOutput:
        """pixel_values [T, 3, H, W] -> visual tokens [T*196 + 1, D_llm]."""
        timings = VisionTimings()
        start = time.perf_counter()
        pixels = pixel_values.to(self.device, self.dtype)
        hidden = self.tower.embeddings(pixels)  # [T, S, D_vision]
        for layer in self.tower.encoder.layers[: self.layers_to_run]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
        if self.drop_first_token:
            hidden = hidden[:, 1:]
        _synchronize(self.device)
        timings.vision_ms = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        features = self.projector(hidden)  # [T, S, D_llm]
        pooled = self.pool(features)  # [T, 196, D_llm]
        tokens = torch.cat([pooled.reshape(-1, pooled.shape[-1]), self.newline[None]], dim=0)  # [T*196 + 1, D_llm]
        _synchronize(self.device)
        timings.projector_ms = (time.perf_counter() - start) * 1e3
        return VisionOutput(tokens=tokens, frames=pixel_values.shape[0], timings=timings)
