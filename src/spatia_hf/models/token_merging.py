"""Spatially guided token merging, shared by the tissue transformer and the diffusion denoiser.

A tissue section has 10^4-10^5 niche tokens and full self-attention over them is quadratic. Following
ToMe (Bolya et al., 2023) we shrink the sequence between layers by merging pairs of similar tokens,
and we record every merge so that per-niche (or per-pixel) outputs can be unmerged afterwards.

Design choices, and why:

* **Only spatial neighbours merge.** Tokens are split into a source and a destination set
  (alternating along a Morton / Z-order curve of the positions, so both sets cover the section
  evenly; image grids use a strided destination set like tomesd). A source may merge only into one
  of its ``k`` nearest destinations (optionally within ``radius`` µm). Two far-apart niches that
  happen to look alike stay separate, so a merged token is always a contiguous patch of tissue and
  its position (the size-weighted mean) is meaningful. It also makes the matching cheap: similarity
  is evaluated on the ``N_src x k`` candidate pairs only, never on an ``N x N`` matrix.
* **The neighbour search is a cell list, not a distance matrix.** Destinations are binned into
  square cells sized so that a cell holds about ``k`` of them; each source scans the
  ``(2R+1) x (2R+1)`` block of cells around its own (one sorted range per row, found with
  ``searchsorted``), and the few sources whose k-th neighbour could lie outside the block are
  searched again with a doubled block. The result is the exact k nearest neighbours in
  ``O(N k log N)`` time and ``O(N k)`` memory for any realistic density (cells do not overlap).
* **Similarity is the cosine of the attention keys** (averaged over heads), as in ToMe: the keys
  are what attention compares, so tokens with similar keys are the ones attention already treats
  alike, and merging them changes the attention pattern least.
* **Merges are size-weighted means, and attention is proportional.** A token that stands for
  ``s`` original tokens has size ``s``; merging averages with weights ``s`` and sums sizes, and
  :func:`proportional_attention_bias` adds ``log s`` to its attention logit, so after softmax it
  receives as much attention mass as its ``s`` members would have had separately.
* **Padding never merges with real tokens.** Padded tokens (``attention_mask`` False) are merged
  only into other padding, first, so batched sections of unequal size keep static shapes and real
  tokens are never mixed with padding.
* **r = 0 is an exact identity**: merge/unmerge return their input unchanged, so a model with merge
  ratio 0 computes exactly the unmerged model.

Everything is vectorised torch (loops run over ``k``, search rings or memory chunks, never over
tokens) and runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "MergeInfo",
    "MergeTracker",
    "SpatialNeighbours",
    "grid_destination_mask",
    "grid_positions",
    "interleaved_destination_mask",
    "merge_count",
    "proportional_attention_bias",
    "spatial_bipartite_matching",
    "spatial_neighbours",
]

# Priority of a padding->padding pair in the matching: above any cosine similarity (<= 1), so
# padding is merged away before any real token is.
_PADDING_PRIORITY = 2.0
# Candidate (source, destination) pairs scored per chunk in the neighbour search. Each pair
# costs ~80 bytes of scratch, so 1 << 16 pairs keep the search under ~6 MiB at any size (it was
# the merged tissue model's peak at 1 << 20); results do not depend on the chunking.
_KNN_CHUNK_ELEMENTS = 1 << 16
# Token rows per chunk when scoring candidates and when merging: bounds the scratch to a few
# rows x channels instead of full [B, N, C] copies (chunked row-wise ops give identical values).
_ROW_CHUNK = 2048
# On an accelerator the same loops run chunks of up to this many elements: 2048-row chunks cost one kernel
# launch per op per chunk, which made merging 8x slower than plain attention on an H200 (see issue 20's note).
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 24
_MORTON_MAX = (1 << 16) - 1


# --------------------------------------------------------------------------------------------
# Positions and partitions
# --------------------------------------------------------------------------------------------


def grid_positions(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(col, row) of every token of a ``height x width`` token grid, row-major: ``[H*W, 2]``.

    Image tokens (a UNet feature map, ViT patches) use these as positions, in token units.
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"grid_positions: height={height}, width={width}; both must be >= 1.")
    rows, cols = torch.meshgrid(
        torch.arange(int(height), device=device), torch.arange(int(width), device=device), indexing="ij"
    )
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1).to(dtype)


def grid_destination_mask(
    height: int, width: int, stride: int | tuple[int, int] = 2, device: torch.device | str | None = None
) -> Tensor:
    """Destination set for image tokens: the top-left token of every ``sy x sx`` block, ``[H*W]`` bool.

    With stride 2 a quarter of the tokens are destinations (tomesd's 2x2 strided dst), so up to
    three quarters can be merged and every source has destinations within one token.
    """
    sx, sy = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
    if sx < 1 or sy < 1:
        raise ValueError(f"grid_destination_mask: stride={stride}; strides must be >= 1.")
    pos = grid_positions(height, width, device=device, dtype=torch.long)
    return (pos[:, 0] % sx == 0) & (pos[:, 1] % sy == 0)


def _morton_spread(v: Tensor) -> Tensor:
    """Spread the low 16 bits of ``v`` to the even bit positions (for Z-order codes)."""
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    v = (v | (v << 1)) & 0x55555555
    return v


def interleaved_destination_mask(positions: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Spatially interleaved source/destination split: ``[B, N]`` bool, True = destination.

    Tokens are ordered along a Z-order (Morton) curve of their positions and alternate
    source/destination along it, so both sets cover the section evenly and every source has
    destinations close by. Padding is ordered after real tokens (and alternates too), so each
    batch element has ``ceil(N/2)`` sources and ``floor(N/2)`` destinations.
    """
    pos = _as_batched_positions(positions, None)
    b, n, _ = pos.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=pos.device) if attention_mask is None else attention_mask
    valid = valid & torch.isfinite(pos).all(-1)
    p = pos.double()
    lo = torch.where(valid[..., None], p, math.inf).amin(1)
    hi = torch.where(valid[..., None], p, -math.inf).amax(1)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    scale = (hi - lo).amax(-1).clamp_min(1e-12)
    q = ((p - lo[:, None]) / scale[:, None, None] * _MORTON_MAX).round().clamp(0, _MORTON_MAX)
    q = torch.where(valid[..., None], q, 0.0).long()
    code = _morton_spread(q[..., 0]) | (_morton_spread(q[..., 1]) << 1)
    code = torch.where(valid, code, torch.full_like(code, 1 << 32))
    key = code * n + torch.arange(n, device=pos.device)  # unique, ties broken by token index
    rank = torch.empty_like(key)
    rank.scatter_(1, key.argsort(dim=1), torch.arange(n, device=pos.device).expand(b, n).contiguous())
    return rank % 2 == 1


