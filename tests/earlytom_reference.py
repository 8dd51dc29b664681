"""An independent restatement of EarlyTom for the tests, in plain float64 written straight from the
method's rules (docs/earlytom.md), and the machinery that recomputes what the encoder should have
done from hidden states captured with hooks on the SigLIP layers.

Nothing here calls encoder_service.earlytom, so a drift of either side shows up as a mismatch.
Used by test_earlytom.py (the encoder in process) and test_earlytom_rest.py (the REST answer).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder_service import earlytom
from videollm.settings import CompressionSettings

DEPTH = 26
GRID, POOLED, TOKENS = 27, 14, 196


# -- rules ---------------------------------------------------------------------------------------


def ref_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over positions of the cosine similarity of two frames [S, D], in float64."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return cos.mean().item()


@dataclass
class Margins:
    """Every threshold comparison the reference made (value - threshold), to show none was a coin toss."""

    values: list[float] = field(default_factory=list)

    def ge(self, value: float, threshold: float) -> bool:
        self.values.append(value - threshold)
        return value >= threshold

    def assert_clear(self, tolerance: float = 1e-6) -> None:
        # exact ties come from bit-identical frames and are exact in float32 as well
        close = [m for m in self.values if m != 0.0 and abs(m) < tolerance]
        assert not close, f"reference decisions too close to call between float32 and float64: {close}"


def ref_segments(frames: torch.Tensor, tau: float, ema: float, max_window: int,
                 margins: Margins | None = None, reasons: list[str] | None = None) -> list[tuple[int, int]]:
    """Streaming segmentation of frames [T, S, D], written straight from the rule: at frame i the
    smoothed similarity takes in s_i, then a segment starts at i when it is below tau or when the
    current segment would reach max_window frames with frame i (i - start + 1 >= max_window)."""
    margins = margins if margins is not None else Margins()
    segments, start, sim = [], 0, 1.0
    for i in range(1, frames.shape[0]):
        sim = ema * ref_similarity(frames[i], frames[start]) + (1 - ema) * sim
        if i - start + 1 >= max_window:  # frame i would be the segment's max_window-th frame
            reason = "window"  # whatever sim is: no tau decision is made, so no margin is recorded
        elif not margins.ge(sim, tau):
            reason = "tau"
        else:
            continue
        segments.append((start, i - 1))
        start, sim = i, 1.0
        if reasons is not None:
            reasons.append(reason)
    if frames.shape[0]:
        segments.append((start, frames.shape[0] - 1))
    return segments


Plan = list[tuple[tuple[int, ...], tuple[float, ...]]]  # (sources, weights) per output frame


def ref_plan(frames: torch.Tensor, segments: list[tuple[int, int]], margins: Margins | None = None) -> Plan:
    margins = margins if margins is not None else Margins()
    plan: Plan = []
    for first, last in segments:
        if last - first + 1 <= 2:
            plan += [((i,), (1.0,)) for i in range(first, last + 1)]
            continue
        tau_seg = ref_similarity(frames[first], frames[last])
        middle = list(range(first + 1, last))
        a = [ref_similarity(frames[m], frames[m + 1]) for m in middle[:-1]]
        plan.append(((first,), (1.0,)))
        j = 0
        while j < len(middle):
            if j < len(a):
                last_pair = j == len(a) - 1
                merge = margins.ge(a[j], tau_seg)
                if merge and not last_pair:
                    merge = margins.ge(a[j], a[j + 1])
                if merge:
                    w = 0.5 if last_pair else a[j] / (a[j] + a[j + 1])
                    plan.append(((middle[j], middle[j + 1]), (w, 1 - w)))
                    j += 2
                    continue
            plan.append(((middle[j],), (1.0,)))
            j += 1
        plan.append(((last,), (1.0,)))
    return plan


def ref_fuse(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    rows = []
    for sources, weights in plan:
        if len(sources) == 1:
            rows.append(x[sources[0]].clone())
        else:
            mixed = weights[0] * x[sources[0]].double() + weights[1] * x[sources[1]].double()
            rows.append(mixed.to(x.dtype))
    return torch.stack(rows)


def ref_windows(tokens: int, n: int) -> list[range]:
    base, extra = divmod(tokens, n)
    out, start = [], 0
    for w in range(n):
        size = base + 1 if w < extra else base
        out.append(range(start, start + size))
        start += size
    return out


def ref_attention_received(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, H, S, dh] -> [T, S]: materialised softmax(QK^T * scale), mean over heads and queries."""
    out = []
    for t in range(queries.shape[0]):
        probs = (queries[t].double() @ keys[t].double().transpose(-1, -2) * scale).softmax(dim=-1)  # [H, S, S]
        out.append(probs.mean(dim=(0, 1)))
    return torch.stack(out)


