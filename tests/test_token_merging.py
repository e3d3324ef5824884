"""Spatially guided token merging: counts, locality, weighting, padding, identity, scaling."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from spatia_hf.models.token_merging import (
    MergeTracker,
    grid_destination_mask,
    grid_positions,
    interleaved_destination_mask,
    merge_count,
    proportional_attention_bias,
    spatial_bipartite_matching,
    spatial_neighbours,
)


def _tissue(b: int = 2, n: int = 400, c: int = 16, extent_um: float = 1000.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 2, generator=g) * extent_um, torch.randn(b, n, c, generator=g)


def _gather_pos(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return pos.gather(1, idx[..., None].expand(-1, -1, 2))


def _brute_knn_distances(pos: torch.Tensor, nb) -> torch.Tensor:
    src = _gather_pos(pos, nb.src_idx.expand(pos.shape[0], -1)).double()
    dst = _gather_pos(pos, nb.dst_idx.expand(pos.shape[0], -1)).double()
    return torch.cdist(src, dst)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_merged_token_count_is_n_minus_r(ratio):
    pos, metric = _tissue(n=301)
    r = merge_count(301, ratio)
    info = spatial_bipartite_matching(metric, pos, r, k=8)
    assert info.r == r and info.num_out == 301 - r
    assert info.merge(torch.randn(2, 301, 5)).shape == (2, 301 - r, 5)


def test_r_is_capped_at_the_number_of_sources():
    pos, metric = _tissue(n=100)
    info = spatial_bipartite_matching(metric, pos, 90, k=4)
    assert info.r == 50  # the interleaved split has ceil(100 / 2) sources


def test_merge_count_rejects_ratio_one():
    with pytest.raises(ValueError, match="ratio=1.0"):
        merge_count(10, 1.0)


def test_unmerge_restores_shape_and_values_of_unmerged_tokens():
    pos, metric = _tissue(n=200)
    info = spatial_bipartite_matching(metric, pos, 60, k=8)
    x = torch.randn(2, 200, 7)
    back = info.unmerge(info.merge(x))
    assert back.shape == x.shape
    touched = torch.zeros(2, 200, dtype=torch.bool)
    touched.scatter_(1, info.src_tokens, True).scatter_(1, info.dst_tokens, True)
    assert touched.sum() < 2 * 200  # some tokens were left alone
    torch.testing.assert_close(back[~touched], x[~touched], rtol=0, atol=0)
    # a merged source receives exactly its destination's merged value
    merged_src = back.gather(1, info.src_tokens[..., None].expand(-1, -1, 7))
    merged_dst = back.gather(1, info.dst_tokens[..., None].expand(-1, -1, 7))
    assert torch.equal(merged_src, merged_dst)


@pytest.mark.parametrize("radius", [None, 40.0])
def test_merges_only_between_k_nearest_spatial_neighbours(radius):
    pos, metric = _tissue(n=300)
    k = 4
    nb = spatial_neighbours(pos, k=k, radius=radius)
    info = spatial_bipartite_matching(metric, pos, 120, k=k, radius=radius)
    dist = _brute_knn_distances(pos, nb)
    kth = dist.topk(k, dim=-1, largest=False).values[..., -1]  # [B, Ns]
    ns = nb.src_idx.shape[1]
    src_rank = torch.full((2, 300), -1).scatter_(1, nb.src_idx, torch.arange(ns).expand(2, ns).contiguous())
    for b in range(2):
        s = info.src_tokens[b]
        d = (pos[b, s].double() - pos[b, info.dst_tokens[b]].double()).norm(dim=-1)
        assert bool((d <= kth[b, src_rank[b, s]] + 1e-6).all())
        if radius is not None:
            assert bool((d <= radius + 1e-6).all())


@pytest.mark.parametrize("layout", ["uniform", "clustered", "line"])
def test_neighbour_search_is_exact(layout):
    g = torch.Generator().manual_seed(1)
    n = 600
    if layout == "uniform":
        pos = torch.rand(2, n, 2, generator=g) * 500
    elif layout == "clustered":  # three dense blobs and sparse background
        centres = torch.tensor([[50.0, 50.0], [400.0, 120.0], [250.0, 450.0]])
        pos = centres[torch.randint(0, 3, (2, n), generator=g)] + torch.randn(2, n, 2, generator=g) * 5
        pos[:, :30] = torch.rand(2, 30, 2, generator=g) * 500
    else:  # nearly collinear
        pos = torch.stack([torch.rand(2, n, generator=g) * 1000, torch.rand(2, n, generator=g) * 1e-3], -1)
    nb = spatial_neighbours(pos, k=6)
    ref = _brute_knn_distances(pos, nb).topk(6, dim=-1, largest=False).values
    torch.testing.assert_close(nb.distances.double(), ref, rtol=1e-5, atol=1e-4)
    with_radius = spatial_neighbours(pos, k=6, radius=3.0)
    expected = torch.where(ref <= 3.0, ref, torch.full_like(ref, math.inf))
    torch.testing.assert_close(with_radius.distances.double(), expected, rtol=1e-5, atol=1e-4)


def test_interleaved_split_is_balanced_and_spatially_even():
    pos = grid_positions(16, 16)[None] * 10.0
    dst = interleaved_destination_mask(pos)
    assert dst.sum() == 128
    # every 2x2 block of the grid holds destinations and sources
    blocks = dst.view(8, 2, 8, 2).sum((1, 3))
    assert bool((blocks == 2).all())


def test_sizes_sum_to_n_through_several_steps():
    pos, metric = _tissue(n=256)
    tracker = MergeTracker(positions=pos)
    x = metric
    for r in (64, 48, 32):
        info = spatial_bipartite_matching(x, tracker.positions, r, sizes=tracker.sizes)
        x = info.merge(x)
        tracker.push(info)
    assert tracker.num_tokens == 256 - 64 - 48 - 32 == x.shape[1]
    torch.testing.assert_close(tracker.sizes.sum(1), torch.full((2,), 256.0))
    assert tracker.unmerge_all(x).shape == (2, 256, 16)


def test_tracker_positions_are_size_weighted_means_of_members():
    pos, metric = _tissue(n=200)
    tracker = MergeTracker(positions=pos)
    x = metric
    for r in (60, 50):
        info = spatial_bipartite_matching(x, tracker.positions, r, sizes=tracker.sizes)
        x = info.merge(x)
        tracker.push(info)
    torch.testing.assert_close(tracker.positions, tracker.merge_all(pos), rtol=1e-5, atol=1e-3)
    # unmerge_all gives every original token the value of the token it ended in
    ids = torch.arange(tracker.num_tokens, dtype=torch.float32).expand(2, -1)[..., None]
    assert torch.equal(tracker.unmerge_all(ids)[..., 0].long(), tracker.origin)


def test_size_weighted_mean_on_hand_built_example():
    # four tokens in a row; tokens 1 and 3 are destinations. Token 0 is nearly parallel to token 1
    # (cosine 0.995), token 2 less so to token 3 (cosine 0.894): with r = 1, 0 merges into 1.
    pos = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.5, 1.0]]])
    dst = torch.tensor([False, True, False, True])
    sizes = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    info = spatial_bipartite_matching(metric, pos, 1, k=2, sizes=sizes, dst_mask=dst)
    assert info.num_out == 3
    assert (int(info.src_tokens[0, 0]), int(info.dst_tokens[0, 0])) == (0, 1)
    x = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    # slot 0 = tokens {0, 1}: (3 * 10 + 1 * 20) / (3 + 1) = 12.5; tokens 2 and 3 unchanged
    torch.testing.assert_close(info.merge(x)[0, :, 0], torch.tensor([12.5, 30.0, 40.0]))
    torch.testing.assert_close(info.merge_sizes(sizes), torch.tensor([[4.0, 2.0, 2.0]]))
    torch.testing.assert_close(info.merge(x, mode="sum")[0, :, 0], torch.tensor([30.0, 30.0, 40.0]))
    torch.testing.assert_close(info.unmerge(info.merge(x))[0, :, 0], torch.tensor([12.5, 12.5, 30.0, 40.0]))


def test_padding_never_merges_with_real_tokens_and_is_merged_first():
    pos, metric = _tissue(b=2, n=120)
    mask = torch.ones(2, 120, dtype=torch.bool)
    mask[1, 80:] = False
    pos[1, 80:] = float("nan")  # padding may carry garbage positions
    info = spatial_bipartite_matching(metric, pos, 30, attention_mask=mask)
    real_src = mask.gather(1, info.src_tokens)
    real_dst = mask.gather(1, info.dst_tokens)
    assert torch.equal(real_src, real_dst)
    assert int((~real_src[1]).sum()) == 20  # 20 padded sources, all merged before any real token
    merged_mask = info.merge_mask(mask)
    assert merged_mask.shape == (2, 90) and int(merged_mask[1].sum()) == 80 - 10
    # changing padded values changes no real token's merged value
    x = torch.randn(2, 120, 3)
    y = x.clone()
    y[1, 80:] = 1e6
    torch.testing.assert_close(info.merge(x)[merged_mask], info.merge(y)[merged_mask], rtol=0, atol=0)


def test_r_zero_is_an_exact_identity():
    pos, metric = _tissue(n=50)
    info = spatial_bipartite_matching(metric, pos, 0)
    x = torch.randn(2, 50, 4)
    assert info.is_identity and info.merge(x) is x and info.unmerge(x) is x
    tracker = MergeTracker(positions=pos)
    tracker.push(info)
    assert tracker.unmerge_all(x) is x


def test_proportional_attention_counts_a_merged_token_as_its_members():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=g)
    k = torch.randn(1, 2, 4, 8, generator=g)
    v = torch.randn(1, 2, 4, 8, generator=g)
    # key 0 duplicated three times == one key of size 3 with bias log(3)
    dup = F.scaled_dot_product_attention(q, k[:, :, [0, 0, 0, 1, 2, 3]], v[:, :, [0, 0, 0, 1, 2, 3]])
    sizes = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=proportional_attention_bias(sizes))
    torch.testing.assert_close(merged, dup, rtol=1e-5, atol=1e-6)
    bias = proportional_attention_bias(sizes, torch.tensor([[True, True, True, False]]))
    assert bias.shape == (1, 1, 1, 4) and bias[0, 0, 0, 3] == -math.inf


def test_grid_helpers():
    pos = grid_positions(3, 4)
    assert pos.shape == (12, 2) and pos[5].tolist() == [1.0, 1.0]  # (col, row)
    dst = grid_destination_mask(4, 4, stride=2)
    assert int(dst.sum()) == 4 and bool(dst[0]) and bool(dst[2]) and not bool(dst[1])


def test_matching_on_a_grid_stays_local():
    h = w = 16
    metric = torch.randn(3, h * w, 8)
    info = spatial_bipartite_matching(
        metric, grid_positions(h, w), h * w // 2, k=4, dst_mask=grid_destination_mask(h, w)
    )
    pos = grid_positions(h, w)
    d = (pos[info.src_tokens] - pos[info.dst_tokens]).norm(dim=-1)
    interior = (pos[info.src_tokens] < 14).all(-1)  # away from the last (odd) row and column
    assert info.r == 128 and float(d[interior].max()) <= math.sqrt(5) + 1e-6
    assert float(d.max()) <= math.sqrt(18) + 1e-6  # token (15, 15): its 4 nearest dst reach (12, 12)


def test_gradients_flow_through_merge():
    pos, metric = _tissue(b=1, n=64)
    x = torch.randn(1, 64, 4, requires_grad=True)
    info = spatial_bipartite_matching(metric, pos, 20)
    info.merge(x).sum().backward()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(44.0 * 4))  # each slot's weights sum to one


def test_bad_input_names_the_field():
    pos, metric = _tissue(n=20)
    with pytest.raises(ValueError, match="positions"):
        spatial_bipartite_matching(metric, pos[..., :1], 4)
    with pytest.raises(ValueError, match="r=-1"):
        spatial_bipartite_matching(metric, pos, -1)
    bad = pos.clone()
    bad[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"positions\[0, 3\]"):
        spatial_bipartite_matching(metric, bad, 4)
    info = spatial_bipartite_matching(metric, pos, 4)
    with pytest.raises(ValueError, match="x has shape"):
        info.merge(torch.randn(2, 19, 3))


def test_neighbour_search_never_builds_a_token_by_token_matrix():
    n = 30_000
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(1, n, 2, generator=g) * 2000
    metric = torch.randn(1, n, 16, generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        info = spatial_bipartite_matching(metric, pos, n // 4, k=8)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    dense = (n // 2) * (n // 2) * 4  # one float32 source x destination matrix
    assert info.r == n // 4
    assert biggest < dense / 10, f"largest single allocation {biggest / 1e6:.0f} MB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pos, metric = _tissue(n=500)
    cpu = spatial_bipartite_matching(metric, pos, 200)
    gpu = spatial_bipartite_matching(metric.cuda(), pos.cuda(), 200)
    assert torch.equal(cpu.dest, gpu.dest.cpu())