def merge_count(num_tokens: int, ratio: float) -> int:
    """Number of tokens ``r`` to merge away so that a fraction ``ratio`` of ``num_tokens`` goes."""
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"merge ratio={ratio}; use a fraction in [0, 1) (0 disables merging).")
    return int(int(num_tokens) * float(ratio))


# --------------------------------------------------------------------------------------------
# Exact k-nearest-neighbour search with a cell list
# --------------------------------------------------------------------------------------------


@dataclass
class SpatialNeighbours:
    """The source/destination split and each source's k nearest destinations.

    Reusable across calls with the same positions (the denoiser caches one per resolution). The
    batch dimension is 1 when every batch element shares the same positions and split.

    Attributes:
        src_idx: ``[B, Ns]`` token index of every source.
        dst_idx: ``[B, Nd]`` token index of every destination.
        neighbours: ``[B, Ns, k]`` index into the destination set (``dst_idx``), nearest first.
        distances: ``[B, Ns, k]`` distance of each neighbour (position units, µm for tissues);
            ``inf`` where a source has fewer than k destinations (within ``radius``).
    """

    src_idx: Tensor
    dst_idx: Tensor
    neighbours: Tensor
    distances: Tensor

    @property
    def valid(self) -> Tensor:
        """``[B, Ns, k]`` True where the neighbour exists (finite distance)."""
        return torch.isfinite(self.distances)

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[-1])

    def expand(self, batch_size: int) -> SpatialNeighbours:
        """The same neighbours broadcast to ``batch_size`` (no copy when shared)."""
        if self.src_idx.shape[0] == batch_size:
            return self
        if self.src_idx.shape[0] != 1:
            raise ValueError(
                f"neighbours were computed for batch size {self.src_idx.shape[0]}, not {batch_size}; "
                "recompute them for this batch or compute them from shared [N, 2] positions."
            )
        return SpatialNeighbours(
            self.src_idx.expand(batch_size, -1),
            self.dst_idx.expand(batch_size, -1),
            self.neighbours.expand(batch_size, -1, -1),
            self.distances.expand(batch_size, -1, -1),
        )


def _as_batched_positions(positions: Tensor, batch_size: int | None) -> Tensor:
    if not isinstance(positions, Tensor) or positions.dim() not in (2, 3) or positions.shape[-1] != 2:
        shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(f"positions has shape {shape}; expected [N, 2] or [B, N, 2] (x, y in µm or token units).")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if batch_size is not None and positions.shape[0] not in (1, batch_size):
        raise ValueError(f"positions has batch size {positions.shape[0]} but the tokens have {batch_size}.")
    return positions


