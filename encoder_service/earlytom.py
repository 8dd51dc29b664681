"""EarlyTom token compression as pure tensor functions (Wang et al., CVPR 2026; the method step by step,
with every rule these functions follow, in docs/earlytom.md).

Stage I (frame merging between encoder layers):
  `normalize_frames` -> `segment_frames` -> `plan_fusion` -> `fuse`
Stage II (decoupled spatial selection after projector and pooling):
  `attention_received` (importance scores at one layer, chunked over queries) -> `pool_scores`
  -> `select_tokens` (dominant top-k or DPC-KNN context on dynamic frames, windowed maxima on
  static frames).
Nothing here knows a model, a file or a setting object; the encoder's layer loop calls these.
Sequential scans (streaming segmentation, the merge walk) run over a handful of host scalars; all
work per token is tensor operations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn


# -- Stage I: segmentation and frame fusion ------------------------------------------------------


def normalize_frames(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [T, S, D] -> [T, S, D] float32 unit token vectors."""
    return nn.functional.normalize(hidden.float(), dim=-1)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the cosine similarity of normed frames a[p] and b[p]: a, b [P, S, D]
    (or one frame [S, D], broadcast) -> [P].

    Computed pair by pair with one elementwise product and row reductions, so identical frames
    always give identical values (a matrix product could round them differently). Callers pass
    slices and single frames where they can: views, not gathered copies of the frames.
    """
    return (a * b).sum(dim=-1).mean(dim=-1)  # [P]


class FrameSimilarity:
    """`similarity` of frame pairs of normed [T, S, D], fetched from the device in one round trip:
    every frame against the `width` frames before it; pairs farther apart are computed when asked.

    Stage I asks only for near pairs (`similarity_width(max_window)` covers them all), so a prune
    step waits for the device once instead of once per segment.
    """

    def __init__(self, normed: torch.Tensor, width: int):
        self.normed = normed
        width = max(0, min(width, normed.shape[0] - 1))
        rows = [similarity(normed[w:], normed[:-w]) for w in range(1, width + 1)]  # row w-1: frame i+w vs i
        values = torch.cat(rows).tolist() if rows else []  # the one round trip
        starts = [0, *itertools.accumulate(row.shape[0] for row in rows)]
        self.rows: list[list[float]] = [values[a:b] for a, b in zip(starts, starts[1:])]

    def __call__(self, i: int, j: int) -> float:
        low, distance = min(i, j), abs(i - j)
        if distance == 0:
            raise ValueError("a frame's similarity to itself is not asked for")
        if distance <= len(self.rows):
            return self.rows[distance - 1][low]
        return similarity(self.normed[low + distance], self.normed[low]).item()


def similarity_width(max_window: int) -> int:
    """The farthest frame distance `segment_frames` and `plan_fusion` ask for: a segment holds at most
    max(1, max_window - 1) frames, and frame i is compared with its segment's first frame before the
    window test, so i - start <= max_window - 1; plan_fusion also needs neighbours (distance 1)."""
    return max(1, max_window - 1)


def segment_frames(
    normed: torch.Tensor, tau: float, ema: float, max_window: int, similar: FrameSimilarity | None = None
) -> list[tuple[int, int]]:
    """Streaming segmentation of normed [T, S, D]: [(first, last)] inclusive, covering every frame in order.

    At frame i the smoothed similarity to the segment's first frame takes in frame i's similarity;
    a segment then starts at frame i when it is below tau, or when adding frame i would make the
    segment reach max_window frames (`i - start + 1 >= max_window`, the authors' test). So a segment
    holds at most max(1, max_window - 1) frames: 16 identical frames with max_window 6 give
    (0, 4), (5, 9), (10, 14), (15, 15); with max_window 1 or 2 every frame is a segment of its own.
    `similar` (of these normed frames, width `similarity_width(max_window)`) saves the device round trip.
    """
    count = normed.shape[0]
    similar = similar or FrameSimilarity(normed, similarity_width(max_window))
    segments: list[tuple[int, int]] = []
    start, smoothed = 0, 1.0
    for i in range(1, count):
        smoothed = ema * similar(i, start) + (1.0 - ema) * smoothed
        if smoothed < tau or i - start + 1 >= max_window:
            segments.append((start, i - 1))
            start, smoothed = i, 1.0
    if count:
        segments.append((start, count - 1))
    return segments


@dataclass(frozen=True)
class FusedFrame:
    sources: tuple[int, ...]  # indices of the input frames it is made of (1 or 2)
    weights: tuple[float, ...]  # their weights, summing to 1


def plan_fusion(
    normed: torch.Tensor, segments: list[tuple[int, int]], similar: FrameSimilarity | None = None
) -> list[FusedFrame]:
    """Which frames survive and which middle frames fuse pairwise, segment by segment."""
    similar = similar or FrameSimilarity(normed, max((last - first for first, last in segments), default=0))
    long_segments = [(first, last) for first, last in segments if last - first + 1 > 2]
    tau_seg = {(first, last): similar(first, last) for first, last in long_segments}
    next_similarity = [similar(i, i + 1) for i in range(normed.shape[0] - 1)]  # [T-1]: frame i vs i+1

    plan: list[FusedFrame] = []
    for first, last in segments:
        if last - first + 1 <= 2:
            plan.extend(FusedFrame((i,), (1.0,)) for i in range(first, last + 1))
            continue
        plan.append(FusedFrame((first,), (1.0,)))
        middle = list(range(first + 1, last))
        pair = [next_similarity[i] for i in middle[:-1]]  # a_j: middle frame j vs j+1
        j = 0
        while j < len(middle):
            if j < len(pair):
                is_last_pair = j == len(pair) - 1
                a_j = pair[j]
                if a_j >= tau_seg[(first, last)] and (is_last_pair or a_j >= pair[j + 1]):
                    if is_last_pair:
                        w = 0.5
                    else:
                        total = a_j + pair[j + 1]
                        w = a_j / total if total > 0 else 0.5
                    plan.append(FusedFrame((middle[j], middle[j + 1]), (w, 1.0 - w)))
                    j += 2
                    continue
            plan.append(FusedFrame((middle[j],), (1.0,)))
            j += 1
        plan.append(FusedFrame((last,), (1.0,)))
    return plan


def _to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on the device without waiting for the device (pinned, asynchronous copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def fuse(x: torch.Tensor, plan: list[FusedFrame]) -> torch.Tensor:
    """x [T, ...] -> [T', ...]: kept frames copied exactly, fused pairs as weighted sums."""
    pairs = [row for row, fused in enumerate(plan) if len(fused.sources) == 2]
    # one transfer: kept (or first) source of every output frame, then the pairs' rows and second sources
    index = _to_device([fused.sources[0] for fused in plan] + pairs + [plan[row].sources[1] for row in pairs],
                       x.device, torch.long)
    kept, rows, second = index[: len(plan)], index[len(plan) : len(plan) + len(pairs)], index[len(plan) + len(pairs) :]
    out = x[kept]  # [T', ...] exact copies of the kept (or first) frames
    if pairs:
        shape = (-1,) + (1,) * (x.dim() - 1)
        w = _to_device([plan[row].weights[0] for row in pairs], x.device, torch.float32).view(shape)
        mixed = w * x[kept[rows]].float() + (1 - w) * x[second].float()  # [P, ...]
        out[rows] = mixed.to(x.dtype)
    return out


def merge_spans(spans: list[tuple[int, int]], plan: list[FusedFrame]) -> list[tuple[int, int]]:
    """Original frame ranges covered by each fused frame."""
    return [(spans[f.sources[0]][0], spans[f.sources[-1]][1]) for f in plan]


# -- Stage II: importance and spatial selection --------------------------------------------------


def attention_received(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 128
) -> torch.Tensor:
    """queries, keys [T, H, S, dh] -> [T, S]: attention each key receives, mean over heads and queries.

    Chunked over queries so that only [T, H, chunk, S] probabilities exist at once.
    """
    frames, heads, tokens, _ = queries.shape
    received = torch.zeros(frames, heads, tokens, device=queries.device, dtype=torch.float32)
    keys_t = keys.transpose(-1, -2)  # [T, H, dh, S]
    for start in range(0, tokens, chunk):
        logits = (queries[:, :, start : start + chunk] @ keys_t).float() * scale  # [T, H, c, S]
        received += logits.softmax(dim=-1).sum(dim=2)
    return received.mean(dim=1) / tokens  # [T, S]


def pool_scores(scores: torch.Tensor, grid: int, pooled_grid: int) -> torch.Tensor:
    """[T, grid*grid] -> [T, pooled_grid**2], with the same bilinear pooling as the features."""
    frames = scores.shape[0]
    image = scores.view(frames, 1, grid, grid)
    pooled = nn.functional.interpolate(image, size=[pooled_grid, pooled_grid], mode="bilinear")
    return pooled.reshape(frames, -1)


def tokens_per_frame(retain_ratio: float, frames: int, frames_after_merge: int, tokens: int = 196) -> int:
    """n = ceil(tokens * r'), r' = min(1, r * T / T'): the budget of r applies to the original frames."""
    ratio = min(1.0, retain_ratio * frames / frames_after_merge)
    return min(tokens, math.ceil(tokens * ratio - 1e-9))


def window_bounds(tokens: int, windows: int) -> list[tuple[int, int]]:
    """Split range(tokens) into `windows` contiguous windows, sizes differing by at most one, larger first."""
    base, extra = divmod(tokens, windows)
    bounds, start = [], 0
    for w in range(windows):
        size = base + (1 if w < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def window_maxima(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores [F, N] -> [F, n] positions: the best-scoring position of each of n raster windows."""
    tokens = scores.shape[1]
    bounds = window_bounds(tokens, n)
    widest = max(end - start for start, end in bounds)
    index = torch.full((n, widest), -1, dtype=torch.long)
    for w, (start, end) in enumerate(bounds):
        index[w, : end - start] = torch.arange(start, end)
    index = index.to(scores.device)
    padded = scores[:, index.clamp(min=0)]  # [F, n, widest]
    padded = padded.masked_fill(index < 0, float("-inf"))
    return index.clamp(min=0)[torch.arange(n, device=scores.device), padded.argmax(dim=-1)]  # [F, n]


def dpc_knn(features: torch.Tensor, centres: int, k: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of features [M, D] into `centres` tokens.

    Returns (indices of the centres [c] in 0..M-1, merged centre features [c, D]).
    """
    x = features.float()
    m = x.shape[0]
    distance = torch.cdist(x, x)  # [M, M]
    neighbours = min(k, m - 1)
    if neighbours > 0:
        nearest = distance.topk(neighbours + 1, dim=-1, largest=False).values[:, 1:]  # [M, k] without self
        density = torch.exp(-(nearest**2).mean(dim=-1))  # [M]
    else:
        density = torch.ones(m, device=x.device)
    # tie-break equal densities by index so that "denser" is a strict order
    density = density + torch.arange(m, device=x.device) * 1e-12
    denser = density[None, :] > density[:, None]  # [M, M]: j denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).min(dim=-1).values  # [M]
    to_denser = torch.where(torch.isinf(to_denser), distance.max(), to_denser)
    chosen = (density * to_denser).topk(centres).indices  # [c]
    assignment = distance[:, chosen].argmin(dim=-1)  # [M] nearest centre of every token
    assignment[chosen] = torch.arange(centres, device=x.device)
    is_member = torch.ones(m, dtype=torch.bool, device=x.device)
    is_member[chosen] = False
    sums = torch.zeros(centres, x.shape[1], device=x.device).index_add_(0, assignment[is_member], x[is_member])
    counts = torch.zeros(centres, device=x.device).index_add_(0, assignment[is_member], torch.ones_like(
        assignment[is_member], dtype=torch.float32))
    merged = x[chosen].clone()
    has = counts > 0
    merged[has] = beta * x[chosen][has] + (1 - beta) * sums[has] / counts[has, None]
    return chosen, merged.to(features.dtype)


@dataclass
class Selection:
    tokens: torch.Tensor  # [T', n, D] kept tokens, raster order inside each frame
    positions: torch.Tensor  # [T', n] their positions on the pooled grid


def dynamic_mask(segments: list[tuple[int, int]], frames: int) -> list[bool]:
    """Dynamic frames: first and last frame of each segment (all frames of 1-2 frame segments)."""
    dynamic = [False] * frames
    for first, last in segments:
        dynamic[first] = dynamic[last] = True
    return dynamic


def select_tokens(
    features: torch.Tensor,
    scores: torch.Tensor,
    segments: list[tuple[int, int]],
    n: int,
    d: float,
    k: int,
    beta: float,
) -> Selection:
    """features [T', N, D], scores [T', N] -> n tokens per frame (Stage II)."""
    frames, tokens, dim = features.shape
    positions = torch.empty(frames, n, dtype=torch.long, device=features.device)
    kept = torch.empty(frames, n, dim, dtype=features.dtype, device=features.device)
    dynamic = torch.tensor(dynamic_mask(segments, frames), device=features.device)
    static_rows = (~dynamic).nonzero().flatten()
    if static_rows.numel():
        chosen = window_maxima(scores[static_rows], n)  # [F_s, n], already in raster order
        positions[static_rows] = chosen
        kept[static_rows] = features[static_rows[:, None], chosen]
    dynamic_rows = dynamic.nonzero().flatten()
    if dynamic_rows.numel():
        dominant = min(n, round(n * (1.0 - d)))  # Python's round, half to even: 2.5 -> 2, 3.5 -> 4
        top = scores[dynamic_rows].topk(dominant, dim=-1).indices  # [F_d, dominant]
        if dominant == n:
            chosen = top.sort(dim=-1).values
            positions[dynamic_rows] = chosen
            kept[dynamic_rows] = features[dynamic_rows[:, None], chosen]
        else:
            for row, frame in enumerate(dynamic_rows.tolist()):
                rest = torch.ones(tokens, dtype=torch.bool, device=features.device)
                rest[top[row]] = False
                rest_index = rest.nonzero().flatten()
                centre_index, centre_tokens = dpc_knn(features[frame, rest_index], n - dominant, k, beta)
                frame_positions = torch.cat([top[row], rest_index[centre_index]])
                frame_tokens = torch.cat([features[frame, top[row]], centre_tokens])
                order = frame_positions.argsort()
                positions[frame] = frame_positions[order]
                kept[frame] = frame_tokens[order]
    return Selection(kept, positions)