def ref_tokens_per_frame(retain_ratio: float, frames: int, frames_after_merge: int) -> int:
    """n = ceil(196 * min(1, r * T / T')); the round(., 9) absorbs float noise such as 0.1 * 30 * 196."""
    return min(TOKENS, math.ceil(round(TOKENS * min(1.0, retain_ratio * frames / frames_after_merge), 9)))


def ref_dpc_scores(points: list[list[float]], k: int) -> list[float]:
    """DPC-KNN score of every point, plain Python floats: density = exp(-mean squared distance to the
    k nearest other points), indicator = distance to the nearest denser point (the densest point:
    the largest pairwise distance), score = density * indicator."""
    m = len(points)
    distance = [[math.dist(a, b) for b in points] for a in points]
    neighbours = min(k, m - 1)
    density = []
    for i in range(m):
        nearest = sorted(distance[i][j] for j in range(m) if j != i)[:neighbours]
        density.append(math.exp(-sum(d * d for d in nearest) / neighbours) if neighbours else 1.0)
    largest = max(max(row) for row in distance)
    scores = []
    for i in range(m):
        denser = [distance[i][j] for j in range(m) if density[j] > density[i]]
        scores.append(density[i] * (min(denser) if denser else largest))
    return scores


def ref_dpc_centres(points: list[list[float]], centres: int, k: int, margin: float = 1e-4) -> set[int]:
    """Indices of the `centres` highest DPC-KNN scores; asserts the cut is clear (relative margin)."""
    scores = ref_dpc_scores(points, k)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if centres < len(scores):
        inside, outside = scores[order[centres - 1]], scores[order[centres]]
        assert inside - outside > margin * abs(inside), f"DPC-KNN centres too close to call: {inside} vs {outside}"
    return set(order[:centres])


# -- hidden states captured from the encoder -----------------------------------------------------


def to_pixels(engine, frames: np.ndarray) -> torch.Tensor:
    return engine.processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]  # [T, 3, 384, 384]


@dataclass
class Capture:
    inputs: dict[int, torch.Tensor]  # hidden entering layer i
    outputs: dict[int, torch.Tensor]  # hidden leaving layer i (before any fusion)
    projector_input: torch.Tensor | None = None

    def after(self, layer: int) -> torch.Tensor:
        """The hidden states after layer `layer` and its fusion: what the next step received."""
        return self.inputs[layer + 1] if layer + 1 < DEPTH else self.projector_input


@contextmanager
def captured(vision):
    capture = Capture({}, {})
    handles = []
    for i, layer in enumerate(vision.tower.encoder.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, i=i: capture.inputs.__setitem__(i, args[0].detach().clone())))
        handles.append(layer.register_forward_hook(
            lambda module, args, out, i=i: capture.outputs.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).detach().clone())))
    handles.append(vision.projector.register_forward_pre_hook(
        lambda module, args: setattr(capture, "projector_input", args[0].detach().clone())))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def spying_on_scores():
    """Records the [T', S] importance scores the encoder hands to pool_scores (after fusion)."""
    seen: list[torch.Tensor] = []
    original = earlytom.pool_scores

    def spy(scores, grid, pooled_grid):
        seen.append(scores.detach().clone())
        return original(scores, grid, pooled_grid)

    earlytom.pool_scores = spy
    try:
        yield seen
    finally:
        earlytom.pool_scores = original


# -- Stage I from the captured hidden states ------------------------------------------------------


