"""The decoder's forward passes over a static KV cache of `slots` sequences.

transformers' model object holds the weights; this module runs its layers by hand so that
  - a prefill writes one sequence's keys and values straight into its slot of the static cache,
    and EarlyTom Stage III shortens the sequence at layer k without hooks;
  - one decode step runs every active sequence at once (continuous batching), each attending to its
    own slot up to its own length, and on CUDA that step is a captured CUDA graph (one per batch
    size and key-length bucket), so decoding costs kernel time rather than Python time.

Slots are kept dense: active sequences occupy slots 0..n-1 (`move` fills a hole left by a finished
one), so a step over n sequences is the bucket >= n. Each layer's cache is [slots, H_kv, L, dh]: a
slot holds one row (along L) per token. Per slot and per layer, `lengths` counts the rows written
(the next token goes to row `lengths`); layers after a Stage III merge hold fewer rows than the
layers before it, while the rotary position of the next token (`positions`) stays the position in
the unshortened prompt. `filled` is the host's copy of the longest layer's length per slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from llm_service.inner_merge import last_token_attention, merge_visual_tokens
from videollm.settings import InnerCompressionSettings

log = logging.getLogger(__name__)

MIN_KEY_BUCKET = 256  # decode attention reads keys in power-of-two buckets from here up to the cache length
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048)  # prompt chunks run as graphs (padded up)


def _buckets(limit: int, start: int) -> list[int]:
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


@dataclass
class FusedLayer:
    """One decoder layer's projections as two matmuls; the modules' own weights become views of these."""

    qkv_weight: torch.Tensor  # [(H + 2 H_kv) dh, D]
    qkv_bias: torch.Tensor | None  # [(H + 2 H_kv) dh]
    gate_up_weight: torch.Tensor  # [2 I, D]

    @classmethod
    def of(cls, layer: nn.Module) -> FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv_weight = torch.cat([p.weight.detach() for p in projections])
        qkv_bias = None
        if any(p.bias is not None for p in projections):
            qkv_bias = torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features)
                                  for p in projections])
        gate_up_weight = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        start = 0
        for p in projections:
            end = start + p.out_features
            p.weight.data = qkv_weight[start:end]
            if p.bias is not None:
                p.bias.data = qkv_bias[start:end]
            start = end
        inner = mlp.gate_proj.out_features
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up_weight[:inner], gate_up_weight[inner:]
        return cls(qkv_weight, qkv_bias, gate_up_weight)


def _rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Qwen2RMSNorm as one fused op (statistics in float32)."""
    return F.rms_norm(hidden, hidden.shape[-1:], norm.weight, norm.variance_epsilon)


def _mlp(hidden: torch.Tensor, mlp: nn.Module, fused: FusedLayer) -> torch.Tensor:
    gate, up = F.linear(hidden, fused.gate_up_weight).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class StageThree:
    """One request's Stage III merge: at `settings.layer` keep `keep` of the `count` visual tokens at `start`."""

    settings: InnerCompressionSettings  # resolved: its layer is set
    start: int
    count: int

    @property
    def keep(self) -> int:
        return max(1, round(self.count * (1.0 - self.settings.drop_ratio)))


