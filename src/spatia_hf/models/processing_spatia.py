"""``SpatiaProcessor``: raw cells (crops + counts) -> SPATIA model inputs.

A plain class with ``save_pretrained``/``from_pretrained`` (one JSON file,
``spatia_processor.json``) rather than a transformers ``ProcessorMixin``: there is no tokenizer or
image processor to compose, and the processor must carry the model's gene vocabulary.

What it does, in order:

1. **Panel mapping** (:meth:`SpatiaProcessor.map_panel`): a dataset's genes (symbols, optional
   Ensembl ids) are mapped onto the model vocabulary, by id where both sides have one, by exact
   symbol otherwise. The :class:`PanelMapping` reports kept / unknown (dropped) / missing model
   genes and refuses a panel whose coverage is below ``min_coverage``, naming the first unknown genes.
2. **Normalisation**: library size over all measured genes -> ``log1p(count / library * target_sum)``;
   ``size_factors = library / target_sum`` for the NB/ZINB likelihoods.
3. **Token selection**: every expressed gene (the ``max_genes`` highest counts when there are more)
   plus ``zero_ratio`` x as many sampled non-expressed panel genes (seeded), up to ``max_genes``;
   then padding to the longest cell of the batch (or to ``max_genes``).
4. **Images**: uint8 ``(C, H, W)`` crops -> float ``pixel_values``, ``(x / 255 - mean) / std``,
   with a clear error for the wrong size or channel count.

The batch API (:meth:`SpatiaProcessor.__call__`) takes rows of the ``cells`` dataset (columns
``image``, ``gene_indices``, ``gene_counts`` from :mod:`spatia_hf.data.schema`), as a list of dicts
or a dict of lists, and returns a ``transformers.BatchFeature`` of tensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature

from .configuration_spatia import NUM_SPECIAL_TOKENS, PAD_TOKEN_ID, SpatiaCellConfig, SpatiaConfig
from ..utils.columns import GENE_COUNTS, GENE_INDICES, GENE_PANEL_FILE, IMAGE
from ..utils.io import write_json

PROCESSOR_FILE = "spatia_processor.json"
_LISTED = 10


@dataclass
class PanelMapping:
    """How a dataset's gene panel maps onto the model vocabulary.

    Attributes:
        genes: the dataset panel (position = value of ``gene_indices``).
        vocab_ids: ``[len(genes)]`` model vocabulary id of each panel gene, -1 when unknown.
        unknown: panel genes the model does not know (dropped from the inputs, reported here).
        missing: vocabulary genes the panel does not measure (never input as zeros).
        matched_by_id: how many genes were matched by Ensembl id rather than symbol.
    """

    genes: list[str]
    vocab_ids: np.ndarray
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    matched_by_id: int = 0

    @property
    def n_kept(self) -> int:
        return int((self.vocab_ids >= 0).sum())

    @property
    def coverage(self) -> float:
        """Fraction of the dataset panel the model knows."""
        return self.n_kept / max(len(self.genes), 1)

    def report(self) -> dict[str, Any]:
        return {
            "n_panel_genes": len(self.genes),
            "n_kept": self.n_kept,
            "coverage": round(self.coverage, 4),
            "n_unknown": len(self.unknown),
            "unknown_genes": list(self.unknown),
            "n_missing_model_genes": len(self.missing),
            "missing_model_genes": list(self.missing),
            "matched_by_ensembl_id": self.matched_by_id,
        }


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                  integer: bool = False, strict: bool = False) -> None:
    """A processor setting is a finite number (an integer where asked) within its range."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and bool(np.isfinite(value)) and (not integer or float(value) == int(value))
    ok = ok and (low is None or (value > low if strict else value >= low)) and (high is None or value <= high)
    if not ok:
        bound = (f"{'>' if strict else '>='} {low}" if low is not None else "") + (f" and <= {high}" if high is not None
                                                                                 else "")
        raise ValueError(f"{name}={value!r}: expected a finite {'integer' if integer else 'number'} {bound}. Fix: "
                         f"pass a valid {name}")