@dataclass
class Stage1:
    layer_plans: dict[int, Plan]
    layer_segments: dict[int, list[tuple[int, int]]]
    layer_reasons: dict[int, list[str]]
    final_segments: list[tuple[int, int]]  # in fused-frame indices
    segments: list[tuple[int, int]]  # the final segments in original frame indices
    layer_frames: list[int]  # frames each encoder layer should process
    frames_after_merge: int
    margins: Margins

    @property
    def fusions(self) -> int:
        return sum(len(sources) == 2 for plan in self.layer_plans.values() for sources, _ in plan)


def ref_stage1(capture: Capture, settings: CompressionSettings, frames: int) -> Stage1:
    """Recompute every segmentation and fusion from the captured hidden states. The hidden states
    the encoder carried on after each prune layer are checked against the reference's fusion, so the
    later layers' captures (which the next steps use) are what the rule gives."""
    prune = settings.scaled_prune_layers(DEPTH)
    margins = Margins()
    spans = [(i, i) for i in range(frames)]
    live = frames
    plans, segments_at, reasons_at, expected_rows = {}, {}, {}, []
    for i in range(DEPTH):
        expected_rows.append(live)
        if i in prune:
            out = capture.outputs[i]
            assert out.shape[0] == live
            reasons: list[str] = []
            segments = ref_segments(out, settings.tau, settings.ema, settings.max_window, margins, reasons)
            plan = ref_plan(out, segments, margins)
            expected = ref_fuse(out, plan)
            actual = capture.after(i)
            assert actual.shape == expected.shape, f"layer {i}: {actual.shape[0]} frames, rule gives {len(plan)}"
            for row, (sources, weights) in enumerate(plan):
                if len(sources) == 1:
                    assert torch.equal(actual[row], out[sources[0]]), f"layer {i}: kept frame {sources} changed"
                else:
                    assert torch.allclose(actual[row], expected[row], rtol=1e-5, atol=1e-5), (
                        f"layer {i}: fused frame {sources} with weights {weights} differs")
            spans = [(spans[s[0]][0], spans[s[-1]][1]) for s, _ in plan]
            live = len(plan)
            plans[i], segments_at[i], reasons_at[i] = plan, segments, reasons
    assert [capture.inputs[i].shape[0] for i in range(DEPTH)] == expected_rows
    last = capture.after(prune[-1]) if prune else capture.projector_input
    final = ref_segments(last, settings.tau, settings.ema, settings.max_window, margins)
    margins.assert_clear()
    segments = [(spans[first][0], spans[last_][1]) for first, last_ in final]
    return Stage1(plans, segments_at, reasons_at, final, segments, expected_rows, live, margins)


def check_stage1(capture: Capture, trace, settings: CompressionSettings, frames: int) -> Stage1:
    """Stage I recomputed from the captured hidden states, compared with the encoder's trace."""
    assert trace.prune_layers == settings.scaled_prune_layers(DEPTH)
    stage1 = ref_stage1(capture, settings, frames)
    assert trace.layer_frames == stage1.layer_frames
    assert trace.frames_after_merge == stage1.frames_after_merge
    assert trace.segments == stage1.segments
    return stage1


# -- Stage II from the captured hidden states -----------------------------------------------------


@dataclass
class Stage2:
    received: torch.Tensor  # [T', S] float64: attention received at the last prune layer, fused
    pooled: torch.Tensor  # [T', 196] float32, pooled like the features
    n: int  # tokens per frame
    dynamic: set[int]  # fused frames that are a segment's first or last
    kept: list[list[int]]  # per fused frame: kept positions, raster order

    def assert_kept(self, kept: list[list[int]], tie: float = 1e-8) -> int:
        """`kept` must be the reference's choice; a frame may differ only by a float tie: scores
        within `tie` of each other (the float32 encoder and this float64 reference differ by about
        1e-10 on scores near 1e-3, the median gap between neighbouring scores is about 1e-6).
        Returns how many frames differed that way."""
        assert len(kept) == len(self.kept), (len(kept), len(self.kept))
        differing = 0
        for f, (actual, expected) in enumerate(zip(kept, self.kept)):
            if actual == expected:
                continue
            differing += 1
            scores = self.pooled[f].double()
            assert len(actual) == self.n and actual == sorted(set(actual)), f"frame {f}: {actual}"
            if f in self.dynamic:  # still a top-n, up to a tie
                left_out = [p for p in range(TOKENS) if p not in actual]
                assert scores[actual].min() >= scores[left_out].max() - tie, f"frame {f}: {actual} vs {expected}"
            else:  # still the best of each window, up to a tie
                for window, chosen in zip(ref_windows(TOKENS, self.n), actual):
                    assert chosen in window and scores[chosen] >= scores[list(window)].max() - tie, (
                        f"frame {f}: {actual} vs {expected}")
        return differing