class ModelRunner:
    def __init__(self, model: nn.Module, slots: int, max_length: int):
        config = model.config
        self.model = model
        self.layers = model.model.layers
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.slots, self.max_length = slots, max_length
        self.fused = [FusedLayer.of(layer) for layer in self.layers]
        depth = len(self.layers)
        shape = (slots, self.kv_heads, max_length, self.head_dim)
        with torch.device(self.device):
            self.keys = [torch.zeros(shape, dtype=self.dtype) for _ in range(depth)]  # [S, H_kv, L, dh] each
            self.values = [torch.zeros(shape, dtype=self.dtype) for _ in range(depth)]
            self.lengths = torch.zeros(depth, slots, dtype=torch.long)  # [layers, S] rows written per layer and slot
            self.positions = torch.zeros(slots, dtype=torch.long)  # [S] rotary position of the next token
            self.tokens = torch.zeros(slots, dtype=torch.long)  # [S] the next input token of each slot
            self.slot_index = torch.arange(slots)  # [S]
            self.key_index = torch.arange(max_length)  # [L]
            # Static inputs of a prompt chunk: its slot, embeddings, rotary positions, index of its last token.
            self.chunk_slot = torch.zeros(1, dtype=torch.long)  # [1]
            self.chunk_embeds = torch.zeros(PROMPT_BUCKETS[-1], model.config.hidden_size, dtype=self.dtype)  # [Q_max, D]
            self.chunk_positions = torch.zeros(PROMPT_BUCKETS[-1], dtype=torch.long)  # [Q_max]
            self.chunk_last = torch.zeros(1, dtype=torch.long)  # [1]
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = model.model.rotary_emb(probe, torch.arange(max_length)[None])  # [1, L, dh]
        self.cos, self.sin = cos[0], sin[0]  # [L, dh], exactly as transformers computes them per position
        self.filled = [0] * slots  # per slot, the rows its longest layer holds (host copy: no device read per step)
        self.batch_buckets = _buckets(slots, 1) if slots > 1 else [1]
        self.key_buckets = _buckets(max_length, min(MIN_KEY_BUCKET, max_length))
        self.prompt_buckets = [size for size in PROMPT_BUCKETS if size <= max_length]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # decode steps
        self.chunk_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # prompt chunks
        self.steps = 0  # decode steps run (tests and metrics read it)
        log.info("KV cache: %d slots x %d tokens, %.2f GiB", slots, max_length, self.cache_bytes / 2**30)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # --- prefill ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, position: int, merge: StageThree | None = None) -> torch.Tensor:
        """Append embeds [L, D] to `slot` starting at rotary `position`; return the last token's logits [V].

        Prompts up to the largest chunk run as one chunk pass (a replayed graph on CUDA); longer ones
        and Stage III run layer by layer with causal flash attention."""
        length = embeds.shape[0]
        if self.filled[slot] + length > self.max_length:
            raise ValueError(f"{self.filled[slot] + length} tokens do not fit a KV cache slot of {self.max_length}")
        if merge is None and length <= self.prompt_buckets[-1]:
            return self._prefill_chunk(slot, embeds, position)
        positions = torch.arange(position, position + length, device=self.device)  # [L]
        hidden = embeds.to(self.dtype)  # [L, D]
        starts = self.lengths[:, slot].tolist()  # rows already in the slot, per layer
        ends = []
        scores = None
        for index, layer in enumerate(self.layers):
            if merge is not None and index == merge.settings.layer:
                hidden, kept = merge_visual_tokens(hidden, scores, merge.start, merge.keep)  # [L', D], [L']
                positions = positions[kept]
            cos, sin = self.cos[positions], self.sin[positions]  # [L, dh]
            normed = _rms_norm(hidden, layer.input_layernorm)
            if merge is not None and index == merge.settings.layer - 1:
                attention = last_token_attention(layer.self_attn, normed[None], (cos[None], sin[None]))  # [L]
                scores = attention[merge.start : merge.start + merge.count]
            hidden = hidden + self._prefill_attention(index, slot, starts[index], normed, cos, sin)
            hidden = hidden + _mlp(_rms_norm(hidden, layer.post_attention_layernorm), layer.mlp, self.fused[index])
            ends.append(starts[index] + hidden.shape[0])
        self.lengths[:, slot] = torch.tensor(ends, device=self.device)
        self.filled[slot] = max(ends)
        self.positions[slot] = position + length
        return self._logits(hidden[-1:])[0]  # [V]

    def _prefill_chunk(self, slot: int, embeds: torch.Tensor, position: int) -> torch.Tensor:
        length, start = embeds.shape[0], self.filled[slot]  # start: rows already in the slot
        shape = (length, start + length)  # exact shapes when no graph is used
        if self.chunk_graphs:
            chunk = self._bucket(self.prompt_buckets, length)
            keys = next((k for k in self.key_buckets if k >= start + chunk), None)
            if keys is not None and (chunk, keys) in self.chunk_graphs:
                shape = (chunk, keys)
        self.chunk_slot.fill_(slot)
        self.chunk_embeds[:length] = embeds
        self.chunk_positions[: shape[0]] = torch.arange(position, position + shape[0], device=self.device)
        self.chunk_last.fill_(length - 1)
        if shape in self.chunk_graphs:
            graph, logits = self.chunk_graphs[shape]
            graph.replay()
        else:
            logits = self._chunk(*shape)
        self.lengths[:, slot] += length
        self.filled[slot] = start + length
        self.positions[slot] = position + length
        return logits[0]  # [V]

    def _chunk(self, count: int, key_length: int) -> torch.Tensor:
        """`count` prompt tokens from the static chunk inputs appended to slot `chunk_slot` (which holds
        fewer than key_length - count rows) -> logits of its token `chunk_last` [1, V]."""
        dh, group = self.head_dim, self.group
        slot = self.chunk_slot  # [1]
        hidden = self.chunk_embeds[:count]  # [Q, D]
        positions = self.chunk_positions[:count]  # [Q]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [Q, 1, dh]
        key_index = self.key_index[:key_length]  # [K]
        for index, layer in enumerate(self.layers):
            write_at = self.lengths[index].index_select(0, slot) + self.key_index[:count]  # [Q] row of each token
            normed = _rms_norm(hidden, layer.input_layernorm)
            queries, keys, values = self._qkv(index, normed, cos, sin)  # [Q, H, dh], [Q, H_kv, dh] x 2
            self.keys[index][slot, :, write_at] = keys  # [Q, H_kv, dh] into rows write_at of the slot
            self.values[index][slot, :, write_at] = values
            slot_keys = self.keys[index][:, :, :key_length].index_select(0, slot)  # [1, H_kv, K, dh]
            slot_values = self.values[index][:, :, :key_length].index_select(0, slot)
            # The G query heads of a key head are stacked along the query axis: [1, H_kv, G*Q, dh].
            stacked = queries.view(count, self.kv_heads, group, dh).permute(1, 2, 0, 3).reshape(1, self.kv_heads, -1, dh)
            visible = (key_index[None, :] <= write_at[:, None]).repeat(group, 1)  # [G*Q, K]
            out = F.scaled_dot_product_attention(stacked, slot_keys, slot_values, attn_mask=visible)  # [1, H_kv, G*Q, dh]
            out = out.view(self.kv_heads, group, count, dh).permute(2, 0, 1, 3).reshape(count, self.heads * dh)
            hidden = hidden + layer.self_attn.o_proj(out)
            hidden = hidden + _mlp(_rms_norm(hidden, layer.post_attention_layernorm), layer.mlp, self.fused[index])
        return self._logits(hidden.index_select(0, self.chunk_last))  # [1, V]

    def _qkv(self, index: int, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """normed [..., D] -> rotated queries [..., H, dh], rotated keys and values [..., H_kv, dh]."""
        fused = self.fused[index]
        qkv = F.linear(normed, fused.qkv_weight, fused.qkv_bias).unflatten(-1, (-1, self.head_dim))  # [..., H+2H_kv, dh]
        rotated = _rotate(qkv[..., : self.heads + self.kv_heads, :], cos, sin)
        return rotated[..., : self.heads, :], rotated[..., self.heads :, :], qkv[..., self.heads + self.kv_heads :, :]

    def _prefill_attention(self, index: int, slot: int, start: int, normed: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        length = normed.shape[0]
        dh = self.head_dim
        queries, keys, values = self._qkv(index, normed, cos[:, None], sin[:, None])  # [L, H(_kv), dh]
        queries, keys, values = queries.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # [H(_kv), L, dh]
        end = start + length  # the slot's rows start..end-1 are this layer's new ones
        self.keys[index][slot, :, start:end] = keys  # [H_kv, L, dh]
        self.values[index][slot, :, start:end] = values
        all_keys = self.keys[index][slot, :, :end].repeat_interleave(self.group, dim=0)  # [H, end, dh]
        all_values = self.values[index][slot, :, :end].repeat_interleave(self.group, dim=0)
        if start == 0:
            out = F.scaled_dot_product_attention(queries[None], all_keys[None], all_values[None], is_causal=True)
        else:  # a cached prefix precedes: query j sees keys up to start + j
            visible = self.key_index[:end][None, :] <= (start + torch.arange(length, device=self.device))[:, None]  # [L, end]
            out = F.scaled_dot_product_attention(queries[None], all_keys[None], all_values[None], attn_mask=visible)
        return self.layers[index].self_attn.o_proj(out[0].transpose(0, 1).reshape(length, self.heads * dh))  # [L, D]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(_rms_norm(hidden, self.model.model.norm)).float()  # [B, V]

    # --- the cache of one slot ----------------------------------------------------------------

    def read_prefix(self, slot: int, length: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Copies of the keys and values of the slot's first `length` tokens per layer ([H_kv, length, dh]
        each) and the rotary position after them; the slot was filled by a plain prefill (every layer
        holds every token, so that position is `length`)."""
        layers = [(keys[slot, :, :length].clone(), values[slot, :, :length].clone())
                  for keys, values in zip(self.keys, self.values)]  # [H_kv, length, dh] each
        return layers, length

    def write(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]], position: int) -> None:
        """Fill an empty slot with keys and values from `read_prefix` and set its next rotary position."""
        for index, (keys, values) in enumerate(layers):  # [H_kv, length, dh] each
            length = keys.shape[1]
            self.keys[index][slot, :, :length] = keys
            self.values[index][slot, :, :length] = values
            self.lengths[index, slot] = length
        self.filled[slot] = max(keys.shape[1] for keys, _ in layers)
        self.positions[slot] = position

    def move(self, source: int, target: int) -> None:
        """Copy the sequence in `source` to the free slot `target`, then free `source`."""
        for index, length in enumerate(self.lengths[:, source].tolist()):
            self.keys[index][target, :, :length] = self.keys[index][source, :, :length]  # [H_kv, length, dh]
            self.values[index][target, :, :length] = self.values[index][source, :, :length]
        self.lengths[:, target] = self.lengths[:, source]
        self.positions[target] = self.positions[source]
        self.tokens[target] = self.tokens[source]
        self.filled[target] = self.filled[source]
        self.free(source)

    def free(self, slot: int) -> None:
        self.lengths[:, slot] = 0
        self.positions[slot] = 0
        self.tokens[slot] = 0
        self.filled[slot] = 0

    # --- decode -------------------------------------------------------------------------------

    def _step(self, batch: int, key_length: int) -> torch.Tensor:
        """One token for slots 0..batch-1 from `tokens`; writes their keys and values -> logits [batch, V]."""
        dh = self.head_dim
        hidden = self.model.model.embed_tokens(self.tokens[:batch])  # [B, D]
        positions = self.positions[:batch]  # [B]
        cos = self.cos[positions][:, None, :]  # [B, 1, dh]
        sin = self.sin[positions][:, None, :]
        slots = self.slot_index[:batch]  # [B] batch row b decodes slot b
        write_at = self.lengths[:, :batch]  # [layers, B] the row each slot's new token goes to, per layer
        visible = (self.key_index[:key_length] <= write_at[..., None])[:, :, None, None, :]  # [layers, B, 1, 1, K]
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(hidden, layer.input_layernorm)
            queries, keys, values = self._qkv(index, normed, cos, sin)  # [B, H, dh], [B, H_kv, dh] x 2
            # The query heads sharing a key head act as that head's queries: no copies of keys.
            queries = queries.view(batch, self.kv_heads, self.group, dh)  # [B, H_kv, G, dh]
            self.keys[index][slots, :, write_at[index]] = keys  # [B, H_kv, dh]: row write_at[index, b] of slot b
            self.values[index][slots, :, write_at[index]] = values
            out = F.scaled_dot_product_attention(
                queries, self.keys[index][:batch, :, :key_length], self.values[index][:batch, :, :key_length],
                attn_mask=visible[index],
            )  # [B, H_kv, G, dh]
            hidden = hidden + layer.self_attn.o_proj(out.reshape(batch, self.heads * dh))
            hidden = hidden + _mlp(_rms_norm(hidden, layer.post_attention_layernorm), layer.mlp, self.fused[index])
        return self._logits(hidden)  # [B, V]

    def _bucket(self, sizes: list[int], need: int) -> int:
        return next(size for size in sizes if size >= need)

    @torch.inference_mode()
    def decode(self, count: int, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` to slots 0..count-1, one step; return their logits [count, V]."""
        self.tokens[:count] = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        need = max(self.filled[:count]) + 1  # keys the step reads: the longest slot's rows and the new one
        if need > self.max_length:
            raise ValueError(f"a sequence outgrew its KV cache slot of {self.max_length} tokens")
        shape = (self._bucket(self.batch_buckets, count), self._bucket(self.key_buckets, need))
        if self.graphs:
            graph, logits = self.graphs[shape]
            graph.replay()
        else:
            logits = self._step(*shape)
        self.lengths[:, :count] += 1
        self.positions[:count] += 1
        for slot in range(count):
            self.filled[slot] += 1
        self.steps += 1
        return logits[:count]

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode step for every (batch, key length) bucket. Slots must be empty."""
        if self.device.type != "cuda":
            return
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and cuBLAS outside capture
            for _ in range(2):
                self._step(self.batch_buckets[-1], self.key_buckets[-1])
                self._chunk(self.prompt_buckets[-1], self.key_buckets[-1])
        torch.cuda.current_stream().wait_stream(stream)
        for batch in reversed(self.batch_buckets):
            for key_length in reversed(self.key_buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._step(batch, key_length)
                pool = graph.pool()
                self.graphs[(batch, key_length)] = (graph, logits)
        self.chunk_slot.fill_(0)
        for chunk in reversed(self.prompt_buckets):
            for key_length in reversed(self.key_buckets):
                if key_length < chunk:
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._chunk(chunk, key_length)
                self.chunk_graphs[(chunk, key_length)] = (graph, logits)
        self.lengths.zero_()  # the captures wrote rows of slot 0 and row 0 of every slot; nothing is live yet
        torch.cuda.synchronize()
        log.info("captured %d decode and %d prompt graphs", len(self.graphs), len(self.chunk_graphs))