def _knn_cell_list(
    src_pos: Tensor, src_valid: Tensor, dst_pos: Tensor, dst_valid: Tensor, k: int, radius: float | None
) -> tuple[Tensor, Tensor]:
    """Exact k nearest valid destinations of every valid source, per batch element.

    Returns ``(index [B, Ns, k] into the destination set, distance [B, Ns, k])``, with distance
    ``inf`` (and index 0) where fewer than k destinations exist (within ``radius``). Never builds
    a source x destination matrix: see the module docstring.
    """
    b, ns, _ = src_pos.shape
    nd = dst_pos.shape[1]
    dev = src_pos.device
    out_idx = torch.zeros(b * ns, k, dtype=torch.long, device=dev)
    out_dist = torch.full((b * ns, k), math.inf, dtype=torch.float64, device=dev)
    if ns == 0 or nd == 0 or not bool(dst_valid.any()):
        return out_idx.view(b, ns, k), out_dist.view(b, ns, k)

    sp, dp = src_pos.double(), dst_pos.double()
    both_valid = torch.cat([src_valid, dst_valid], 1)[..., None]
    both = torch.cat([sp, dp], 1)
    lo = torch.where(both_valid, both, math.inf).amin(1)  # [B, 2]
    hi = torch.where(both_valid, both, -math.inf).amax(1)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    ext = (hi - lo).clamp_min(0.0)
    n_dst = dst_valid.sum(1).clamp_min(1).double()
    kk = float(min(k, nd))
    # Cell side: about kk destinations per cell; never so small that a thin (1-D-like) point set
    # makes more than ~3 * n_dst / kk cells.
    side = torch.sqrt(ext[:, 0] * ext[:, 1] * kk / n_dst)
    side = torch.maximum(side, ext.amax(-1) * kk / n_dst)
    side = torch.where(side > 0, side, torch.ones_like(side))
    ncell = (ext / side[:, None]).floor().long() + 1  # [B, 2] cells along x, y
    cells = ncell[:, 0] * ncell[:, 1]
    offset = torch.cumsum(cells, 0) - cells  # first cell id of each batch element
    sentinel = int(cells.sum())

    def cell_of(p: Tensor) -> Tensor:
        c = ((p - lo[:, None]) / side[:, None, None]).floor().long().clamp_min(0)
        return torch.minimum(c, ncell[:, None] - 1)

    dcell = cell_of(dp)
    dst_id = offset[:, None] + dcell[..., 1] * ncell[:, 0, None] + dcell[..., 0]
    dst_id = torch.where(dst_valid, dst_id, torch.full_like(dst_id, sentinel)).reshape(-1)
    sorted_id, order = torch.sort(dst_id, stable=True)
    dp_flat = dp.reshape(-1, 2)

    sp_flat = sp.reshape(-1, 2)
    scell = cell_of(sp).reshape(-1, 2)
    src_batch = torch.arange(b, device=dev).repeat_interleave(ns)
    pending = torch.nonzero(src_valid.reshape(-1)).squeeze(1)
    ring = 1
    while pending.numel() > 0:
        bb = src_batch[pending]
        cx, cy = scell[pending, 0], scell[pending, 1]
        ncx, ncy = ncell[bb, 0], ncell[bb, 1]
        rows = cy[:, None] + torch.arange(-ring, ring + 1, device=dev)  # [M, 2R+1]
        row_ok = (rows >= 0) & (rows < ncy[:, None])
        row_base = offset[bb, None] + rows.clamp_min(0) * ncx[:, None]
        x0 = (cx - ring).clamp_min(0)
        x1 = torch.minimum(cx + ring, ncx - 1)
        start = torch.searchsorted(sorted_id, (row_base + x0[:, None]).contiguous())
        end = torch.searchsorted(sorted_id, (row_base + x1[:, None]).contiguous(), right=True)
        end = torch.where(row_ok, end, start)
        longest = max(int((end - start).max()), 1)
        span = torch.arange(longest, device=dev)
        chunk = max(1, _KNN_CHUNK_ELEMENTS // (rows.shape[1] * longest))
        for c0 in range(0, pending.numel(), chunk):
            sl = slice(c0, c0 + chunk)
            cand = start[sl, :, None] + span  # [m, 2R+1, L] positions in the sorted order
            ok = cand < end[sl, :, None]
            flat = order[cand.clamp_max(order.numel() - 1)].reshape(cand.shape[0], -1)
            dist = (dp_flat[flat] - sp_flat[pending[sl], None, :]).square().sum(-1).sqrt()
            dist = dist.masked_fill(~ok.reshape(flat.shape), math.inf)
            if radius is not None:
                dist = dist.masked_fill(dist > radius, math.inf)
            if dist.shape[1] < k:
                pad = k - dist.shape[1]
                dist = torch.cat([dist, dist.new_full((dist.shape[0], pad), math.inf)], 1)
                flat = torch.cat([flat, flat.new_zeros((flat.shape[0], pad))], 1)
            # a stable sort, not topk: grid positions tie on distance everywhere, and topk breaks ties one way
            # on the CPU and another on CUDA (other neighbours, other merges); the stable sort keeps the
            # candidates' order (sorted cell ids), the same on every device
            best, arg = torch.sort(dist, dim=1, stable=True)
            best, arg = best[:, :k], arg[:, :k]
            idx = flat.gather(1, arg) - bb[sl, None] * nd
            out_dist[pending[sl]] = best
            out_idx[pending[sl]] = torch.where(torch.isfinite(best), idx, torch.zeros_like(idx))
        # A source is done when no destination outside the searched block can be nearer than its
        # k-th neighbour (or than `radius`); block sides that reach the grid edge hide nothing.
        need = out_dist[pending, k - 1]
        if radius is not None:
            need = need.clamp_max(radius)
        p = sp_flat[pending]
        lo_b, side_b = lo[bb], side[bb]
        left = torch.where(cx - ring > 0, p[:, 0] - (lo_b[:, 0] + (cx - ring) * side_b), math.inf)
        right = torch.where(cx + ring < ncx - 1, lo_b[:, 0] + (cx + ring + 1) * side_b - p[:, 0], math.inf)
        below = torch.where(cy - ring > 0, p[:, 1] - (lo_b[:, 1] + (cy - ring) * side_b), math.inf)
        above = torch.where(cy + ring < ncy - 1, lo_b[:, 1] + (cy + ring + 1) * side_b - p[:, 1], math.inf)
        margin = torch.minimum(torch.minimum(left, right), torch.minimum(below, above))
        pending = pending[~(need <= margin)]
        ring *= 2
    return out_idx.view(b, ns, k), out_dist.view(b, ns, k)


def spatial_neighbours(
    positions: Tensor,
    *,
    k: int = 8,
    radius: float | None = None,
    attention_mask: Tensor | None = None,
    dst_mask: Tensor | None = None,
) -> SpatialNeighbours:
    """Split tokens into sources and destinations and find each source's k nearest destinations.

    Args:
        positions: ``[N, 2]`` (shared by the batch) or ``[B, N, 2]`` token positions (µm for
            tissue tokens, token units for image grids).
        k: neighbours per source; a source may only merge into one of these.
        radius: optional cut-off in the units of ``positions``; farther destinations never qualify.
        attention_mask: ``[B, N]`` bool, False = padding (never a neighbour of a real token).
        dst_mask: ``[N]`` or ``[B, N]`` bool, True = destination; default
            :func:`interleaved_destination_mask`. Every batch element needs the same count.
    """
    if int(k) < 1:
        raise ValueError(f"k={k}; a source needs at least one candidate destination (k >= 1).")
    if radius is not None and not float(radius) > 0:
        raise ValueError(f"radius={radius}; give a positive distance in the units of positions, or None.")
    batch = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, N] bool.")
        batch = attention_mask.shape[0]
    if dst_mask is not None and dst_mask.dim() == 2:
        batch = dst_mask.shape[0] if batch is None else batch
    pos = _as_batched_positions(positions, batch)
    n = pos.shape[1]
    batch = batch or pos.shape[0]
    if attention_mask is not None:
        if attention_mask.shape[1] != n:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} tokens but positions have {n}.")
        valid = attention_mask.to(torch.bool)
    else:
        valid = torch.ones(1, n, dtype=torch.bool, device=pos.device)
    bad = valid & ~torch.isfinite(pos).all(-1)
    if bool(bad.any()):
        first = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"positions[{first[0]}, {first[1]}] is not finite for a real token; give finite x, y in µm "
            "or mark the token as padding in attention_mask."
        )
    shared = pos.shape[0] == 1 and valid.shape[0] == 1 and (dst_mask is None or dst_mask.dim() == 1)
    if not shared:
        pos = pos.expand(batch, -1, -1)
        valid = valid.expand(batch, -1)
    if dst_mask is None:
        dst = interleaved_destination_mask(pos, valid)
    else:
        if dst_mask.shape[-1] != n or dst_mask.dtype != torch.bool:
            raise ValueError(f"dst_mask has shape {tuple(dst_mask.shape)}, dtype {dst_mask.dtype}; expected bool [N] or [B, N], N={n}.")
        dst = dst_mask.to(pos.device).expand(pos.shape[0], -1) if dst_mask.dim() == 1 else dst_mask.to(pos.device)
    counts = dst.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"dst_mask selects {counts.tolist()} destinations per batch element; every element needs the same number.")
    if int(counts[0]) in (0, n):
        raise ValueError(f"dst_mask selects {int(counts[0])} of {n} tokens; both sources and destinations must be non-empty.")
    split = torch.argsort(dst.to(torch.int8), dim=1, stable=True)  # sources first, each in token order
    nd = int(counts[0])
    src_idx, dst_idx = split[:, : n - nd], split[:, n - nd :]
    gather2 = lambda t, i: t.gather(1, i[..., None].expand(-1, -1, 2))  # noqa: E731
    idx, dist = _knn_cell_list(
        gather2(pos, src_idx), valid.gather(1, src_idx), gather2(pos, dst_idx), valid.gather(1, dst_idx), int(k), radius
    )
    return SpatialNeighbours(src_idx, dst_idx, idx, dist.to(torch.float32))


