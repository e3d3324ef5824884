"""Gene panel coverage: which of an instrument's genes a model vocabulary knows.

Before converting a Xenium/CosMx/MERSCOPE run for a pretrained model, a user wants to know how
much of the panel the model can read: genes kept (in the vocabulary), genes unknown to it (their
counts would be ignored) and features the reader dropped (control probes, blank codewords). This
module computes that report; readers store it in ``Section.uns["panel_coverage"]`` (it ends up in
the dataset's ``sections.json``) and the CLI prints its summary line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class PanelCoverage:
    """Panel genes against a vocabulary.

    Attributes:
        n_panel: genes the section measures (after the reader dropped controls).
        kept: panel genes the vocabulary has (matched by Ensembl id where both sides have one,
            else by symbol, case-sensitively; ``matched_case_insensitive`` lists case-only matches).
        unknown: panel genes the vocabulary lacks.
        dropped: features the reader removed, by category (e.g. ``{"NegPrb": 20}``).
        kept_count_fraction: share of the section's total counts on kept genes (1.0 = nothing lost),
            when counts were given.
    """

    n_panel: int
    n_vocabulary: int
    kept: list[str]
    unknown: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    matched_by_id: int = 0
    matched_case_insensitive: list[str] = field(default_factory=list)
    kept_count_fraction: float | None = None

    @property
    def fraction_kept(self) -> float:
        return len(self.kept) / self.n_panel if self.n_panel else 0.0

    def summary(self) -> str:
        drop = ", ".join(f"{k}={v}" for k, v in self.dropped.items()) or "none"
        frac = "" if self.kept_count_fraction is None else f", {100 * self.kept_count_fraction:.1f}% of counts"
        unk = f" (e.g. {', '.join(self.unknown[:5])})" if self.unknown else ""
        return (f"panel coverage: {len(self.kept)}/{self.n_panel} genes in the vocabulary of {self.n_vocabulary} "
                f"({100 * self.fraction_kept:.1f}%{frac}); {len(self.unknown)} unknown{unk}; dropped features: {drop}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["fraction_kept"] = self.fraction_kept
        return d


def _find_key(obj: Any, key: str) -> Any:
    """First value stored under ``key`` anywhere in nested dicts/lists (configs nest sub-configs)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def load_vocabulary(source: str | Path | Sequence[str]) -> tuple[list[str], list[str | None] | None]:
    """Gene symbols (and Ensembl ids when recorded) of a vocabulary.

    Args:
        source: a list of symbols; a model folder or ``config.json`` (``gene_vocab`` /
            ``gene_ensembl_ids``, at any nesting depth); a dataset folder or ``gene_panel.json``
            (``genes`` / ``gene_ids``); a JSON list; or a text file with one symbol per line.
    """
    if not isinstance(source, (str, Path)):
        return [str(g) for g in source], None
    path = Path(source)
    if path.is_dir():
        for name in ("config.json", "gene_panel.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"vocabulary {source}: the folder has no config.json (model) or gene_panel.json "
                                    "(dataset). Fix: pass a model or dataset folder, or a gene list file")
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary {source} does not exist. Fix: pass a model/dataset folder or a gene list")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"vocabulary {path}: invalid JSON ({err}). Fix: pass a valid file") from None
        if isinstance(obj, list):
            return [str(g) for g in obj], None
        for genes_key, ids_key in (("gene_vocab", "gene_ensembl_ids"), ("genes", "gene_ids")):
            genes = _find_key(obj, genes_key)
            if genes:
                ids = _find_key(obj, ids_key)
                return [str(g) for g in genes], (list(ids) if ids and len(ids) == len(genes) else None)
        raise ValueError(f"vocabulary {path}: no 'gene_vocab' or 'genes' list in it. Fix: pass a model config.json, "
                         "a dataset gene_panel.json or a JSON list of symbols")
    genes = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not genes:
        raise ValueError(f"vocabulary {path}: empty. Fix: one gene symbol per line")
    return genes, None


def panel_coverage(genes: Sequence[str], vocabulary: str | Path | Sequence[str], *,
                   gene_ids: Sequence[str | None] | None = None, counts=None,
                   dropped: dict[str, int] | None = None) -> PanelCoverage:
    """Coverage of a section's panel (``genes``, optional Ensembl ``gene_ids``) by ``vocabulary``.

    Args:
        genes: panel symbols, one per count column.
        vocabulary: see :func:`load_vocabulary`.
        counts: optional cells x genes counts, to report the share of counts on kept genes.
        dropped: features the reader removed (controls / blanks), by category.
    """
    vocab, vocab_ids = load_vocabulary(vocabulary)
    by_symbol = set(vocab)
    by_id = {str(i) for i in (vocab_ids or []) if i}
    lower = {g.lower(): g for g in vocab}
    kept_mask = np.zeros(len(genes), dtype=bool)
    n_id, case_only = 0, []
    for j, g in enumerate(genes):
        gid = None if gene_ids is None else gene_ids[j]
        if gid and str(gid) in by_id:
            kept_mask[j], n_id = True, n_id + 1
        elif g in by_symbol:
            kept_mask[j] = True
        elif str(g).lower() in lower:
            case_only.append(str(g))
    frac = None
    if counts is not None:
        per_gene = np.asarray(counts.sum(axis=0)).ravel().astype(np.float64)
        total = per_gene.sum()
        frac = float(per_gene[kept_mask].sum() / total) if total > 0 else 1.0
    return PanelCoverage(
        n_panel=len(genes), n_vocabulary=len(vocab),
        kept=[str(g) for g, k in zip(genes, kept_mask) if k],
        unknown=[str(g) for g, k in zip(genes, kept_mask) if not k],
        dropped=dict(dropped or {}), matched_by_id=n_id, matched_case_insensitive=case_only,
        kept_count_fraction=frac,
    )