class SpatiaProcessor:
    """Turns crops and counts into ``pixel_values``, ``gene_ids``, ``gene_values``, ``gene_counts``,
    ``gene_attention_mask`` and ``size_factors``.

    Args:
        gene_vocab: the model's gene symbols (vocabulary id = 4 + index).
        gene_ensembl_ids: optional Ensembl ids aligned with ``gene_vocab``.
        image_size / num_channels: crop geometry the model expects.
        max_genes: gene tokens per cell at most.
        zero_ratio: sampled zeros per expressed gene (0.5: one zero for every two expressed genes).
        target_sum: library size the counts are scaled to before log1p.
        min_coverage: smallest accepted fraction of a dataset panel known to the model.
        image_mean / image_std: per-channel (or scalar) normalisation of ``x / 255``.
        pad_to_max_genes: pad every batch to ``max_genes`` instead of its longest cell.
        seed: seed of the zero sampling (each call advances the generator; pass ``seed=`` to a
            call for a call-local, repeatable draw).
    """

    def __init__(
        self,
        gene_vocab: Sequence[str],
        gene_ensembl_ids: Sequence[str | None] | None = None,
        *,
        image_size: int = 64,
        num_channels: int = 2,
        max_genes: int = 256,
        zero_ratio: float = 0.5,
        target_sum: float = 1e4,
        min_coverage: float = 0.5,
        image_mean: float | Sequence[float] = 0.5,
        image_std: float | Sequence[float] = 0.5,
        pad_to_max_genes: bool = False,
        seed: int = 0,
    ):
        self.gene_vocab = [str(g) for g in gene_vocab]
        self.gene_ensembl_ids = None if gene_ensembl_ids is None else [None if g is None else str(g)
                                                                         for g in gene_ensembl_ids]
        if self.gene_ensembl_ids is not None and len(self.gene_ensembl_ids) != len(self.gene_vocab):
            raise ValueError(f"gene_ensembl_ids: {len(self.gene_ensembl_ids)} ids for {len(self.gene_vocab)} genes. "
                             "Fix: align them with gene_vocab or pass None")
        _check_number("max_genes", max_genes, 1, 2**20, integer=True)
        _check_number("zero_ratio", zero_ratio, 0.0, 1e3)
        _check_number("target_sum", target_sum, 0.0, 1e12, strict=True)
        _check_number("min_coverage", min_coverage, 0.0, 1.0)
        _check_number("image_size", image_size, 1, 2**14, integer=True)
        _check_number("num_channels", num_channels, 1, 256, integer=True)
        _check_number("seed", seed, 0, 2**63 - 1, integer=True)
        for name, v in (("image_mean", image_mean), ("image_std", image_std)):
            for x in ([v] if isinstance(v, (int, float)) and not isinstance(v, bool) else
                      (v if isinstance(v, (list, tuple)) and v else [v])):
                _check_number(name, x, 0.0 if name == "image_std" else None, strict=name == "image_std")
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.max_genes = int(max_genes)
        self.zero_ratio = float(zero_ratio)
        self.target_sum = float(target_sum)
        self.min_coverage = float(min_coverage)
        self.image_mean = image_mean if isinstance(image_mean, (int, float)) else list(image_mean)
        self.image_std = image_std if isinstance(image_std, (int, float)) else list(image_std)
        self.pad_to_max_genes = bool(pad_to_max_genes)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.panel: PanelMapping | None = None

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_config(cls, config: SpatiaConfig | SpatiaCellConfig, **kwargs) -> "SpatiaProcessor":
        """A processor matching a model config (vocabulary, crop geometry, ``max_genes``)."""
        cell = config.cell_config if isinstance(config, SpatiaConfig) else config
        defaults = dict(image_size=cell.image_size, num_channels=cell.num_channels, max_genes=cell.max_genes)
        return cls(cell.gene_vocab, cell.gene_ensembl_ids, **{**defaults, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "gene_vocab": self.gene_vocab,
            "gene_ensembl_ids": self.gene_ensembl_ids,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "max_genes": self.max_genes,
            "zero_ratio": self.zero_ratio,
            "target_sum": self.target_sum,
            "min_coverage": self.min_coverage,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "pad_to_max_genes": self.pad_to_max_genes,
            "seed": self.seed,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``spatia_processor.json`` atomically (temporary file + rename)."""
        out = Path(save_directory)
        write_json(out / PROCESSOR_FILE, self.to_dict(), indent=2)
        return out / PROCESSOR_FILE

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "SpatiaProcessor":
        """Load from a folder or Hub id with ``spatia_processor.json``, or fall back to the model
        ``config.json`` there (a model checkpoint saved without its processor). Hub ids are fetched
        once into the Hub cache (``spatia_hf.utils.hub_ids``); offline, the cache is used."""
        from ..utils.hub_ids import resolve_folder

        folder = resolve_folder(path, what="processor", allow_patterns=[PROCESSOR_FILE, "config.json"])
        file = folder / PROCESSOR_FILE
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                data.pop("processor_class", None)
                vocab = data.pop("gene_vocab")
                ids = data.pop("gene_ensembl_ids", None)
                if not isinstance(vocab, list) or not (ids is None or isinstance(ids, list)):
                    raise TypeError("gene_vocab / gene_ensembl_ids must be lists")
                return cls(vocab, ids, **{**data, **kwargs})
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                if "Fix:" in str(err) and type(err).__module__ == "builtins":
                    raise ValueError(f"{file}: {err}") from None
                raise ValueError(f"{file}: not a readable SpatiaProcessor file ({type(err).__name__}: {err}). Fix: "
                                 "re-copy it, or save the processor again (processor.save_pretrained)") from None
        if (folder / "config.json").is_file():
            from transformers import AutoConfig  # the SPATIA configs register when its Auto module loads

            return cls.from_config(AutoConfig.from_pretrained(folder), **kwargs)
        raise FileNotFoundError(f"{path}: no {PROCESSOR_FILE} or config.json. Fix: pass the folder or Hub id a "
                                "SPATIA model or processor was saved to")

    # ------------------------------------------------------------------ gene panel
    def map_panel(
        self,
        genes: Sequence[str],
        gene_ids: Sequence[str | None] | None = None,
        *,
        min_coverage: float | None = None,
    ) -> PanelMapping:
        """Map a dataset panel onto the vocabulary, remember it for later calls, and return the report.

        Raises ValueError when less than ``min_coverage`` of the panel is known, naming the first
        unknown genes.
        """
        genes = [str(g) for g in genes]
        if gene_ids is not None and len(gene_ids) != len(genes):
            raise ValueError(f"gene_ids: {len(gene_ids)} ids for {len(genes)} genes. Fix: align them or pass None")
        by_symbol = {g: NUM_SPECIAL_TOKENS + i for i, g in enumerate(self.gene_vocab)}
        by_id = ({str(e): NUM_SPECIAL_TOKENS + i for i, e in enumerate(self.gene_ensembl_ids) if e}
                 if self.gene_ensembl_ids is not None else {})
        vocab_ids = np.full(len(genes), -1, dtype=np.int64)
        matched_by_id = 0
        for j, g in enumerate(genes):
            eid = None if gene_ids is None else gene_ids[j]
            if eid and str(eid) in by_id:
                vocab_ids[j] = by_id[str(eid)]
                matched_by_id += 1
            else:
                vocab_ids[j] = by_symbol.get(g, -1)
        kept = vocab_ids[vocab_ids >= 0]
        if len(np.unique(kept)) != len(kept):
            raise ValueError("gene panel: several dataset genes map to the same model gene (symbol/id collision). "
                             "Fix: make the panel's symbols and Ensembl ids consistent")
        measured = set(kept.tolist())
        mapping = PanelMapping(
            genes=genes,
            vocab_ids=vocab_ids,
            unknown=[g for g, v in zip(genes, vocab_ids) if v < 0],
            missing=[g for i, g in enumerate(self.gene_vocab) if NUM_SPECIAL_TOKENS + i not in measured],
            matched_by_id=matched_by_id,
        )
        threshold = self.min_coverage if min_coverage is None else float(min_coverage)
        if mapping.coverage < threshold:
            first = ", ".join(repr(g) for g in mapping.unknown[:_LISTED])
            raise ValueError(
                f"gene panel coverage {mapping.coverage:.2f} is below min_coverage={threshold:.2f}: "
                f"{len(mapping.unknown)} of {len(genes)} dataset genes are not in the model vocabulary "
                f"(first: {first}). Fix: lower min_coverage, check that symbols/Ensembl ids use the model's "
                "naming, or grow the vocabulary with model.resize_gene_vocab(genes) and fine-tune"
            )
        self.panel = mapping
        return mapping

    def map_dataset_panel(self, dataset_dir: str | os.PathLike, **kwargs) -> PanelMapping:
        """:meth:`map_panel` with the ``gene_panel.json`` of a dataset written by the builder."""
        data = json.loads((Path(dataset_dir) / GENE_PANEL_FILE).read_text())
        return self.map_panel(data["genes"], data.get("gene_ids"), **kwargs)

    def _require_panel(self) -> PanelMapping:
        if self.panel is None:
            raise ValueError("no gene panel mapped. Fix: call processor.map_panel(genes, gene_ids) (or "
                             "map_dataset_panel(dataset_dir)) before encoding expression")
        return self.panel

    # ------------------------------------------------------------------ expression
    def encode_cell(
        self, gene_indices: Sequence[int] | np.ndarray, gene_counts: Sequence[float] | np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray | float]:
        """One cell's sparse counts (panel indices + raw counts) -> unpadded token arrays."""
        panel = self._require_panel()
        rng = self._rng if rng is None else rng
        idx = np.asarray(gene_indices, dtype=np.int64).reshape(-1)
        cnt = np.asarray(gene_counts, dtype=np.float64).reshape(-1)
        if idx.shape != cnt.shape:
            raise ValueError(f"{GENE_INDICES}/{GENE_COUNTS}: {idx.size} indices but {cnt.size} counts. "
                             "Fix: give one count per gene index")
        n_panel = len(panel.genes)
        if idx.size and (idx.min() < 0 or idx.max() >= n_panel):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise ValueError(f"{GENE_INDICES}: index {bad} is outside the mapped panel of {n_panel} genes. "
                             "Fix: map the dataset's own gene_panel.json with map_panel/map_dataset_panel")
        if cnt.size and (not np.isfinite(cnt).all() or cnt.min() < 0):
            raise ValueError(f"{GENE_COUNTS}: counts must be finite and >= 0 (got min {cnt.min()}). "
                             "Fix: pass raw counts, not normalised values")
        library = float(cnt.sum())
        size_factor = max(library, 1.0) / self.target_sum
        vocab = panel.vocab_ids[idx] if idx.size else idx
        expressed = (cnt > 0) & (vocab >= 0)
        e_vocab, e_cnt = vocab[expressed], cnt[expressed]
        if e_vocab.size > self.max_genes:  # keep the highest counts, ties by vocabulary id
            order = np.lexsort((e_vocab, -e_cnt))[: self.max_genes]
            e_vocab, e_cnt = e_vocab[order], e_cnt[order]
        n_zero_target = min(self.max_genes - e_vocab.size, math.ceil(self.zero_ratio * e_vocab.size))
        if e_vocab.size == 0:
            n_zero_target = min(self.max_genes, max(1, n_zero_target))
        z_vocab = np.zeros(0, dtype=np.int64)
        if n_zero_target > 0:
            known = np.unique(panel.vocab_ids[panel.vocab_ids >= 0])
            # == np.setdiff1d(known, vocab[cnt > 0]) (sorted), ~15x faster: a flag per vocabulary id
            is_expressed = np.zeros(NUM_SPECIAL_TOKENS + len(self.gene_vocab), dtype=bool)
            is_expressed[vocab[(cnt > 0) & (vocab >= 0)]] = True
            pool = known[~is_expressed[known]]
            if pool.size:
                z_vocab = rng.choice(pool, size=min(n_zero_target, pool.size), replace=False)
        ids = np.concatenate([e_vocab, z_vocab]).astype(np.int64)
        counts = np.concatenate([e_cnt, np.zeros(z_vocab.size)])
        values = np.log1p(counts / size_factor)
        return {"gene_ids": ids, "gene_values": values.astype(np.float32), "gene_counts": counts.astype(np.float32),
                "size_factor": size_factor}

    def gene_value_statistics(self, gene_indices: Sequence, gene_counts: Sequence, *,
                              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-gene means of the tokens these cells encode to (expressed genes and sampled zeros):
        ``(vocab ids [G], mean log1p value [G], log mean normalised count [G])``, for genes seen at
        least once. Used to start the pretraining heads at the data's mean."""
        rng = np.random.default_rng(seed)
        size = NUM_SPECIAL_TOKENS + len(self.gene_vocab)
        n, value_sum, rate_sum = np.zeros(size), np.zeros(size), np.zeros(size)
        for idx, cnt in zip(gene_indices, gene_counts):
            c = self.encode_cell(idx, cnt, rng)
            ids = c["gene_ids"]
            np.add.at(n, ids, 1.0)
            np.add.at(value_sum, ids, c["gene_values"])
            np.add.at(rate_sum, ids, c["gene_counts"] / c["size_factor"])
        seen = np.nonzero(n)[0]
        mean_rate = rate_sum[seen] / n[seen]
        return seen, value_sum[seen] / n[seen], np.log(np.maximum(mean_rate, 1e-4))

    def encode_expression(
        self, gene_indices: Sequence, gene_counts: Sequence, *, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Many cells' sparse counts -> padded ``gene_ids``/``gene_values``/``gene_counts``/
        ``gene_attention_mask`` ``[B, L]`` and ``size_factors [B]``."""
        if len(gene_indices) != len(gene_counts):
            raise ValueError(f"{GENE_INDICES}/{GENE_COUNTS}: {len(gene_indices)} vs {len(gene_counts)} cells. Fix: give "
                             "one list of indices and one of counts per cell")
        rng = self._rng if seed is None else np.random.default_rng(seed)
        cells = [self.encode_cell(i, c, rng) for i, c in zip(gene_indices, gene_counts)]
        length = self.max_genes if self.pad_to_max_genes else max([len(c["gene_ids"]) for c in cells] + [1])
        b = len(cells)
        ids = np.full((b, length), PAD_TOKEN_ID, dtype=np.int64)
        values = np.zeros((b, length), dtype=np.float32)
        counts = np.zeros((b, length), dtype=np.float32)
        for r, c in enumerate(cells):
            n = len(c["gene_ids"])
            ids[r, :n], values[r, :n], counts[r, :n] = c["gene_ids"], c["gene_values"], c["gene_counts"]
        return {
            "gene_ids": torch.from_numpy(ids),
            "gene_values": torch.from_numpy(values),
            "gene_counts": torch.from_numpy(counts),
            "gene_attention_mask": torch.from_numpy(ids != PAD_TOKEN_ID).long(),
            "size_factors": torch.tensor([c["size_factor"] for c in cells], dtype=torch.float32),
        }

    def encode_dense(self, counts, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Cells x panel-genes counts (numpy or scipy.sparse, e.g. ``adata.X``) -> token tensors."""
        import scipy.sparse as sp

        csr = sp.csr_matrix(counts)
        indices = [csr.indices[csr.indptr[i]: csr.indptr[i + 1]] for i in range(csr.shape[0])]
        values = [csr.data[csr.indptr[i]: csr.indptr[i + 1]] for i in range(csr.shape[0])]
        panel = self._require_panel()
        if csr.shape[1] != len(panel.genes):
            raise ValueError(f"counts: {csr.shape[1]} columns but the mapped panel has {len(panel.genes)} genes. "
                             "Fix: map the matrix's own gene list with map_panel")
        return self.encode_expression(indices, values, seed=seed)

    # ------------------------------------------------------------------ images
    def preprocess_images(self, images) -> torch.Tensor:
        """uint8 crops ``(C, H, W)`` (one, a list, or ``[B, C, H, W]``) -> float ``pixel_values``.

        Integer input (uint8, or the int64 nested lists ``datasets`` returns) is scaled by 1/255;
        float input is taken to be in [0, 1] already.
        """
        if isinstance(images, (list, tuple)):
            arr = np.stack([np.asarray(x) for x in images])
        else:
            arr = np.asarray(images)
            if arr.ndim == 3:
                arr = arr[None]
        expected = (self.num_channels, self.image_size, self.image_size)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
            got = tuple(arr.shape[1:]) if arr.ndim == 4 else tuple(arr.shape)
            raise ValueError(f"{IMAGE}: crops must be (C, H, W) = {expected}, got {got}. Fix: crop cells at "
                             f"{self.image_size} px with {self.num_channels} channels (or build the processor/model "
                             "with this dataset's image_size and num_channels)")
        if np.issubdtype(arr.dtype, np.integer):  # uint8, or uint8 values read back as int64 lists
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if lo < 0 or hi > 255:
                raise ValueError(f"{IMAGE}: integer crops must hold 0..255 (got {lo}..{hi}, dtype {arr.dtype}). "
                                 "Fix: normalise stains per slide to uint8 (spatia_hf.data.normalize) first")
            x = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif np.issubdtype(arr.dtype, np.floating):
            if arr.size and not np.isfinite(arr).all():
                raise ValueError(f"{IMAGE}: float crops hold NaN or inf. Fix: pass finite crops in [0, 1] (or uint8)")
            x = torch.from_numpy(arr.astype(np.float32))
        else:
            raise ValueError(f"{IMAGE}: dtype {arr.dtype} is not an image. Fix: pass uint8 (C, H, W) crops")
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=torch.float32).reshape(-1, 1, 1)
        return (x - mean) / std

    # ------------------------------------------------------------------ batch API
    def __call__(
        self,
        rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence] | None = None,
        *,
        images=None,
        gene_indices: Sequence | None = None,
        gene_counts: Sequence | None = None,
        seed: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Rows of the ``cells`` dataset (list of dicts or dict of lists) and/or explicit arrays -> model inputs.

        Missing modalities are skipped (image-only or expression-only batches work).
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported. Fix: use return_tensors='pt'")
        if rows is not None:
            cols = _columns(rows)
            images = cols.get(IMAGE, images)
            gene_indices = cols.get(GENE_INDICES, gene_indices)
            gene_counts = cols.get(GENE_COUNTS, gene_counts)
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            data["pixel_values"] = self.preprocess_images(images)
        if gene_indices is not None or gene_counts is not None:
            if gene_indices is None or gene_counts is None:
                raise ValueError(f"give both {GENE_INDICES} and {GENE_COUNTS}. Fix: pass the counts with their gene "
                                 "indices (or neither)")
            data.update(self.encode_expression(gene_indices, gene_counts, seed=seed))
        if not data:
            raise ValueError(f"nothing to process. Fix: give rows with {IMAGE!r} and/or {GENE_INDICES!r}/"
                             f"{GENE_COUNTS!r}")
        return BatchFeature(data=data)

    def __repr__(self) -> str:
        return (f"SpatiaProcessor(genes={len(self.gene_vocab)}, image_size={self.image_size}, "
                f"num_channels={self.num_channels}, max_genes={self.max_genes}, zero_ratio={self.zero_ratio})")


def _columns(rows) -> dict[str, list]:
    if isinstance(rows, Mapping):
        return {k: list(v) if not isinstance(v, (np.ndarray, torch.Tensor)) else v for k, v in rows.items()}
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty")
    return {k: [r[k] for r in rows] for k in rows[0].keys()}


__all__ = ["SpatiaProcessor", "PanelMapping", "PROCESSOR_FILE"]
