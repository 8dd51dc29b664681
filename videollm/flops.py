"""Analytic FLOPs of the encoder and the LLM prefill (a multiply-add counts as 2 FLOPs).

Estimates from the configs alone, to compare a request with and without compression; they
count matrix products (projections, attention, MLP) and ignore norms, activations and softmax.
"""

from __future__ import annotations


def vision_layer_flops(tokens: int, hidden: int, intermediate: int) -> float:
    projections = 2 * tokens * hidden * hidden * 4  # q, k, v, out
    attention = 2 * 2 * tokens * tokens * hidden  # scores and weighted sum
    mlp = 2 * 2 * tokens * hidden * intermediate
    return float(projections + attention + mlp)


def encoder_flops(vision_config, text_hidden: int, layer_frames: list[int], output_frames: int) -> float:
    """Vision tower (patch embedding + the layers as run) and projector on the output frames."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    hidden = vision_config.hidden_size
    embed = 2 * patches * 3 * vision_config.patch_size**2 * hidden * layer_frames[0] if layer_frames else 0
    layer = vision_layer_flops(patches, hidden, vision_config.intermediate_size)
    projector = 2 * patches * (hidden * text_hidden + text_hidden * text_hidden) * output_frames
    return float(embed + layer * sum(layer_frames) + projector)


def prefill_flops(text_config, tokens: int) -> float:
    """Decoder layers on `tokens` tokens with causal attention, plus the head on the last token."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_hidden = hidden // heads * getattr(text_config, "num_key_value_heads", heads)
    projections = 2 * tokens * hidden * (2 * hidden + 2 * kv_hidden)  # q, o and k, v
    attention = 2 * tokens * tokens * hidden  # causal: half of 2 * 2 * N^2 * D
    mlp = 2 * 3 * tokens * hidden * text_config.intermediate_size  # gate, up, down
    head = 2 * hidden * text_config.vocab_size
    return float(text_config.num_hidden_layers * (projections + attention + mlp) + head)