# --------------------------------------------------------------------------------------------
# One merge step
# --------------------------------------------------------------------------------------------


@dataclass
class MergeInfo:
    """One bipartite merge step: which tokens were merged into which (batch-wise index tensors).

    ``dest[b, i]`` is the slot of input token ``i`` in the merged sequence of length
    ``num_out = N - r``. Surviving tokens keep their relative order; a merged source shares its
    destination's slot.

    Attributes:
        dest: ``[B, N]`` long, slot of every input token.
        num_out: ``N - r``.
        sizes: ``[B, N]`` weights of ``merge(mode="mean")`` (token sizes); None = all ones.
        src_tokens: ``[B, r]`` input index of every merged source (None for identity).
        dst_tokens: ``[B, r]`` input index of the destination each source merged into.
    """

    dest: Tensor
    num_out: int
    sizes: Tensor | None = None
    src_tokens: Tensor | None = None
    dst_tokens: Tensor | None = None
    _flat: Tensor | None = field(default=None, init=False, repr=False)
    _weight_sum: Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def identity(cls, batch_size: int, num_tokens: int, device=None, sizes: Tensor | None = None) -> MergeInfo:
        """A step that merges nothing (r = 0)."""
        dest = torch.arange(num_tokens, device=device).expand(batch_size, -1)
        return cls(dest=dest, num_out=num_tokens, sizes=sizes)

    @property
    def batch_size(self) -> int:
        return int(self.dest.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens before the merge (N)."""
        return int(self.dest.shape[1])

    @property
    def r(self) -> int:
        """Tokens removed by the merge."""
        return self.num_tokens - self.num_out

    @property
    def is_identity(self) -> bool:
        return self.r == 0

    def _flat_dest(self) -> Tensor:
        if self._flat is None:
            shift = torch.arange(self.batch_size, device=self.dest.device)[:, None] * self.num_out
            self._flat = (self.dest + shift).reshape(-1)
        return self._flat

    def _check(self, x: Tensor, n: int, name: str) -> None:
        if x.dim() < 2 or x.shape[0] != self.batch_size or x.shape[1] != n:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected [B={self.batch_size}, N={n}, ...] "
                "(the tokens this MergeInfo was computed for)."
            )

    def _scatter(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """Sum tokens (times ``weights [B, N]`` when given) into their slots: ``[B, N, *] -> [B, N - r, *]``.
        Weighted sums run a chunk of rows at a time, so the weighted copy of ``x`` is never whole
        (same values: ``index_add_`` accumulates rows in order either way)."""
        b, n = x.shape[:2]
        flat = x.reshape(b * n, -1)
        dest = self._flat_dest().to(x.device)
        out = flat.new_zeros(b * self.num_out, flat.shape[1])
        if weights is None:
            out.index_add_(0, dest, flat)
        else:
            w = weights.reshape(b * n, 1)
            step = _row_chunk(flat)
            for c0 in range(0, b * n, step):
                rows = slice(c0, c0 + step)
                out.index_add_(0, dest[rows], flat[rows] * w[rows])
        return out.view(b, self.num_out, *x.shape[2:])

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """``[B, N, C] -> [B, N - r, C]``; "mean" is size-weighted by the sizes given at matching, "sum" adds."""
        self._check(x, self.num_tokens, "x")
        if mode not in ("mean", "sum"):
            raise ValueError(f"mode={mode!r}; use 'mean' (size-weighted) or 'sum'.")
        if self.is_identity:
            return x
        if mode == "sum":
            return self._scatter(x)
        b, n = x.shape[:2]
        if self._weight_sum is None:
            ones = torch.ones(b, n, 1, device=self.dest.device)
            w = ones if self.sizes is None else self.sizes.to(self.dest.device, torch.float32)[..., None]
            self._weight_sum = self._scatter(w).clamp_min(torch.finfo(torch.float32).tiny)
        denom = self._weight_sum.to(device=x.device, dtype=x.dtype)
        weights = None if self.sizes is None else self.sizes.to(device=x.device, dtype=x.dtype)
        return self._scatter(x, weights).div_(denom.view(b, self.num_out, *([1] * (x.dim() - 2))))

    def merge_sizes(self, sizes: Tensor) -> Tensor:
        """``[B, N] -> [B, N - r]``: the size of a merged token is the sum of its members' sizes."""
        self._check(sizes, self.num_tokens, "sizes")
        return sizes if self.is_identity else self._scatter(sizes)

    def merge_mask(self, mask: Tensor) -> Tensor:
        """``[B, N]`` bool -> ``[B, N - r]``: padding merges only into padding, so padding stays padding."""
        self._check(mask, self.num_tokens, "mask")
        if self.is_identity:
            return mask
        return self._scatter(mask.to(torch.float32)) > 0

    def unmerge(self, x: Tensor) -> Tensor:
        """``[B, N - r, C] -> [B, N, C]``: each token gets the value of the slot it was merged into."""
        self._check(x, self.num_out, "x")
        if self.is_identity:
            return x
        b = x.shape[0]
        flat = x.reshape(b * self.num_out, -1).index_select(0, self._flat_dest().to(x.device))
        return flat.view(b, self.num_tokens, *x.shape[2:])


def _row_chunk(x: Tensor) -> int:
    """Rows per chunk for row-wise loops over ``x [rows, C]``: ``_ROW_CHUNK`` on the CPU (bounded scratch),
    about ``_ACCELERATOR_CHUNK_ELEMENTS / C`` elsewhere (few launches; values are the same either way)."""
    if x.device.type == "cpu":
        return _ROW_CHUNK
    return max(_ROW_CHUNK, _ACCELERATOR_CHUNK_ELEMENTS // max(int(x.shape[-1]), 1))


def _unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (near-zero rows stay near zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def spatial_bipartite_matching(
    metric: Tensor,
    positions: Tensor | None,
    r: int,
    *,
    k: int = 8,
    radius: float | None = None,
    sizes: Tensor | None = None,
    attention_mask: Tensor | None = None,
    dst_mask: Tensor | None = None,
    neighbours: SpatialNeighbours | None = None,
) -> MergeInfo:
    """ToMe-style bipartite soft matching restricted to spatial neighbours.

    Tokens are split into sources and destinations (spatially interleaved, or ``dst_mask``), each
    source may only merge into one of its k nearest destinations (optionally within ``radius``
    µm), similarity = cosine of ``metric`` (the attention keys, averaged over heads), and the r
    most similar (source, destination) pairs merge. Padded tokens (``attention_mask`` False) never
    merge with real tokens (they merge into padding first). ``r`` is capped at the number of
    sources that have a candidate in every batch element (read the result's ``r``). r = 0 returns
    an identity MergeInfo (merge/unmerge are no-ops), so merge ratio 0 gives exactly the
    unmerged model.

    Args:
        metric: ``[B, N, C]`` features compared by cosine similarity (no gradient flows through
            the matching; gradients flow through ``MergeInfo.merge``).
        positions: ``[N, 2]`` or ``[B, N, 2]``; may be None when ``neighbours`` is given.
        r: tokens to remove (see :func:`merge_count`).
        k, radius, attention_mask, dst_mask: see :func:`spatial_neighbours`.
        sizes: ``[B, N]`` current token sizes, the weights of ``merge(mode="mean")``.
        neighbours: precomputed :func:`spatial_neighbours` for these positions (skips the search).
    """
    if not isinstance(metric, Tensor) or metric.dim() != 3:
        shape = tuple(metric.shape) if isinstance(metric, Tensor) else type(metric).__name__
        raise ValueError(f"metric has shape {shape}; expected [B, N, C] (e.g. keys averaged over heads).")
    b, n, c = metric.shape
    if isinstance(r, bool) or int(r) != r or r < 0:
        raise ValueError(f"r={r}; give a whole number of tokens to merge, >= 0 (see merge_count).")
    r = int(r)
    if sizes is not None and (sizes.shape != (b, n)):
        raise ValueError(f"sizes has shape {tuple(sizes.shape)}; expected [B, N] = [{b}, {n}].")
    if attention_mask is not None and attention_mask.shape != (b, n):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, N] = [{b}, {n}].")
    if r == 0 or n < 2:
        return MergeInfo.identity(b, n, metric.device, sizes)
    if neighbours is None:
        if positions is None:
            raise ValueError("positions is None; give token positions [N, 2] or [B, N, 2], or precomputed neighbours.")
        neighbours = spatial_neighbours(positions, k=k, radius=radius, attention_mask=attention_mask, dst_mask=dst_mask)
    nb = neighbours.expand(b)
    src_idx, dst_idx = nb.src_idx.to(metric.device), nb.dst_idx.to(metric.device)
    if src_idx.shape[1] + dst_idx.shape[1] != n:
        raise ValueError(f"neighbours cover {src_idx.shape[1] + dst_idx.shape[1]} tokens but metric has {n}.")
    ns, kk = src_idx.shape[1], nb.k

    with torch.no_grad():
        flat = metric.reshape(b * n, c)
        shift = torch.arange(b, device=metric.device)[:, None] * n
        cand_tok = dst_idx.gather(1, nb.neighbours.to(metric.device).reshape(b, -1)).view(b, ns, kk)
        src_flat = (src_idx + shift).reshape(-1)
        cand_flat = (cand_tok + shift[..., None]).reshape(b * ns, kk)
        scores = torch.empty(b * ns, kk, device=metric.device, dtype=torch.float32)
        # Cosine on gathered rows, a chunk of sources at a time: never a normalised [B, N, C]
        # copy of the metric (each row is normalised exactly as a whole-tensor division would).
        step = _row_chunk(flat)
        for c0 in range(0, b * ns, step):
            rows = slice(c0, c0 + step)
            src_vec = _unit_rows(flat.index_select(0, src_flat[rows]))
            for j in range(kk):  # k is small: one [rows, C] product per neighbour rank
                dst_vec = _unit_rows(flat.index_select(0, cand_flat[rows, j]))
                scores[rows, j] = (src_vec * dst_vec).sum(-1).float()
        scores = scores.view(b, ns, kk)
        scores.masked_fill_(~nb.valid.to(metric.device), -math.inf)
        best, arg = scores.max(dim=-1)
        best_dst = cand_tok.gather(2, arg[..., None]).squeeze(-1)  # [B, Ns] token index
        if attention_mask is not None:
            mask = attention_mask.to(device=metric.device, dtype=torch.bool)
            src_pad = ~mask.gather(1, src_idx)
            dst_pad = ~mask.gather(1, dst_idx)
            first_pad = dst_idx.gather(1, dst_pad.to(torch.int8).argmax(1, keepdim=True))
            pad_pair = src_pad & dst_pad.any(1, keepdim=True)
            best = torch.where(pad_pair, torch.full_like(best, _PADDING_PRIORITY), best)
            best = torch.where(src_pad & ~pad_pair, torch.full_like(best, -math.inf), best)
            best_dst = torch.where(pad_pair, first_pad.expand_as(best_dst), best_dst)
        r = min(r, int(torch.isfinite(best).sum(1).min()))
        if r == 0:
            return MergeInfo.identity(b, n, metric.device, sizes)
        chosen = torch.argsort(best, dim=1, descending=True, stable=True)[:, :r]
        src_tok = src_idx.gather(1, chosen)
        dst_tok = best_dst.gather(1, chosen)
        removed = torch.zeros(b, n, dtype=torch.bool, device=metric.device).scatter_(1, src_tok, True)
        slot = (~removed).long().cumsum(1) - 1
        dest = slot.scatter(1, src_tok, slot.gather(1, dst_tok))
    return MergeInfo(dest=dest, num_out=n - r, sizes=sizes, src_tokens=src_tok, dst_tokens=dst_tok)


# --------------------------------------------------------------------------------------------
# Composition over layers, and proportional attention
# --------------------------------------------------------------------------------------------


class MergeTracker:
    """Composes the MergeInfo of successive layers: ``tracker.push(info)``, ``tracker.unmerge_all(x)``
    maps final tokens back to every original token; keeps the running ``sizes`` and (size-weighted)
    ``positions``.

    Typical use in a transformer::

        tracker = MergeTracker(positions=pos_um, attention_mask=mask)   # pos [B, N, 2] or [N, 2]
        for layer in layers:
            info = spatial_bipartite_matching(keys.mean(1), tracker.positions, r,
                                              sizes=tracker.sizes, attention_mask=tracker.attention_mask)
            x = info.merge(x); tracker.push(info)
            x = layer(x, attn_bias=proportional_attention_bias(tracker.sizes, tracker.attention_mask))
        per_token = tracker.unmerge_all(x)                               # [B, N, C]

    Attributes:
        origin: ``[B, N0]`` current slot of every original token.
        sizes: ``[B, N]`` float, original tokens per current token (padding counts too).
        positions: ``[B, N, 2]`` size-weighted mean position per current token, or None.
        attention_mask: ``[B, N]`` bool (padding stays padding), or None.
    """

    def __init__(
        self,
        positions: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        sizes: Tensor | None = None,
        batch_size: int | None = None,
        num_tokens: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shapes = []
        if positions is not None:
            positions = _as_batched_positions(positions, None)
            shapes.append(("positions", positions.shape[0], positions.shape[1]))
        for name, t in (("attention_mask", attention_mask), ("sizes", sizes)):
            if t is not None:
                if t.dim() != 2:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, N].")
                shapes.append((name, t.shape[0], t.shape[1]))
        if batch_size is not None:
            shapes.append(("batch_size", int(batch_size), None))
        if num_tokens is not None:
            shapes.append(("num_tokens", None, int(num_tokens)))
        bs = max([s[1] for s in shapes if s[1] is not None], default=None)
        nt = next((s[2] for s in shapes if s[2] is not None), None)
        if bs is None or nt is None:
            raise ValueError("MergeTracker needs the token layout: give positions, attention_mask, sizes or batch_size + num_tokens.")
        for name, sb, sn in shapes:
            if (sb is not None and sb not in (1, bs)) or (sn is not None and sn != nt):
                raise ValueError(f"{name} implies batch {sb}, tokens {sn}; the other inputs imply batch {bs}, tokens {nt}.")
        ref = next((t for t in (positions, attention_mask, sizes) if t is not None), None)
        device = ref.device if ref is not None else device
        self.origin = torch.arange(nt, device=device).expand(bs, -1)
        self.sizes = (
            torch.ones(bs, nt, device=device) if sizes is None else sizes.to(torch.float32).expand(bs, -1)
        )
        self.positions = None if positions is None else positions.expand(bs, -1, -1)
        self.attention_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        self.steps = 0

    @property
    def num_tokens(self) -> int:
        """Current number of tokens."""
        return int(self.sizes.shape[1])

    @property
    def original_num_tokens(self) -> int:
        return int(self.origin.shape[1])

    def push(self, info: MergeInfo) -> None:
        """Record one merge step computed on the current tokens."""
        if info.dest.shape != (self.origin.shape[0], self.num_tokens):
            raise ValueError(
                f"MergeInfo is for tokens [{info.batch_size}, {info.num_tokens}] but the tracker holds "
                f"[{self.origin.shape[0]}, {self.num_tokens}]; push each step once, in order."
            )
        self.steps += 1
        if info.is_identity:
            return
        if self.positions is not None:
            finite = torch.nan_to_num(self.positions.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
            weighted = info.merge(finite * self.sizes[..., None], mode="sum")
        new_sizes = info.merge_sizes(self.sizes)
        if self.positions is not None:
            self.positions = weighted / new_sizes.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        if self.attention_mask is not None:
            self.attention_mask = info.merge_mask(self.attention_mask)
        self.origin = info.dest.to(self.origin.device).gather(1, self.origin)
        self.sizes = new_sizes

    def unmerge_all(self, x: Tensor) -> Tensor:
        """``[B, N_now, *] -> [B, N0, *]``: every original token gets the value of the token it ended in."""
        b, n0 = self.origin.shape
        if x.dim() < 2 or x.shape[0] != b or x.shape[1] != self.num_tokens:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B={b}, N={self.num_tokens}, ...].")
        if self.num_tokens == n0:  # merges only ever remove tokens: nothing was merged
            return x
        idx = (self.origin.to(x.device) + torch.arange(b, device=x.device)[:, None] * self.num_tokens).reshape(-1)
        return x.reshape(b * self.num_tokens, -1).index_select(0, idx).view(b, n0, *x.shape[2:])

    def merge_all(self, x: Tensor) -> Tensor:
        """``[B, N0, *] -> [B, N_now, *]``: mean of each current token's original members (e.g. labels)."""
        b, n0 = self.origin.shape
        if x.dim() < 2 or x.shape[0] != b or x.shape[1] != n0:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B={b}, N0={n0}, ...].")
        info = MergeInfo(dest=self.origin, num_out=self.num_tokens)
        return info.merge(x, mode="mean") if self.num_tokens != n0 else x


def proportional_attention_bias(
    sizes: Tensor, attention_mask: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """``[B, N] -> [B, 1, 1, N]`` additive SDPA mask: ``log(size)`` per key (ToMe's proportional
    attention), ``-inf`` on padding, so a merged token of size s gets the attention its s members would."""
    if sizes.dim() != 2:
        raise ValueError(f"sizes has shape {tuple(sizes.shape)}; expected [B, N].")
    bias = sizes.to(dtype or (sizes.dtype if sizes.is_floating_point() else torch.float32)).log()
    if attention_mask is not None:
        if attention_mask.shape != sizes.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(sizes.shape)} like sizes.")
        bias = bias.masked_fill(~attention_mask.to(torch.bool), -math.inf)
    return bias[:, None, None, :]
