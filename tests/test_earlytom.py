"""EarlyTom: the pure tensor functions on hand-made tensors, and the encoder's behaviour checked
against the independent reference of earlytom_reference.py, recomputed from hidden states captured
with hooks on the SigLIP layers.

Segmentations are also written out literally, worked by hand from the rule: a new segment starts at
frame i when the smoothed similarity falls below tau or when frame i would make the current segment
reach max_window frames, so a segment holds at most max(1, max_window - 1) frames.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from earlytom_reference import (
    DEPTH,
    GRID,
    POOLED,
    TOKENS,
    captured,
    check_stage1,
    check_stage2,
    ref_attention_received,
    ref_dpc_centres,
    ref_fuse,
    ref_plan,
    ref_segments,
    ref_windows,
    spying_on_scores,
    to_pixels,
)
from encoder_service import earlytom
from encoder_service.video_decode import decode_video
from encoder_service.vision import VisionEncoder
from videollm.settings import CompressionSettings
from videos import encode, make_scene_cut_video, make_video, moving_frames, scene_cut_frames, still_frames


# -- hand-made frames ----------------------------------------------------------------------------


def angle_frames(angles: list[float], positions: int = 3) -> torch.Tensor:
    """[T, S, 2]: every position of frame t is a vector at angle angles[t] (norms vary by position).

    The similarity of frames a and b is then cos(angles[a] - angles[b]).
    """
    frames = torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)
    norms = torch.arange(1, positions + 1, dtype=torch.float64)[None, :, None]  # unit vectors scaled 1..S
    return (frames[:, None, :] * norms).float()


def plan_of(plan: list[earlytom.FusedFrame]) -> list[tuple[int, ...]]:
    return [fused.sources for fused in plan]


# -- Stage I units -------------------------------------------------------------------------------


def test_similarity_is_the_mean_over_positions_of_the_per_position_cosine():
    a = torch.tensor([[[100.0, 0.0], [0.0, 1.0]]])  # position 0 has a large norm
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # position 0: cos 1, position 1: cos 0
    normed = earlytom.normalize_frames(torch.cat([a, b]))
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2, 2))
    value = earlytom.similarity(normed[:1], normed[1:])
    assert value.tolist() == pytest.approx([0.5])  # a flattened cosine would give ~1.0


def test_segmentation_follows_the_smoothed_similarity_and_tau():
    # cos to the current segment's first frame, and the smoothed sim (ema 0.9, reset to 1):
    # f1: cos 1 -> 1.0; f2: cos .46 -> .514 (kept although .46 < tau); f3: cos .46 -> .4654 < .5: new segment
    # f4: vs f3 cos .9 -> .91; f5: vs f3 cos .2 -> .271 < .5: new segment; f6: vs f5 cos .6 -> .64
    # (no segment reaches 5 frames, so max_window 6 never cuts)
    c = math.acos(0.46)
    angles = [0.0, 0.0, c, -c, -c + math.acos(0.9), -c + math.acos(0.2), -c + math.acos(0.2) + math.acos(0.6)]
    frames = angle_frames(angles)
    normed = earlytom.normalize_frames(frames)
    assert earlytom.segment_frames(normed, tau=0.5, ema=0.9, max_window=6) == [(0, 2), (3, 4), (5, 6)]
    assert ref_segments(frames, 0.5, 0.9, 6) == [(0, 2), (3, 4), (5, 6)]
    # with ema 1 (no smoothing) frame 2 (cos .46) already starts a segment
    assert earlytom.segment_frames(normed, tau=0.5, ema=1.0, max_window=6) == [(0, 1), (2, 2), (3, 4), (5, 6)]
    # tau -1 never cuts; the window does: frame 5 would be segment (0, ..)'s 6th frame, so it starts one
    assert earlytom.segment_frames(normed, tau=-1.0, ema=0.9, max_window=6) == [(0, 4), (5, 6)]
    # max_window 3: at most 2 frames per segment
    assert earlytom.segment_frames(normed, tau=-1.0, ema=0.9, max_window=3) == [(0, 1), (2, 3), (4, 5), (6, 6)]
    # max_window 3 with tau .5: window cut at 2 (sim reset to 1); f3 vs f2: cos(2c) = 2 * .46^2 - 1 = -.5768,
    # sim .9 * -.5768 + .1 = -.419 < .5: tau cut at 3; f4 vs f3 cos .9 -> .91; window cut at 5; f6 vs f5 -> .64
    assert earlytom.segment_frames(normed, tau=0.5, ema=0.9, max_window=3) == [(0, 1), (2, 2), (3, 4), (5, 6)]
    for tau, ema, window in [(0.5, 0.9, 6), (0.5, 1.0, 6), (-1.0, 0.9, 6), (-1.0, 0.9, 3), (0.5, 0.9, 3)]:
        assert ref_segments(frames, tau, ema, window) == earlytom.segment_frames(normed, tau, ema, window)


IDENTICAL_16 = {  # 16 identical frames: sim stays 1, only the window cuts (worked by hand from the rule)
    1: [(i, i) for i in range(16)],
    2: [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7),
        (8, 8), (9, 9), (10, 10), (11, 11), (12, 12), (13, 13), (14, 14), (15, 15)],
    3: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)],
    4: [(0, 2), (3, 5), (6, 8), (9, 11), (12, 14), (15, 15)],
    6: [(0, 4), (5, 9), (10, 14), (15, 15)],
    16: [(0, 14), (15, 15)],
    17: [(0, 15)],
    1024: [(0, 15)],
}


@pytest.mark.parametrize("max_window", sorted(IDENTICAL_16))
def test_max_window_caps_segments_of_identical_frames(max_window):
    frames = torch.ones(16, 5, 3)
    segments = earlytom.segment_frames(earlytom.normalize_frames(frames), tau=0.5, ema=0.9, max_window=max_window)
    assert segments == IDENTICAL_16[max_window]
    assert ref_segments(frames, 0.5, 0.9, max_window) == IDENTICAL_16[max_window]
    assert max(last - first + 1 for first, last in segments) == max(1, min(16, max_window - 1))


def test_a_tau_cut_right_after_a_window_cut():
    # max_window 4 (at most 3 frames a segment), tau .5, ema .9; cos to the segment's first frame -> sim:
    # f1: cos .55 -> .9 * .55 + .1 * 1 = .595; f2: cos .55 -> .495 + .0595 = .5545 (both kept)
    # f3: would be the 4th frame of (0, ..): window cut at 3, sim reset to 1 (its cos 1 changes nothing)
    # f4: vs f3 cos .3 -> .27 + .1 = .37 < .5: tau cut at 4, the frame right after the window cut
    # f5: vs f4 cos .8 -> .82; f6: vs f4 cos .8 -> .72 + .082 = .802 (kept)
    # f7: vs f4 cos .9 -> .8902 (above tau) but the 4th frame of (4, ..): window cut at 7
    # f8: vs f7 cos .4 -> .36 + .1 = .46 < .5: tau cut at 8; f9 = f8: cos 1 -> 1 (kept)
    a1, a4 = math.acos(0.55), math.acos(0.3)
    angles = [0.0, a1, -a1, 0.0, a4, a4 + math.acos(0.8), a4 - math.acos(0.8), a4 + math.acos(0.9)]
    angles += [angles[7] + math.acos(0.4)] * 2
    frames = angle_frames(angles)
    expected = [(0, 2), (3, 3), (4, 6), (7, 7), (8, 9)]
    reasons: list[str] = []
    assert ref_segments(frames, 0.5, 0.9, 4, reasons=reasons) == expected
    assert reasons == ["window", "tau", "window", "tau"]
    assert earlytom.segment_frames(earlytom.normalize_frames(frames), tau=0.5, ema=0.9, max_window=4) == expected
    # the reading "a segment holds max_window frames" would give [(0, 3), (4, 7), (8, 9)] here:
    # f3 joins (sim .955), f4 vs f0 cos .3 -> .3655: tau cut at 4, then a window cut at 8


def test_segments_cover_every_frame_in_order_on_random_frames():
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):
        t = 1 + trial % 11
        base = torch.randn(1, 6, 4, generator=generator)
        frames = base + 0.7 * torch.randn(t, 6, 4, generator=generator)
        for tau, ema, window in [(0.5, 0.9, 6), (0.9, 0.5, 3), (0.99, 1.0, 2), (-1.0, 0.9, 4)]:
            segments = earlytom.segment_frames(earlytom.normalize_frames(frames), tau, ema, window)
            assert segments[0][0] == 0 and segments[-1][1] == t - 1
            assert all(a[1] + 1 == b[0] for a, b in zip(segments, segments[1:]))
            assert all(1 <= last - first + 1 <= max(1, window - 1) for first, last in segments)
            assert segments == ref_segments(frames, tau, ema, window)


class Recording:
    """A FrameSimilarity that records the frame distance of every pair asked for."""

    def __init__(self, similar: earlytom.FrameSimilarity):
        self.similar, self.asked = similar, []

    def __call__(self, i: int, j: int) -> float:
        self.asked.append(abs(i - j))
        return self.similar(i, j)


@pytest.mark.parametrize("max_window", [1, 2, 3, 6, 20])
def test_frame_similarity_width_covers_every_pair_stage_one_asks_for(max_window):
    # segment_frames compares frame i with its segment's first frame up to i - start = max_window - 1;
    # plan_fusion compares neighbours and a segment's ends: every pair must be among the fetched rows
    normed = earlytom.normalize_frames(torch.ones(16, 5, 3))
    similar = earlytom.FrameSimilarity(normed, earlytom.similarity_width(max_window))
    spy = Recording(similar)
    segments = earlytom.segment_frames(normed, 0.5, 0.9, max_window, spy)
    earlytom.plan_fusion(normed, segments, spy)
    assert max(spy.asked) <= len(similar.rows)
    assert max(spy.asked) == min(15, max(1, max_window - 1))


def test_identical_middle_frames_fuse_pairwise_with_equal_weights():
    frames = torch.randn(1, 4, 3).repeat(6, 1, 1)  # one segment of 6 identical frames
    plan = earlytom.plan_fusion(earlytom.normalize_frames(frames), [(0, 5)])
    assert plan_of(plan) == [(0,), (1, 2), (3, 4), (5,)]
    assert [f.weights for f in plan] == [(1.0,), (0.5, 0.5), (0.5, 0.5), (1.0,)]


def test_short_segments_are_untouched_and_long_segments_keep_their_ends():
    frames = torch.randn(1, 4, 3).repeat(9, 1, 1)
    plan = earlytom.plan_fusion(earlytom.normalize_frames(frames), [(0, 0), (1, 2), (3, 8)])
    assert plan_of(plan) == [(0,), (1,), (2,), (3,), (4, 5), (6, 7), (8,)]
    assert all(f.weights == (1.0,) for f in plan if len(f.sources) == 1)


def test_local_optimum_and_last_pair_rules_with_their_weights():
    # steps between consecutive frames: tau_seg = cos(1.05) ~ .50, a = cos .2, cos .1, cos .3, cos .25
    steps = [0.1, 0.2, 0.1, 0.3, 0.25, 0.1]
    frames = angle_frames(list(np.cumsum([0.0] + steps)))
    plan = earlytom.plan_fusion(earlytom.normalize_frames(frames), [(0, 6)])
    # j=0: a0 < a1, keep 1; j=1: a1 >= a2, fuse (2, 3); j=3: last pair, only a3 >= tau_seg: fuse (4, 5) at 0.5
    assert plan_of(plan) == [(0,), (1,), (2, 3), (4, 5), (6,)]
    a1, a2 = math.cos(0.1), math.cos(0.3)
    assert plan[2].weights[0] == pytest.approx(a1 / (a1 + a2), abs=1e-6)
    assert plan[2].weights[0] + plan[2].weights[1] == pytest.approx(1.0)
    assert plan[3].weights == (0.5, 0.5)
    assert [(s, pytest.approx(w, abs=1e-6)) for s, w in ref_plan(frames, [(0, 6)])] == [
        (f.sources, f.weights) for f in plan]


def test_tau_seg_decides_and_ties_merge():
    # first and last frame identical: tau_seg is the similarity of identical frames, so only the
    # identical middle pair (2, 3) reaches it (inclusive test); (4, 5) is the last pair but below tau_seg
    frames = angle_frames([0.0, 0.2, 0.0, 0.0, 0.2, 0.1, 0.0])
    plan = earlytom.plan_fusion(earlytom.normalize_frames(frames), [(0, 6)])
    assert plan_of(plan) == [(0,), (1,), (2, 3), (4,), (5,), (6,)]
    # the same frames when the ends are far apart: every pair passes tau_seg, the local optimum decides
    far = angle_frames([1.2, 0.2, 0.0, 0.0, 0.2, 0.1, -1.2])
    far_plan = earlytom.plan_fusion(earlytom.normalize_frames(far), [(0, 6)])
    # a0 = cos .2 < a1 = 1: keep 1; a1 >= a2: fuse (2, 3); (4, 5) is the last pair: fuse at 0.5
    assert plan_of(far_plan) == [(0,), (1,), (2, 3), (4, 5), (6,)]
    assert far_plan[3].weights == (0.5, 0.5)
    assert plan_of(far_plan) == [sources for sources, _ in ref_plan(far, [(0, 6)])]


def test_plan_matches_the_reference_on_random_segments():
    generator = torch.Generator().manual_seed(7)
    for _ in range(30):
        t = int(torch.randint(3, 14, (1,), generator=generator))
        frames = torch.randn(1, 5, 4, generator=generator) + 0.5 * torch.randn(t, 5, 4, generator=generator)
        frames[t // 2] = frames[t // 2 - 1]  # one exact repeat
        segments = ref_segments(frames, 0.3, 0.9, 7)
        plan = earlytom.plan_fusion(earlytom.normalize_frames(frames), segments)
        expected = ref_plan(frames, segments)
        assert [f.sources for f in plan] == [s for s, _ in expected]
        for fused, (_, weights) in zip(plan, expected):
            assert fused.weights == pytest.approx(weights, abs=1e-5)
        assert sorted(i for f in plan for i in f.sources) == list(range(t))  # every frame represented once


def test_fuse_copies_kept_frames_exactly_and_mixes_pairs():
    x = torch.randn(7, 5, 3)
    plan = [earlytom.FusedFrame((0,), (1.0,)), earlytom.FusedFrame((1, 2), (0.7, 0.3)),
            earlytom.FusedFrame((3,), (1.0,)), earlytom.FusedFrame((4, 5), (0.5, 0.5)),
            earlytom.FusedFrame((6,), (1.0,))]
    out = earlytom.fuse(x, plan)
    assert out.shape == (5, 5, 3) and out.dtype == x.dtype
    for row, source in [(0, 0), (2, 3), (4, 6)]:
        assert torch.equal(out[row], x[source])
    assert torch.allclose(out[1], 0.7 * x[1] + 0.3 * x[2], atol=1e-6)
    assert torch.allclose(out[3], 0.5 * x[4] + 0.5 * x[5], atol=1e-6)
    scores = torch.rand(7, 11)  # per-frame statistics fuse with the same weights
    fused_scores = earlytom.fuse(scores, plan)
    assert torch.allclose(fused_scores[1], 0.7 * scores[1] + 0.3 * scores[2], atol=1e-6)
    assert torch.equal(fused_scores[4], scores[6])


def test_merge_spans_accounts_for_every_original_frame():
    spans = [(0, 0), (1, 2), (3, 3), (4, 6), (7, 7), (8, 9)]
    plan = [earlytom.FusedFrame((0,), (1.0,)), earlytom.FusedFrame((1, 2), (0.5, 0.5)),
            earlytom.FusedFrame((3, 4), (0.5, 0.5)), earlytom.FusedFrame((5,), (1.0,))]
    merged = earlytom.merge_spans(spans, plan)
    assert merged == [(0, 0), (1, 3), (4, 7), (8, 9)]
    covered = [i for first, last in merged for i in range(first, last + 1)]
    assert covered == list(range(10))


# -- Stage II units ------------------------------------------------------------------------------


def test_attention_received_equals_the_materialised_column_mean_for_any_chunk():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(2, 3, 50, 8, generator=generator)
    keys = torch.randn(2, 3, 50, 8, generator=generator)
    scale = 8**-0.5
    expected = ref_attention_received(queries, keys, scale).float()
    for chunk in (1, 7, 16, 50, 128):
        received = earlytom.attention_received(queries, keys, scale, chunk=chunk)
        assert received.shape == (2, 50)
        assert torch.allclose(received, expected, rtol=1e-5, atol=1e-7), chunk
    assert torch.allclose(expected.sum(dim=-1), torch.ones(2, dtype=torch.float32), atol=1e-5)


def test_pool_scores_pools_like_the_features():
    scores = torch.rand(3, GRID * GRID)
    pooled = earlytom.pool_scores(scores, GRID, POOLED)
    encoder = SimpleNamespace(grid=GRID, pooled_grid=POOLED)
    as_features = VisionEncoder.pool(encoder, scores[:, :, None])  # [3, 196, 1]
    assert pooled.shape == (3, TOKENS)
    assert torch.allclose(pooled, as_features[..., 0], atol=1e-7)


@pytest.mark.parametrize(("tokens", "n"), [(196, 1), (196, 14), (196, 40), (196, 105), (196, 196), (10, 3), (7, 7)])
def test_window_bounds_are_contiguous_balanced_larger_first(tokens, n):
    bounds = earlytom.window_bounds(tokens, n)
    assert [range(a, b) for a, b in bounds] == ref_windows(tokens, n)
    assert bounds[0][0] == 0 and bounds[-1][1] == tokens and len(bounds) == n
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_window_bounds_examples():
    assert earlytom.window_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    sizes = [b - a for a, b in earlytom.window_bounds(196, 40)]
    assert sizes == [5] * 36 + [4] * 4


@pytest.mark.parametrize("n", [1, 3, 40, 196])
def test_window_maxima_picks_the_best_position_of_each_window(n):
    generator = torch.Generator().manual_seed(n)
    scores = -torch.rand(4, TOKENS, generator=generator) - 1.0  # all negative: padding must never win
    positions = earlytom.window_maxima(scores, n)
    assert positions.shape == (4, n)
    for f in range(4):
        expected = [max(window, key=lambda p: scores[f, p].item()) for window in ref_windows(TOKENS, n)]
        assert positions[f].tolist() == expected


@pytest.mark.parametrize(("r", "t", "t_merged", "n"), [
    (0.2, 16, 16, 40), (0.2, 16, 8, 79), (0.1, 32, 32, 20), (0.25, 16, 16, 49), (0.5, 16, 16, 98),
    (0.15, 16, 12, 40), (0.25, 16, 4, 196), (1.0, 16, 6, 196), (0.2, 16, 6, 105), (0.1, 16, 11, 29),
])
def test_tokens_per_frame(r, t, t_merged, n):
    assert earlytom.tokens_per_frame(r, t, t_merged, TOKENS) == n
    assert n == min(TOKENS, math.ceil(round(TOKENS * min(1.0, r * t / t_merged), 9)))


def test_dynamic_mask_marks_segment_ends():
    assert earlytom.dynamic_mask([(0, 0), (1, 2), (3, 7)], 8) == [True, True, True, True, False, False, False, True]


def clustered_points(generator) -> tuple[torch.Tensor, list[int]]:
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    points, labels = [], []
    for label, centre in enumerate(centres):
        for _ in range(10):
            points.append(centre + 0.3 * torch.randn(3, generator=generator))
            labels.append(label)
    return torch.stack(points), labels


def ref_merged_centres(x: torch.Tensor, chosen: list[int], beta: float) -> torch.Tensor:
    distance = torch.cdist(x.double(), x.double())
    rows = []
    for c in chosen:
        members = [i for i in range(x.shape[0]) if i not in chosen
                   and min(chosen, key=lambda o: distance[i, o].item()) == c]
        centre = x[c].double()
        if members:
            centre = beta * centre + (1 - beta) * x[members].double().mean(dim=0)
        rows.append(centre)
    return torch.stack(rows).float()


def test_dpc_knn_picks_one_centre_per_cluster_and_merges_members():
    x, labels = clustered_points(torch.Generator().manual_seed(5))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(6))
    x, labels = x[order], [labels[i] for i in order.tolist()]
    chosen, merged = earlytom.dpc_knn(x, 3, k=4, beta=0.6)
    assert sorted(labels[i] for i in chosen.tolist()) == [0, 1, 2]
    assert merged.shape == (3, 3)
    assert torch.allclose(merged, ref_merged_centres(x, chosen.tolist(), 0.6), atol=1e-5)
    # beta 1 keeps the centre tokens themselves
    chosen_1, merged_1 = earlytom.dpc_knn(x, 3, k=4, beta=1.0)
    assert torch.equal(merged_1, x[chosen_1])


def test_select_tokens_on_dynamic_and_static_frames():
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(4, TOKENS, 5, generator=generator)
    scores = torch.rand(4, TOKENS, generator=generator)
    scores[:, :3] = 10.0  # "attention sinks" at the start of the raster
    n = 10
    selection = earlytom.select_tokens(features, scores, [(0, 3)], n, d=0.0, k=7, beta=0.6)
    assert selection.positions.shape == (4, n) and selection.tokens.shape == (4, n, 5)
    for f in (0, 3):  # dynamic: the top-n scores, in raster order
        expected = sorted(scores[f].topk(n).indices.tolist())
        assert selection.positions[f].tolist() == expected
        assert set(range(3)) <= set(expected)
    for f in (1, 2):  # static: the best of each of n raster windows
        expected = [max(w, key=lambda p: scores[f, p].item()) for w in ref_windows(TOKENS, n)]
        assert selection.positions[f].tolist() == expected
        assert len(set(range(3)) & set(expected)) == 1  # the sinks share one window
    for f in range(4):
        assert torch.equal(selection.tokens[f], features[f, selection.positions[f]])
    # a 1-2 frame segment is all dynamic
    both = earlytom.select_tokens(features[:2], scores[:2], [(0, 1)], n, d=0.0, k=7, beta=0.6)
    assert both.positions[1].tolist() == sorted(scores[1].topk(n).indices.tolist())


def test_select_tokens_with_contextual_tokens_uses_dpc_knn():
    generator = torch.Generator().manual_seed(12)
    features = torch.randn(3, TOKENS, 5, generator=generator)
    scores = torch.rand(3, TOKENS, generator=generator)
    n, d, k, beta = 10, 0.3, 7, 0.6
    dominant = round(n * (1 - d))
    assert dominant == 7
    selection = earlytom.select_tokens(features, scores, [(0, 2)], n, d=d, k=k, beta=beta)
    for f in (0, 2):
        top = scores[f].topk(dominant).indices.tolist()
        rest = [p for p in range(TOKENS) if p not in top]
        centre_index, centre_tokens = earlytom.dpc_knn(features[f, rest], n - dominant, k, beta)
        centres = [rest[i] for i in centre_index.tolist()]
        positions = selection.positions[f].tolist()
        assert positions == sorted(top + centres) and len(set(positions)) == n
        for i, p in enumerate(positions):
            if p in top:
                assert torch.equal(selection.tokens[f, i], features[f, p])
            else:
                assert torch.allclose(selection.tokens[f, i], centre_tokens[centres.index(p)])
        merged = ref_merged_centres(features[f, rest], centre_index.tolist(), beta)
        for c, p in enumerate(centres):
            i = positions.index(p)
            assert torch.allclose(selection.tokens[f, i], merged[c], atol=1e-5)
            assert not torch.equal(selection.tokens[f, i], features[f, p])  # really merged with members
    static = [max(w, key=lambda p: scores[1, p].item()) for w in ref_windows(TOKENS, n)]
    assert selection.positions[1].tolist() == static


def test_dpc_knn_centres_on_a_line_worked_by_hand():
    # points 0, 1, 2.5, 10 on a line, k = 2: mean squared distance to the 2 nearest others:
    # x=0: (1 + 6.25) / 2 = 3.625; x=1: (1 + 2.25) / 2 = 1.625; x=2.5: (2.25 + 6.25) / 2 = 4.25;
    # x=10: (56.25 + 81) / 2 = 68.625. Density exp(-.) ranks x=1 > x=0 > x=2.5 > x=10.
    # Distance to the nearest denser point: x=1 is densest -> largest pairwise distance 10;
    # x=0 -> 1; x=2.5 -> 1.5 (x=1); x=10 -> 7.5 (x=2.5).
    # Scores: x=1: e^-1.625 * 10 = 1.97; x=0: e^-3.625 = .0267; x=2.5: 1.5 e^-4.25 = .0214; x=10: ~1e-29
    x = torch.tensor([[0.0], [1.0], [2.5], [10.0]])
    for centres, expected in [(1, {1}), (2, {0, 1}), (3, {0, 1, 2})]:
        chosen, _ = earlytom.dpc_knn(x, centres, k=2, beta=0.6)
        assert set(chosen.tolist()) == expected
        assert ref_dpc_centres(x.double().tolist(), centres, k=2) == expected


@pytest.mark.parametrize(("seed", "points", "dim", "centres", "k"), [
    (0, 12, 3, 3, 4), (1, 30, 5, 5, 7), (2, 60, 4, 8, 7), (3, 6, 2, 2, 7), (4, 40, 8, 1, 3), (5, 100, 6, 10, 7),
])
def test_dpc_knn_centres_match_a_plain_loop_reference(seed, points, dim, centres, k):
    # the reference is plain Python float64 loops (no cdist, no top-k), and asserts that the cut
    # between the chosen and the next score is clear, so float32 rounding cannot decide it
    x = torch.randn(points, dim, generator=torch.Generator().manual_seed(seed))
    expected = ref_dpc_centres(x.double().tolist(), centres, k)
    chosen, merged = earlytom.dpc_knn(x, centres, k, beta=0.6)
    assert len(chosen) == centres and set(chosen.tolist()) == expected
    assert merged.shape == (centres, dim)


@pytest.mark.parametrize(("n", "d", "dominant"), [
    (5, 0.5, 2),  # 2.5 rounds to even: 2 (half up would give 3)
    (7, 0.5, 4),  # 3.5 -> 4
    (3, 0.5, 2),  # 1.5 -> 2
    (6, 0.25, 4),  # 4.5 -> 4
    (10, 0.25, 8),  # 7.5 -> 8
    (2, 0.75, 0),  # 0.5 -> 0: the whole budget goes to DPC-KNN centres
    (10, 0.0, 10),
])
def test_dominant_share_rounds_half_to_even(n, d, dominant):
    assert (2 * n * (1 - d)).is_integer()  # exact in binary floating point: the halves are real halves
    generator = torch.Generator().manual_seed(n)
    features = torch.randn(1, TOKENS, 5, generator=generator)
    scores = torch.linspace(1.0, 0.0, TOKENS)[None]  # [1, 196]: position p is the p-th best
    k, beta = 7, 0.5
    selection = earlytom.select_tokens(features, scores, [(0, 0)], n, d=d, k=k, beta=beta)
    positions = selection.positions[0].tolist()
    # the dominant tokens are positions 0..dominant-1, copied as they are; the rest are DPC-KNN
    # centres of the remaining positions (the reference's choice), merged with their members
    rest = list(range(dominant, TOKENS))
    centres = ref_dpc_centres(features[0, rest].double().tolist(), n - dominant, k) if n > dominant else set()
    assert positions == sorted(list(range(dominant)) + [rest[i] for i in centres])
    unchanged = [p for i, p in enumerate(positions) if torch.equal(selection.tokens[0, i], features[0, p])]
    assert unchanged == list(range(dominant))


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(encoder_service):
    return encoder_service.engine


def mixed_frames() -> np.ndarray:
    """16 frames: motion, a still stretch (exact repeats 5..9), motion, then a cut to a still scene."""
    frames = moving_frames(16)
    frames[5:10] = frames[5]
    frames[12:16] = scene_cut_frames(1, 4)
    return frames


@pytest.fixture(scope="module")
def mixed_pixels(engine):
    return to_pixels(engine, mixed_frames())


@pytest.fixture(scope="module")
def video_pixels(engine):
    """16 frames of a real (lossy mp4) video, decoded and preprocessed as the encoder service does."""
    decoded = decode_video(make_video("mp4", 48), 16, engine.limits)
    return to_pixels(engine, decoded.frames)


# -- Stage I against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    CompressionSettings(),
    CompressionSettings(tau=0.9, max_window=8, retain_ratio=0.1),
    CompressionSettings(prune_layers=[8, 21], retain_ratio=0.15),
], ids=["defaults", "tau0.9-window8", "layers8-21"])
def test_encoder_merges_frames_exactly_as_the_rule_says(engine, mixed_pixels, settings):
    vision = engine.vision
    with captured(vision) as capture, spying_on_scores() as scores:
        output = vision.encode(mixed_pixels, settings)
    assert len(scores) == 1
    # the decisive check at the first prune layer, spelled out
    out8, in9 = capture.outputs[8], capture.inputs[9]
    segments = ref_segments(out8, settings.tau, settings.ema, settings.max_window)
    plan = ref_plan(out8, segments)
    assert len(segments) > 1
    assert any(len(sources) == 2 for sources, _ in plan), "the case must contain a fusion"
    assert in9.shape[0] == len(plan) < 16
    expected = ref_fuse(out8, plan)
    for row, (sources, _) in enumerate(plan):
        if len(sources) == 1:
            assert torch.equal(in9[row], out8[sources[0]])
    assert torch.allclose(in9, expected, rtol=1e-5, atol=1e-5)
    # and every prune layer, the final segments, the frame counts, then Stage II
    stage1 = check_stage1(capture, output.trace, settings, 16)
    assert stage1.fusions >= 2
    check_stage2(vision, capture, output, settings, 16, stage1, scores[0])
    if settings.prune_layers == [8, 21]:  # the score layer fuses frames that differ: their scores must mix
        out21 = capture.outputs[21]
        assert any(len(s) == 2 and not torch.equal(out21[s[0]], out21[s[1]]) for s, _ in stage1.layer_plans[21])
    if settings.tau == 0.9:
        assert "tau" in stage1.layer_reasons[8], stage1.layer_reasons  # tau, not only the window, cut segments
    else:
        weights = [w for plan in stage1.layer_plans.values() for s, w in plan if len(s) == 2]
        assert any(abs(w[0] - 0.5) > 1e-3 for w in weights), "a fusion with w = a_j / (a_j + a_j+1) != 0.5"
    # exactly repeated frames 5..9 fuse at layer 8 (inside a segment as the middle pair, or with a neighbour)
    assert any(set(sources) <= set(range(5, 10)) and len(sources) == 2 for sources, _ in stage1.layer_plans[8])


def covers(segments: list[tuple[int, int]], frames: int) -> bool:
    return (segments[0][0] == 0 and segments[-1][1] == frames - 1
            and all(first <= last for first, last in segments)
            and all(a[1] + 1 == b[0] for a, b in zip(segments, segments[1:])))


@pytest.mark.parametrize(("video", "settings"), [
    ("moving", CompressionSettings()),
    ("moving", CompressionSettings(tau=0.97, ema=0.5, prune_layers=[0, 12])),
    ("moving", CompressionSettings(max_window=1)),
    ("still", CompressionSettings(max_window=2, prune_layers=[4, 14, 24])),
    ("still", CompressionSettings(prune_layers=[25], retain_ratio=0.5)),
    ("cuts", CompressionSettings(tau=0.9, max_window=3, prune_layers=[3, 5, 7, 9])),
    ("cuts", CompressionSettings(tau=-1.0, max_window=1024, prune_layers=[8, 21, 23], d=0.5)),
])
def test_every_original_frame_is_accounted_for(engine, video, settings):
    frames = {"moving": moving_frames(8, seed=2), "still": still_frames(8), "cuts": scene_cut_frames(3, 3)[:8]}[video]
    with captured(engine.vision) as capture:
        output = engine.vision.encode(to_pixels(engine, frames), settings)
    trace = output.trace
    assert covers(trace.segments, 8), trace.segments
    assert len(trace.segments) <= trace.frames_after_merge <= 8
    stage1 = check_stage1(capture, trace, settings, 8)
    assert stage1.frames_after_merge == trace.frames_after_merge
    if settings.max_window <= 2:  # every frame is a segment of its own: nothing merges
        assert trace.frames_after_merge == 8 and trace.segments == [(i, i) for i in range(8)]
    assert output.tokens.shape[0] == trace.frames_after_merge * trace.tokens_per_frame + 1


# -- token budget and frames per layer -----------------------------------------------------------


@contextmanager
def counting_rows(vision, layers: list[int]):
    rows: dict[int, list[int]] = {i: [] for i in layers}
    handles = [vision.tower.encoder.layers[i].register_forward_pre_hook(
        lambda module, args, i=i: rows[i].append(args[0].shape[0])) for i in layers]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("r", [0.1, 0.15, 0.2, 0.25])
def test_token_budget_and_later_layers_run_on_fewer_frames(engine, video_pixels, r):
    frames = video_pixels.shape[0]
    assert frames == 16
    settings = CompressionSettings(retain_ratio=r)
    with counting_rows(engine.vision, [0, 9, 25]) as rows:
        output = engine.vision.encode(video_pixels, settings)
    trace = output.trace
    merged, n = trace.frames_after_merge, trace.tokens_per_frame
    assert merged < frames
    assert rows[0] == [frames] and rows[25] == [merged] and rows[9][0] < frames
    assert n == math.ceil(round(TOKENS * min(1.0, r * frames / merged), 9))
    assert output.tokens.shape[0] == merged * n + 1
    assert output.tokens.shape[0] <= math.ceil(r * frames * TOKENS) + merged + 1
    assert len(trace.kept) == merged
    for kept in trace.kept:
        assert len(kept) == n and kept == sorted(set(kept)) and all(0 <= p < TOKENS for p in kept)
    assert covers(trace.segments, frames)


# -- still clips and scene cuts ------------------------------------------------------------------


def test_a_still_clip_merges_as_predicted(engine):
    video = encode(still_frames(32), "mp4-lossless")
    decoded = decode_video(video, 16, engine.limits)
    assert all(np.array_equal(frame, decoded.frames[0]) for frame in decoded.frames)  # lossless, truly still
    settings = CompressionSettings()
    with captured(engine.vision) as capture:
        result = engine.encode(video, 16, settings)
    trace = result.trace
    # 16 identical frames, M = 6, worked by hand: segments hold at most 5 frames; a 5-frame segment
    # keeps its ends and fuses its middle pair (1, 2) (a_0 = a_1 = tau_seg: the inclusive tests), the
    # last middle frame stays; a 3-frame segment has no middle pair.
    # layer 8, 16 frames: (0-4)(5-9)(10-14)(15) -> 4 + 4 + 4 + 1 = 13 frames, spans
    #   0 | 1-2 | 3 | 4 | 5 | 6-7 | 8 | 9 | 10 | 11-12 | 13 | 14 | 15
    # layer 21, 13 frames: (0-4)(5-9)(10-12) -> 4 + 4 + 3 = 11 frames, spans
    #   0 | 1-3 | 4 | 5 | 6-7 | 8-9 | 10 | 11-12 | 13 | 14 | 15
    # layer 23, 11 frames: (0-4)(5-9)(10) -> 4 + 4 + 1 = 9 frames, spans
    #   0 | 1-4 | 5 | 6-7 | 8-9 | 10-12 | 13 | 14 | 15
    # final segmentation of the 9 frames: (0-4)(5-8), i.e. original frames 0-9 and 10-15
    assert trace.layer_frames == [16] * 9 + [13] * 13 + [11] * 2 + [9] * 2
    assert trace.frames_after_merge == 9 and trace.segments == [(0, 9), (10, 15)]
    n = math.ceil(TOKENS * 0.2 * 16 / 9)
    assert n == 70 and trace.tokens_per_frame == n and result.tokens.shape[0] == 9 * n + 1
    stage1 = check_stage1(capture, trace, settings, 16)
    keep = (1.0,)
    half = (0.5, 0.5)
    assert stage1.layer_segments[8] == [(0, 4), (5, 9), (10, 14), (15, 15)]
    assert stage1.layer_plans[8] == [((0,), keep), ((1, 2), half), ((3,), keep), ((4,), keep),
                                     ((5,), keep), ((6, 7), half), ((8,), keep), ((9,), keep),
                                     ((10,), keep), ((11, 12), half), ((13,), keep), ((14,), keep),
                                     ((15,), keep)]
    assert stage1.layer_segments[21] == [(0, 4), (5, 9), (10, 12)]
    assert stage1.layer_segments[23] == [(0, 4), (5, 9), (10, 10)]
    assert stage1.final_segments == [(0, 4), (5, 8)]
    for i in range(1, 16):  # the frames stay bit-identical through the layers, so every tie is exact
        assert torch.equal(capture.outputs[8][i], capture.outputs[8][0])


def test_scene_cuts_start_segments_as_the_rule_says(engine):
    settings = CompressionSettings(tau=0.9)
    with captured(engine.vision) as capture:
        result = engine.encode(make_scene_cut_video(scenes=4, per_scene=12), 16, settings)
    trace = result.trace
    scene_of = [index // 12 for index in result.video.frame_indices]
    assert scene_of == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    stage1 = check_stage1(capture, trace, settings, 16)
    assert stage1.layer_segments[8] == [(0, 3), (4, 7), (8, 11), (12, 15)]  # one segment per scene
    assert stage1.layer_reasons[8] == ["tau"] * 3
    # the final segments (after layer 23, checked against the rule above) still start only at cuts
    assert len(trace.segments) > 1 and {first for first, _ in trace.segments} <= {0, 4, 8, 12}
    assert trace.frames_after_merge < 16


# -- determinism and the uncompressed path -------------------------------------------------------


@pytest.mark.parametrize("settings", [CompressionSettings(), CompressionSettings(d=0.4, tau=0.9, retain_ratio=0.1)],
                         ids=["defaults", "contextual"])
def test_same_pixels_and_settings_give_identical_output(engine, mixed_pixels, settings):
    first = engine.vision.encode(mixed_pixels.clone(), settings)
    second = engine.vision.encode(mixed_pixels.clone(), settings)
    assert torch.equal(first.tokens, second.tokens)
    assert first.trace == second.trace
    assert first.trace.frames_after_merge < 16


def test_retain_one_without_prune_layers_equals_no_compression(engine, video_pixels):
    pixels = video_pixels[:8]
    none = engine.vision.encode(pixels, CompressionSettings(method="none"))
    full = engine.vision.encode(pixels, CompressionSettings(retain_ratio=1.0, prune_layers=[]))
    assert none.tokens.shape[0] == 8 * TOKENS + 1
    assert none.trace.frames_after_merge == 8 and none.trace.layer_frames == [8] * DEPTH
    assert none.trace.kept == [list(range(TOKENS))] * 8
    assert torch.equal(full.tokens, none.tokens)
    assert full.trace.layer_frames == [8] * DEPTH and full.trace.tokens_per_frame == TOKENS
    assert full.trace.kept == [list(range(TOKENS))] * 8


# -- settings ------------------------------------------------------------------------------------


def test_prune_layers_scale_with_encoder_depth():
    settings = CompressionSettings(prune_layers=[8, 21, 23])
    assert settings.scaled_prune_layers(26) == [8, 21, 23]
    scaled = settings.scaled_prune_layers(13)
    assert len(scaled) == 3 and scaled == sorted(scaled) and all(0 <= p < 13 for p in scaled)
    for layer, got in zip([8, 21, 23], scaled):
        assert abs(got - layer * 13 / 26) <= 0.5
    assert scaled[0] == 4
    assert CompressionSettings(prune_layers=[25]).scaled_prune_layers(13) == [12]
    assert CompressionSettings(prune_layers=[23, 8, 21, 8]).prune_layers == [8, 21, 23]


@pytest.mark.parametrize("bad", [
    {"retain_ratio": 0}, {"retain_ratio": 1.5}, {"prune_layers": [26]}, {"prune_layers": [-1]},
    {"max_window": 0}, {"unknown_field": 1}, {"method": "holitom"},
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        CompressionSettings(**bad)
