"""EarlyTom Stage III: merging visual tokens inside the LLM at one decoder layer.

At decoder layer k, the attention that the last prompt token paid to each visual token at layer
k - 1 (mean over heads) ranks the visual tokens; the top (1 - r) are kept, every other one is
averaged into its most similar kept token (cosine), and layers k.. run on the shorter sequence.
Kept tokens keep their position ids, so decoding continues at the original positions. The
answer depends on the question, so a request with Stage III never shares a cached video prefix.

The layer loop in llm_service/runner.py applies it: it scores with `last_token_attention` at
layer k - 1, shortens the sequence with `merge_visual_tokens` (the pure tensor part) at layer k,
and keeps per-layer cache lengths, so decoding reads the shorter cache in layers k and later.
"""

from __future__ import annotations

import torch
from torch import nn


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