def ref_received(vision, capture: Capture, settings: CompressionSettings, stage1: Stage1) -> torch.Tensor:
    """[T', S] float64: attention each token received at the last prune layer (materialised), fused
    with the frames' weights."""
    layer_index = settings.scaled_prune_layers(DEPTH)[-1]
    layer = vision.tower.encoder.layers[layer_index]
    config = vision.config.vision_config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    x = capture.inputs[layer_index]
    live, tokens, _ = x.shape
    with torch.inference_mode():
        h = layer.layer_norm1(x)
        q = layer.self_attn.q_proj(h).view(live, tokens, heads, head_dim).transpose(1, 2)  # [T, H, S, dh]
        k = layer.self_attn.k_proj(h).view(live, tokens, heads, head_dim).transpose(1, 2)
        received = ref_attention_received(q, k, head_dim**-0.5)  # [T, S] float64
    return ref_fuse(received, stage1.layer_plans[layer_index])  # [T', S]


def ref_stage2(vision, capture: Capture, settings: CompressionSettings, frames: int, stage1: Stage1) -> Stage2:
    """The kept positions as the rules give them (d = 0: top-n on dynamic frames, the best of each
    raster window on static frames), from the importance recomputed at the last prune layer."""
    assert settings.d == 0.0, "the reference selection covers d = 0 (the default); DPC-KNN is unit-tested"
    received = ref_received(vision, capture, settings, stage1)
    pooled = torch.nn.functional.interpolate(received.float().view(-1, 1, GRID, GRID), size=[POOLED, POOLED],
                                             mode="bilinear").reshape(-1, TOKENS)  # [T', 196]
    n = ref_tokens_per_frame(settings.retain_ratio, frames, stage1.frames_after_merge)
    dynamic = {i for segment in stage1.final_segments for i in segment}
    kept = []
    for f in range(stage1.frames_after_merge):
        scores = pooled[f].tolist()
        if f in dynamic:  # the n highest scores
            kept.append(sorted(sorted(range(TOKENS), key=lambda p: -scores[p])[:n]))
        else:  # the best of each of n raster windows
            kept.append([max(window, key=lambda p: scores[p]) for window in ref_windows(TOKENS, n)])
    return Stage2(received, pooled, n, dynamic, kept)


def check_stage2(vision, capture: Capture, output, settings: CompressionSettings, frames: int, stage1: Stage1,
                 module_scores: torch.Tensor | None = None) -> Stage2:
    """Importance at the last prune layer, fused and pooled; dynamic top-n / static windows; tokens."""
    stage2 = ref_stage2(vision, capture, settings, frames, stage1)
    if module_scores is not None:
        assert module_scores.shape == stage2.received.shape
        assert torch.allclose(module_scores.double(), stage2.received, rtol=1e-4, atol=1e-8)
    merged, n, trace = stage1.frames_after_merge, stage2.n, output.trace
    assert trace.tokens_per_frame == n
    stage2.assert_kept(trace.kept)
    with torch.inference_mode():
        features = vision.pool(vision.projector(capture.projector_input))  # [T', 196, D]
    dim = features.shape[-1]
    assert output.tokens.shape == (merged * n + 1, dim)
    body = output.tokens[:-1].view(merged, n, dim)
    for f, kept in enumerate(trace.kept):
        assert torch.allclose(body[f], features[f, kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(output.tokens[-1], vision.newline)
    return stage2
