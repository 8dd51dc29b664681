"""EarlyTom Stage III: merging visual tokens inside the LLM at one decoder layer.

At decoder layer k, the attention that the last prompt token paid to each visual token at layer
k - 1 (mean over heads) ranks the visual tokens; the top (1 - r) are kept, every other one is
averaged into its most similar kept token (cosine), and layers k.. run on the shorter sequence.
Kept tokens keep their position ids, so decoding continues at the original positions. The
answer depends on the question, so a request with Stage III never shares a cached video prefix.

The decoder layers are transformers' own; forward pre-hooks on them (installed for one request,
removed after it) compute the scores, shorten the sequence and slice the position embeddings
and mask to match. `merge_visual_tokens` is the pure tensor part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

REFERENCE_DEPTH, REFERENCE_LAYER, DEFAULT_DROP_RATIO = 28, 18, 0.5  # published for the 7B (28 layers)


@dataclass(frozen=True)
class InnerMergeSettings:
    layer: int  # k: the first decoder layer that runs on the shorter sequence
    drop_ratio: float  # r: share of visual tokens merged away

    @classmethod
    def resolve(cls, depth: int, layer: int = 0, drop_ratio: float = 0.0) -> InnerMergeSettings:
        """0 means the default: layer 18 of 28 scaled to `depth`, drop ratio 0.5."""
        layer = layer or min(depth - 1, max(1, round(REFERENCE_LAYER * depth / REFERENCE_DEPTH)))
        drop_ratio = drop_ratio or DEFAULT_DROP_RATIO
        if not 1 <= layer < depth:
            raise ValueError(f"inner layer k must be in 1..{depth - 1} for this {depth}-layer LLM, got {layer}")
        if not 0.0 < drop_ratio < 1.0:
            raise ValueError(f"inner drop ratio r must be in (0, 1), got {drop_ratio}")
        return cls(layer, drop_ratio)


def merge_visual_tokens(
    hidden: torch.Tensor, scores: torch.Tensor, start: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [L, D], scores [N] for the visual tokens at start..start+N -> (hidden [L', D], kept index [L'])."""
    count = scores.shape[0]
    visual = hidden[start : start + count]  # [N, D]
    kept = scores.topk(keep).indices.sort().values  # [K] in sequence order
    dropped_mask = torch.ones(count, dtype=torch.bool, device=hidden.device)
    dropped_mask[kept] = False
    dropped = dropped_mask.nonzero().flatten()  # [N - K]
    normed = nn.functional.normalize(visual.float(), dim=-1)
    target = (normed[dropped] @ normed[kept].T).argmax(dim=-1)  # [N - K] most similar kept token
    sums = visual[kept].float().index_add(0, target, visual[dropped].float())  # [K, D]
    counts = torch.ones(keep, device=hidden.device).index_add(0, target, torch.ones(dropped.numel(), device=hidden.device))
    merged = (sums / counts[:, None]).to(hidden.dtype)
    length = hidden.shape[0]
    new_hidden = torch.cat([hidden[:start], merged, hidden[start + count :]])  # [L', D]
    index = torch.cat([
        torch.arange(start, device=hidden.device),
        start + kept,
        torch.arange(start + count, length, device=hidden.device),
    ])  # [L'] original positions of the rows that remain
    return new_hidden, index


def last_token_attention(attention: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Attention of the last token over all tokens, mean over heads: hidden [1, L, D] (normed input) -> [L]."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    config = attention.config
    head_dim = getattr(attention, "head_dim", config.hidden_size // config.num_attention_heads)
    length = hidden.shape[1]
    queries = attention.q_proj(hidden).view(1, length, -1, head_dim).transpose(1, 2)  # [1, H, L, dh]
    keys = attention.k_proj(hidden).view(1, length, -1, head_dim).transpose(1, 2)  # [1, H_kv, L, dh]
    cos, sin = position_embeddings
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # [1, H, L, dh]
    logits = (queries[:, :, -1:] @ keys.transpose(-1, -2)).float() * head_dim**-0.5  # [1, H, 1, L]
    return logits.softmax(dim=-1).mean(dim=1)[0, 0]  # [L]


class InnerMerge:
    """Installs Stage III on a decoder-only model for one generation (prefill and decode)."""

    def __init__(self, decoder_layers: nn.ModuleList, settings: InnerMergeSettings, visual_start: int, visual_count: int):
        self.layers = decoder_layers
        self.settings = settings
        self.visual_start = visual_start
        self.visual_count = visual_count
        self.keep = max(1, round(visual_count * (1.0 - settings.drop_ratio)))
        self.scores: torch.Tensor | None = None  # [N] from layer k - 1
        self.kept_index: torch.Tensor | None = None  # [L'] original positions of the shortened sequence
        self.prefill_length = 0
        self._handles = []

    def __enter__(self) -> InnerMerge:
        k = self.settings.layer
        self._handles.append(
            self.layers[k - 1].self_attn.register_forward_pre_hook(self._score, with_kwargs=True)
        )
        for index in range(k, len(self.layers)):
            self._handles.append(
                self.layers[index].register_forward_pre_hook(self._shorten(index == k), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _score(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [1, L, D] after the input norm
        if hidden.shape[1] > 1 and self.scores is None:  # the prefill pass
            attention = last_token_attention(module, hidden, kwargs["position_embeddings"])  # [L]
            self.scores = attention[self.visual_start : self.visual_start + self.visual_count]
        return None

    def _shorten(self, merges_here: bool):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = hidden.shape[1] > 1
            if prefill and merges_here:
                self.prefill_length = hidden.shape[1]
                hidden, self.kept_index = merge_visual_tokens(hidden[0], self.scores, self.visual_start, self.keep)
                hidden = hidden[None]
            index = self.kept_index
            if prefill:
                cos, sin = kwargs["position_embeddings"]
                if cos.shape[-2] == self.prefill_length:
                    kwargs["position_embeddings"] = (cos[:, index], sin[:, index])
                for name in ("position_ids", "cache_position"):
                    value = kwargs.get(name)
                    if value is not None and value.shape[-1] == self.prefill_length:
                        kwargs[name] = value[..., index]
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.shape[-1] >= self.prefill_length:
                extra = torch.arange(self.prefill_length, mask.shape[-1], device=mask.device)
                keys = torch.cat([index, extra])  # kept prompt positions, then tokens generated since
                mask = mask[..., keys]
                if prefill and mask.shape[-2] == self.prefill_length:
                    mask = mask[..., index, :]
                kwargs["attention_mask"] = mask
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook
