"""Data collators: dataset rows -> SPATIA model inputs, for every pretraining and fine-tuning task.

All of them sit on :class:`~spatia_hf.models.processing_spatia.SpatiaProcessor` (gene-panel mapping,
library-size log1p normalisation, gene-token selection, image normalisation) and add what a task
needs:

- :class:`CellCollator`: a batch of cells (``pixel_values [B, C, H, W]``, gene tokens ``[B, L]``),
  optional labels, optional masks for masked gene / masked image modelling.
- :class:`NicheCollator`: variable-size niches: member cells with a leading cell dimension
  (``[B, N, ...]``), ``cell_positions [B, N, 2]`` (µm from the niche centre) and
  ``cell_attention_mask [B, N]`` (0 on padding cells), optional masked-cell masks.
- :class:`ImputationCollator`: hides a fraction of each cell's gene tokens; they become
  ``target_gene_ids`` / ``labels``.
- :class:`ExpressionTargetCollator`: image in, every panel gene's log1p value as ``labels``.
- :class:`TissueCollator`: sections as niche embeddings ``[B, M, D]`` with µm positions and a padding
  mask, for section-level classification.

Randomness (sampled zero genes, masks, tissue windows) is drawn from a generator seeded by
``(seed, epoch, example key)``, never from the global RNG: a batch is then the same whatever the
DataLoader workers, the number of processes, or an interruption and ``resume_from_checkpoint``
(set ``collator.epoch`` each epoch, which :class:`~spatia_hf.training.trainer.EpochSeedCallback` does).

Collators take a list of rows (dicts) or columns (a dict of sequences, as
:class:`~spatia_hf.data.datasets.ArrowRows` returns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..models.configuration_spatia import PAD_TOKEN_ID
from spatia_hf.data import schema
from ..models.processing_spatia import SpatiaProcessor

from .datasets import example_key

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- helpers
def as_columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """A list of row dicts or a dict of columns -> a dict of columns."""
    if isinstance(rows, Mapping):
        return dict(rows)
    rows = list(rows)
    if not rows:
        raise ValueError("empty batch: nothing to collate")
    return {k: [r[k] for r in rows] for k in rows[0].keys()}


def _require(cols: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in cols]
    if missing:
        raise ValueError(f"{what}: rows lack column(s) {missing} (have {sorted(cols)}). Fix: pass rows of the "
                         f"dataset's cells config with these columns (spatia_hf.data.schema)")


def example_rngs(seed: int, epoch: int, keys: Sequence[int]) -> list[np.random.Generator]:
    """One generator per example, seeded by (seed, epoch, key)."""
    return [np.random.default_rng([int(seed), int(epoch), int(k)]) for k in keys]


def cell_keys(cols: Mapping[str, Any]) -> list[int]:
    """Stable per-cell keys from ``sample_id`` and ``cell_id`` (falls back to row order)."""
    if schema.CELL_ID in cols and schema.SAMPLE_ID in cols:
        return [example_key(s, c) for s, c in zip(cols[schema.SAMPLE_ID], cols[schema.CELL_ID])]
    if schema.CELL_ID in cols:
        return [example_key(c) for c in cols[schema.CELL_ID]]
    n = len(next(iter(cols.values())))
    return list(range(n))


def distinct_cell_ids(cols: Mapping[str, Any]) -> np.ndarray:
    """``0..U-1`` per row, equal for rows of the same ``(sample_id, cell_id)`` (exact, no hashing);
    rows without a cell id are all distinct."""
    n = len(next(iter(cols.values())))
    if schema.CELL_ID not in cols:
        return np.arange(n, dtype=np.int64)
    samples = cols[schema.SAMPLE_ID] if schema.SAMPLE_ID in cols else [""] * n
    seen: dict[tuple, int] = {}
    return np.asarray([seen.setdefault((str(s), str(c)), len(seen)) for s, c in zip(samples, cols[schema.CELL_ID])],
                      dtype=np.int64)


def token_mask_from_noise(noise: np.ndarray, real: np.ndarray, ratio: float, min_keep: int = 1) -> np.ndarray:
    """Hide ``round(ratio * n_real)`` real tokens per row (at least one when a row has more than
    ``min_keep``, never below ``min_keep`` visible): the ones with the smallest noise."""
    noise = np.where(real, noise, 2.0)
    ranks = noise.argsort(axis=1, kind="stable").argsort(axis=1, kind="stable")
    n_real = real.sum(axis=1, keepdims=True)
    n_mask = np.rint(n_real * ratio).astype(np.int64)
    n_mask = np.where(n_real > min_keep, np.maximum(n_mask, 1), 0)
    n_mask = np.minimum(n_mask, np.maximum(n_real - min_keep, 0))
    return (ranks < n_mask) & real


def gene_value_mask(attention_mask: np.ndarray, ratio: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Masked gene modelling: ``[B, L]`` bool, ``ratio`` of each cell's real gene tokens hidden."""
    noise = np.stack([r.random(attention_mask.shape[1]) for r in rngs]) if len(rngs) else np.zeros((0, 0))
    return token_mask_from_noise(noise, attention_mask.astype(bool), ratio)


