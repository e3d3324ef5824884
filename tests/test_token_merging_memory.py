"""Token merging's memory bounds: chunked search, scoring and merging give the same result as one
big chunk, and the matching + merge never hold full-size copies of the metric or the tokens."""

import pytest
import torch

from spatia_hf.models import token_merging
from spatia_hf.utils.memory import cpu_peak_mib
from spatia_hf.models.token_merging import spatial_bipartite_matching


pytestmark = pytest.mark.usefixtures("one_thread")


def _section(b: int, n: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 2, generator=g) * 3000.0, torch.randn(b, n, c, generator=g)


def test_chunk_sizes_do_not_change_matching_or_merge(monkeypatch):
    pos, metric = _section(2, 300, 24)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 220:] = False
    sizes = torch.rand(2, 300) * 3 + 1
    x = torch.randn(2, 300, 40)

    def run():
        info = spatial_bipartite_matching(metric, pos, 100, k=6, sizes=sizes, attention_mask=mask)
        return info.dest, info.merge(x, mode="mean")

    big_dest, big_x = run()
    monkeypatch.setattr(token_merging, "_ROW_CHUNK", 7)
    monkeypatch.setattr(token_merging, "_KNN_CHUNK_ELEMENTS", 500)
    small_dest, small_x = run()
    assert torch.equal(big_dest, small_dest)
    assert torch.equal(big_x, small_x)


def test_matching_scores_are_the_cosine_of_the_metric():
    """The chunked scoring picks, for every merged source, its most similar candidate."""
    pos, metric = _section(1, 300, 16, seed=3)
    info = spatial_bipartite_matching(metric, pos, 60, k=5)
    nb = token_merging.spatial_neighbours(pos, k=5)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cand = nb.dst_idx[0][nb.neighbours[0]]  # [Ns, k] token index of each candidate
    cos = (unit[0, nb.src_idx[0], None, :] * unit[0, cand]).sum(-1)
    best = cand.gather(1, cos.argmax(1, keepdim=True)).squeeze(1)
    chosen = dict(zip(info.src_tokens[0].tolist(), info.dst_tokens[0].tolist()))
    src_pos = {t: i for i, t in enumerate(nb.src_idx[0].tolist())}
    assert all(best[src_pos[s]].item() == d for s, d in chosen.items())
    # and the merged sources are the 60 best-scoring ones
    top = cos.max(1).values
    assert top[[src_pos[s] for s in chosen]].min() >= top.topk(60).values.min()


def test_matching_and_merge_never_copy_the_whole_metric_or_tokens():
    n, c = 12_000, 64
    pos, metric = _section(1, n, c)
    x = torch.randn(1, n, c)
    sizes = torch.rand(1, n) + 1
    nb = token_merging.spatial_neighbours(pos, k=8)

    def step():
        spatial_bipartite_matching(metric, None, n // 3, sizes=sizes, neighbours=nb).merge(x, mode="mean")

    full = n * c * 4 / 2**20  # one [N, C] float32 tensor
    merged_out = (n - n // 3) * c * 4 / 2**20  # the merge's output, which must exist
    chunks = 4 * token_merging._ROW_CHUNK * c * 4 / 2**20  # a few [rows, C] chunk buffers
    peak = cpu_peak_mib(step)
    # the unchunked code held a normalised copy of the metric plus [N/2, C] products (> 2.5 x full)
    assert peak < merged_out + 0.5 * full + chunks, f"peak {peak:.1f} MiB; one [N, C] tensor is {full:.1f} MiB"


def test_neighbour_search_scratch_is_bounded():
    pos, _ = _section(1, 12_000, 1)
    peak = cpu_peak_mib(lambda: token_merging.spatial_neighbours(pos, k=8))
    # O(N k) results (~1.5 MiB here) plus one chunk of candidates; the unchunked search took ~35 MiB
    assert peak < 8.0, f"neighbour search peak {peak:.1f} MiB"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_inputs_still_work_with_chunking(n):
    pos, metric = _section(1, n, 4)
    info = spatial_bipartite_matching(metric, pos, n // 2, k=2)
    assert info.merge(metric).shape == (1, n - info.r, 4)