def image_patch_mask(num_patches: int, ratio: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Masked image modelling (MAE): ``[B, P]`` bool with exactly ``round(ratio * P)`` hidden patches
    per row (MAE needs equal counts), at least one visible."""
    n_mask = min(max(int(round(ratio * num_patches)), 0), num_patches - 1)
    out = np.zeros((len(rngs), num_patches), dtype=bool)
    for i, r in enumerate(rngs):
        out[i, r.permutation(num_patches)[:n_mask]] = True
    return out


def encode_expression(processor: SpatiaProcessor, gene_indices: Sequence, gene_counts: Sequence,
                      rngs: Sequence[np.random.Generator]) -> list[dict[str, Any]]:
    """Per-cell token arrays from the processor (zeros sampled with each cell's own generator), unpadded."""
    return [processor.encode_cell(i, c, rng) for i, c, rng in zip(gene_indices, gene_counts, rngs)]


def pad_tokens(cells: Sequence[dict], length: int | None = None) -> dict[str, np.ndarray]:
    """Pad per-cell token arrays to ``[B, L]`` (``gene_ids`` 0 on padding)."""
    length = max([len(c["gene_ids"]) for c in cells] + [1]) if length is None else length
    b = len(cells)
    ids = np.full((b, length), PAD_TOKEN_ID, dtype=np.int64)
    values = np.zeros((b, length), dtype=np.float32)
    counts = np.zeros((b, length), dtype=np.float32)
    for r, c in enumerate(cells):
        n = len(c["gene_ids"])
        ids[r, :n], values[r, :n], counts[r, :n] = c["gene_ids"], c["gene_values"], c["gene_counts"]
    return {
        "gene_ids": ids,
        "gene_values": values,
        "gene_counts": counts,
        "gene_attention_mask": (ids != PAD_TOKEN_ID).astype(np.int64),
        "size_factors": np.asarray([c["size_factor"] for c in cells], dtype=np.float32),
    }


def encode_labels(values: Sequence[Any], label2id: Mapping[str, int], column: str) -> np.ndarray:
    """String labels -> ids; missing labels (None / empty) -> -100 (ignored by the loss)."""
    out = np.full(len(values), IGNORE_INDEX, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "":
            continue
        key = str(v)
        if key not in label2id:
            raise ValueError(f"{column}: label {key!r} is not among the model's labels {sorted(label2id)}. Fix: "
                             "fine-tune with a label2id that covers every class of the dataset")
        out[i] = label2id[key]
    return out


def _tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


# ----------------------------------------------------------------------------- cells
@dataclass
class CellCollator:
    """Rows of the ``cells`` config -> cell inputs of the SPATIA models.

    Args:
        processor: a :class:`SpatiaProcessor` with the dataset panel mapped (``map_panel``).
        seed: seeds every per-cell draw together with ``epoch`` and the cell's key.
        use_images / use_expression: which modalities to emit.
        label_column / label2id: emit ``labels [B]`` (class ids) from this column.
        gene_mask_ratio: emit ``gene_value_mask [B, L]`` for masked gene modelling (None: none).
        image_mask_ratio / num_patches: emit ``image_patch_mask [B, P]`` for masked image modelling.
        with_counts: emit ``gene_counts`` and ``size_factors`` (NB/ZINB likelihoods).
    """

    processor: SpatiaProcessor
    seed: int = 0
    use_images: bool = True
    use_expression: bool = True
    label_column: str | None = None
    label2id: dict[str, int] | None = None
    gene_mask_ratio: float | None = None
    image_mask_ratio: float | None = None
    num_patches: int | None = None
    with_counts: bool = True
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.image_mask_ratio is not None and not self.num_patches:
            raise ValueError("image_mask_ratio needs num_patches (the model's (image_size / patch_size) ** 2)")
        if self.label_column is not None and not self.label2id:
            raise ValueError(f"label_column={self.label_column!r} needs label2id")

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        cols = as_columns(rows)
        rngs = example_rngs(self.seed, self.epoch, cell_keys(cols))
        return _tensors(self.encode(cols, rngs))

    def encode(self, cols: Mapping[str, Any], rngs: Sequence[np.random.Generator]) -> dict[str, np.ndarray]:
        """Numpy inputs of a batch of cells (shared by the niche collator)."""
        out: dict[str, Any] = {}
        if self.use_images:
            _require(cols, [schema.IMAGE], "images")
            out["pixel_values"] = self.processor.preprocess_images(_stack_images(cols[schema.IMAGE])).numpy()
            if self.image_mask_ratio is not None:
                out["image_patch_mask"] = image_patch_mask(self.num_patches, self.image_mask_ratio, rngs)
        if self.use_expression:
            _require(cols, [schema.GENE_INDICES, schema.GENE_COUNTS], "expression")
            tokens = pad_tokens(encode_expression(self.processor, cols[schema.GENE_INDICES],
                                                  cols[schema.GENE_COUNTS], rngs))
            if not self.with_counts:
                tokens.pop("gene_counts")
                tokens.pop("size_factors")
            out.update(tokens)
            if self.gene_mask_ratio is not None:
                out["gene_value_mask"] = gene_value_mask(tokens["gene_attention_mask"], self.gene_mask_ratio, rngs)
        if self.label_column is not None:
            _require(cols, [self.label_column], "labels")
            out["labels"] = encode_labels(cols[self.label_column], self.label2id, self.label_column)
        return out


def _stack_images(images) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    return np.stack([np.asarray(x) for x in images])


# ----------------------------------------------------------------------------- niches
@dataclass
class NicheCollator:
    """Niche examples (:class:`~spatia_hf.data.datasets.NicheCellsDataset`) -> niche inputs.

    Member cells are encoded by ``cell_collator`` and laid out with a leading cell dimension:
    ``pixel_values [B, N, C, H, W]``, ``gene_ids/gene_values/gene_attention_mask [B, N, L]``,
    ``cell_positions [B, N, 2]`` (µm relative to the niche centre), ``cell_attention_mask [B, N]``
    (1 = real cell); ``N`` is the largest niche of the batch, ``L`` its longest cell. Cell-level
    masks (``gene_value_mask``, ``image_patch_mask``) are given per *real* cell, in order, as the
    model consumes them; ``niche_cell_mask [B, N]`` hides cells for masked-cell prediction when
    ``niche_mask_ratio`` is set; ``labels [B, N]`` (-100 on padding) when the cell collator has labels;
    with ``with_centres``, ``niche_centres_um [B, 2]`` (the niches' centres in section µm) and
    ``niche_groups [B]`` (an id per section), the tissue objective's inputs. With ``with_cell_uids``,
    ``cell_uids [B, N]``: one id per distinct cell of the batch (-1 on padding). Overlapping
    neighbourhoods share most of their cells; the pretraining model encodes each distinct cell once
    and scores its cell-level objectives once (a cell repeated in an InfoNCE batch is its own negative).
    """

    cell_collator: CellCollator
    niche_mask_ratio: float | None = None
    with_centres: bool = False
    with_cell_uids: bool = False
    epoch: int = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch: nothing to collate")
        self.cell_collator.epoch = self.epoch
        cc = self.cell_collator
        sizes = [len(e["cells"][schema.CELL_ID]) for e in examples]
        if min(sizes) < 1:
            raise ValueError("a niche without cells cannot be collated. Fix: drop empty niches from the dataset")
        cols: dict[str, list] = {}
        for e in examples:
            for k, v in e["cells"].items():
                cols.setdefault(k, []).extend(list(v))
        rngs = example_rngs(cc.seed, self.epoch, cell_keys(cols))
        flat = cc.encode(cols, rngs)
        b, n = len(examples), max(sizes)
        real = np.zeros((b, n), dtype=bool)
        for i, k in enumerate(sizes):
            real[i, :k] = True
        out: dict[str, Any] = {"cell_attention_mask": real.astype(np.int64)}
        pos = np.zeros((b, n, 2), dtype=np.float32)
        for i, e in enumerate(examples):
            niche = e["niche"]
            pos[i, : sizes[i], 0] = np.asarray(niche[schema.CELL_REL_X_UM], dtype=np.float32)
            pos[i, : sizes[i], 1] = np.asarray(niche[schema.CELL_REL_Y_UM], dtype=np.float32)
        out["cell_positions"] = pos
        if self.with_centres:
            out["niche_centres_um"] = np.asarray([[e["niche"][schema.X_UM], e["niche"][schema.Y_UM]] for e in examples],
                                                 dtype=np.float32)
            out["niche_groups"] = np.asarray([example_key(e["niche"][schema.SAMPLE_ID]) for e in examples],
                                             dtype=np.int64)
        where = np.flatnonzero(real.reshape(-1))
        if self.with_cell_uids:
            uids = np.full(b * n, -1, dtype=np.int64)
            uids[where] = distinct_cell_ids(cols)
            out["cell_uids"] = uids.reshape(b, n)
        for key, value in flat.items():
            if key in ("gene_value_mask", "image_patch_mask"):
                out[key] = value  # per real cell, as the model's flattened cell pass expects
                continue
            fill = IGNORE_INDEX if key == "labels" else 0
            padded = np.full((b * n, *value.shape[1:]), fill, dtype=value.dtype)
            padded[where] = value
            out[key] = padded.reshape(b, n, *value.shape[1:])
        if self.niche_mask_ratio is not None:
            niche_rngs = example_rngs(cc.seed, self.epoch,
                                      [example_key(e["niche"][schema.SAMPLE_ID], e["niche"][schema.NICHE_ID])
                                       for e in examples])
            noise = np.stack([r.random(n) for r in niche_rngs])
            out["niche_cell_mask"] = token_mask_from_noise(noise, real, self.niche_mask_ratio)
        return _tensors(out)


# ----------------------------------------------------------------------------- fine-tuning targets
@dataclass
class ImputationCollator:
    """Gene imputation: genes are removed from the input and become the targets
    ``target_gene_ids [B, K]``, ``target_attention_mask [B, K]``, ``labels [B, K]`` (log1p-normalised
    values, the processor's normalisation).

    Training (``holdout_gene_ids=None``): a random ``mask_ratio`` of each cell's gene tokens
    (expressed genes and sampled zeros) is hidden, so the model learns to impute any gene.
    Evaluation (``holdout_gene_ids`` = vocabulary ids): the same genes are hidden in every cell and
    predicted for every cell (zeros included), giving the dense cells x genes matrix per-gene
    correlations need.
    """

    processor: SpatiaProcessor
    mask_ratio: float = 0.3
    holdout_gene_ids: np.ndarray | None = None
    seed: int = 0
    use_images: bool = False
    epoch: int = 0

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        cols = as_columns(rows)
        _require(cols, [schema.GENE_INDICES, schema.GENE_COUNTS], "imputation")
        rngs = example_rngs(self.seed, self.epoch, cell_keys(cols))
        cells = encode_expression(self.processor, cols[schema.GENE_INDICES], cols[schema.GENE_COUNTS], rngs)
        if self.holdout_gene_ids is None:
            inputs, targets = self._random_targets(cells, rngs)
        else:
            inputs, targets = self._holdout_targets(cells, cols)
        x = pad_tokens(inputs)
        t = pad_tokens(targets)
        out = {
            "gene_ids": x["gene_ids"],
            "gene_values": x["gene_values"],
            "gene_attention_mask": x["gene_attention_mask"],
            "target_gene_ids": t["gene_ids"],
            "target_attention_mask": t["gene_attention_mask"],
            "labels": np.where(t["gene_attention_mask"] > 0, t["gene_values"], np.nan).astype(np.float32),
        }
        if self.use_images:
            _require(cols, [schema.IMAGE], "images")
            out["pixel_values"] = self.processor.preprocess_images(_stack_images(cols[schema.IMAGE])).numpy()
        return _tensors(out)

    def _random_targets(self, cells, rngs):
        inputs, targets = [], []
        for c, rng in zip(cells, rngs):
            m = len(c["gene_ids"])
            hide = token_mask_from_noise(rng.random((1, m)), np.ones((1, m), bool), self.mask_ratio)[0]
            inputs.append(_subset(c, ~hide))
            targets.append(_subset(c, hide))
        return inputs, targets

    def _holdout_targets(self, cells, cols):
        panel = self.processor._require_panel()
        held = np.asarray(self.holdout_gene_ids, dtype=np.int64)
        vocab_to_panel = {int(v): j for j, v in enumerate(panel.vocab_ids) if v >= 0}
        missing = [int(v) for v in held if int(v) not in vocab_to_panel]
        if missing:
            raise ValueError(f"holdout_gene_ids: vocabulary ids {missing[:5]} are not measured by the dataset panel. "
                             "Fix: hold out genes of the panel")
        held_panel = np.asarray([vocab_to_panel[int(v)] for v in held], dtype=np.int64)
        inputs, targets = [], []
        for c, idx, cnt in zip(cells, cols[schema.GENE_INDICES], cols[schema.GENE_COUNTS]):
            inputs.append(_subset(c, ~np.isin(c["gene_ids"], held)))
            dense = np.zeros(len(panel.genes), dtype=np.float64)
            dense[np.asarray(idx, dtype=np.int64)] = np.asarray(cnt, dtype=np.float64)
            counts = dense[held_panel]
            targets.append({"gene_ids": held, "gene_values": np.log1p(counts / c["size_factor"]).astype(np.float32),
                            "gene_counts": counts.astype(np.float32), "size_factor": c["size_factor"]})
        return inputs, targets


def _subset(cell: dict, keep: np.ndarray) -> dict:
    return {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in cell.items()}


@dataclass
class ExpressionTargetCollator:
    """Image -> expression: ``pixel_values`` and, for every panel gene the model knows,
    ``labels [B, K]`` = log1p(count / library * target_sum) with the processor's normalisation;
    ``target_gene_ids [B, K]`` lists those genes (the same K for every cell)."""

    processor: SpatiaProcessor
    epoch: int = 0
    target_vocab_ids: np.ndarray = field(init=False)
    _panel_to_target: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        panel = self.processor._require_panel()
        known = np.flatnonzero(panel.vocab_ids >= 0)
        self.target_vocab_ids = panel.vocab_ids[known]
        self._panel_to_target = np.full(len(panel.genes), -1, dtype=np.int64)
        self._panel_to_target[known] = np.arange(len(known))

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        cols = as_columns(rows)
        _require(cols, [schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS], "image_to_expression")
        b, k = len(cols[schema.GENE_INDICES]), len(self.target_vocab_ids)
        labels = np.zeros((b, k), dtype=np.float32)
        for i, (idx, cnt) in enumerate(zip(cols[schema.GENE_INDICES], cols[schema.GENE_COUNTS])):
            idx = np.asarray(idx, dtype=np.int64)
            cnt = np.asarray(cnt, dtype=np.float64)
            size_factor = max(float(cnt.sum()), 1.0) / self.processor.target_sum
            pos = self._panel_to_target[idx]
            ok = pos >= 0
            labels[i, pos[ok]] = np.log1p(cnt[ok] / size_factor)
        return _tensors({
            "pixel_values": self.processor.preprocess_images(_stack_images(cols[schema.IMAGE])).numpy(),
            "target_gene_ids": np.broadcast_to(self.target_vocab_ids, (b, k)).copy(),
            "labels": labels,
        })


# ----------------------------------------------------------------------------- tissues
@dataclass
class TissueCollator:
    """Sections -> ``niche_embeddings [B, M, D]``, ``niche_positions [B, M, 2]`` (µm),
    ``niche_attention_mask [B, M]``, ``labels [B]``.

    An example is ``{"embeddings": [M, D], "positions": [M, 2], "label": id, "key": int}`` (see
    :class:`~spatia_hf.training.finetune.TissueWindows`). With ``window_um`` set, each example is
    cut to a random square window of that side (seeded per example and epoch) holding at least
    ``min_niches`` niches: the augmentation that turns a handful of sections into many examples.
    """

    window_um: float | None = None
    min_niches: int = 4
    seed: int = 0
    epoch: int = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch: nothing to collate")
        rngs = example_rngs(self.seed, self.epoch, [int(e["key"]) for e in examples])
        picked = [self._window(np.asarray(e["positions"], np.float32), rng) for e, rng in zip(examples, rngs)]
        b = len(examples)
        m = max(len(p) for p in picked)
        d = np.asarray(examples[0]["embeddings"]).shape[-1]
        emb = np.zeros((b, m, d), dtype=np.float32)
        pos = np.zeros((b, m, 2), dtype=np.float32)
        mask = np.zeros((b, m), dtype=np.int64)
        for i, (e, p) in enumerate(zip(examples, picked)):
            emb[i, : len(p)] = np.asarray(e["embeddings"], np.float32)[p]
            pos[i, : len(p)] = np.asarray(e["positions"], np.float32)[p]
            mask[i, : len(p)] = 1
        labels = np.asarray([int(e["label"]) for e in examples], dtype=np.int64)
        return _tensors({"niche_embeddings": emb, "niche_positions": pos, "niche_attention_mask": mask,
                         "labels": labels})

    def _window(self, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        everything = np.arange(len(positions))
        if self.window_um is None or len(positions) <= self.min_niches:
            return everything
        lo, hi = positions.min(axis=0), positions.max(axis=0)
        for _ in range(20):  # a few tries to land on a window with enough niches
            corner = lo + rng.random(2) * np.maximum(hi - lo - self.window_um, 0.0)
            inside = np.all((positions >= corner) & (positions <= corner + self.window_um), axis=1)
            if inside.sum() >= self.min_niches:
                return np.flatnonzero(inside)
        return everything
