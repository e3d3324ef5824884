"""The dataset gene panel: one ordered gene list, and the mapping of each section onto it.

Every dataset carries one panel (``gene_panel.json["genes"]``); ``gene_indices`` in the rows
index it. Sections measured with other panels are mapped by Ensembl id where both sides have
ids, by symbol otherwise. Genes a section measures but the panel lacks are dropped *and
reported* (names, how many counts); panel genes a section did not measure are listed too, so a
zero is never mistaken for an unmeasured gene.

Coverage (formerly ``data/panel.py``): Gene panel coverage: which of an instrument's genes a model vocabulary knows.

Before converting a Xenium/CosMx/MERSCOPE run for a pretrained model, a user wants to know how
much of the panel the model can read: genes kept (in the vocabulary), genes unknown to it (their
counts would be ignored) and features the reader dropped (control probes, blank codewords). This
module computes that report; readers store it in ``Section.uns["panel_coverage"]`` (it ends up in
the dataset's ``sections.json``) and the CLI prints its summary line.

``read_gene_panel`` is the one reader of a dataset's ``gene_panel.json`` (a folder or a Hub dataset id).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from ..utils.columns import GENE_PANEL_FILE
from .section import Section

PANEL_MODES = ("first", "union")


@dataclass
class GenePanel:
    """Ordered gene symbols (and optional Ensembl ids) of a dataset.

    Attributes:
        genes: unique gene symbols; position = value of ``gene_indices``.
        gene_ids: Ensembl ids aligned with ``genes``, or None when not every source had ids.
        mode: how it was chosen: "first" (the first section's panel), "union" (all sections'
            genes, first-seen order) or "given" (passed by the user).
    """

    genes: list[str]
    gene_ids: list[str] | None = None
    mode: str = "given"

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        if len(set(self.genes)) != len(self.genes):
            raise ValueError("gene panel: duplicate gene symbols. Fix: pass unique symbols")
        if self.gene_ids is not None and len(self.gene_ids) != len(self.genes):
            raise ValueError(f"gene panel: {len(self.gene_ids)} gene_ids for {len(self.genes)} genes. "
                             "Fix: align them or pass gene_ids=None")
        self._by_symbol = {g: i for i, g in enumerate(self.genes)}
        self._by_id = ({str(g): i for i, g in enumerate(self.gene_ids) if g} if self.gene_ids is not None else {})

    def __len__(self) -> int:
        return len(self.genes)

    @classmethod
    def from_sections(cls, sections: Sequence[Section], mode: str = "first") -> "GenePanel":
        """Panel of the first section (``mode="first"``) or the union of all (``"union"``)."""
        if mode not in PANEL_MODES:
            raise ValueError(f"gene_panel={mode!r}: expected one of {PANEL_MODES} or a list of gene symbols")
        if not sections:
            raise ValueError("no sections given: nothing to build a gene panel from")
        first = sections[0]
        if mode == "first":
            return cls(list(first.genes), list(first.gene_ids) if first.gene_ids is not None else None, "first")
        genes: list[str] = []
        seen: set[str] = set()
        all_ids = all(s.gene_ids is not None for s in sections)
        ids: list[str] = []
        for s in sections:
            for j, g in enumerate(s.genes):
                if g not in seen:
                    seen.add(g)
                    genes.append(g)
                    if all_ids:
                        ids.append(str(s.gene_ids[j]))
        return cls(genes, ids if all_ids else None, "union")

    def column_map(self, genes: Iterable[str], gene_ids: Iterable[str] | None = None) -> np.ndarray:
        """Panel index of each given gene, or -1 when the panel lacks it."""
        genes = list(genes)
        gids = list(gene_ids) if gene_ids is not None else None
        out = np.full(len(genes), -1, dtype=np.int64)
        for j, g in enumerate(genes):
            if gids is not None and self._by_id and gids[j] and str(gids[j]) in self._by_id:
                out[j] = self._by_id[str(gids[j])]
            else:
                out[j] = self._by_symbol.get(str(g), -1)
        return out

    def map_counts(self, section: Section) -> tuple[sp.csr_matrix, dict]:
        """Counts of ``section`` re-indexed onto the panel (cells x len(panel), CSR, float32, sorted
        indices, explicit zeros removed) and a report of unknown and missing genes."""
        cmap = self.column_map(section.genes, section.gene_ids)
        known = np.flatnonzero(cmap >= 0)
        unknown = np.flatnonzero(cmap < 0)
        if len(set(cmap[known].tolist())) != len(known):
            raise ValueError(f"section {section.sample_id!r}: genes: several genes map to the same panel gene "
                             "(symbol/id collision). Fix: make symbols and ids consistent across sections")
        csr = section.counts_csr()
        unknown_counts = float(csr[:, unknown].sum()) if len(unknown) else 0.0
        sub = csr[:, known].tocsr()
        mapped = sp.csr_matrix(
            (sub.data.astype(np.float32), cmap[known][sub.indices].astype(np.int32), sub.indptr.copy()),
            shape=(csr.shape[0], len(self)),
        )
        mapped.eliminate_zeros()
        mapped.sort_indices()
        measured = np.zeros(len(self), dtype=bool)
        measured[cmap[known]] = True
        report = {
            "n_genes_in_section": len(section.genes),
            "n_mapped": int(len(known)),
            "unknown_genes": [section.genes[j] for j in unknown],
            "unknown_counts": unknown_counts,
            "missing_genes": [self.genes[i] for i in np.flatnonzero(~measured)],
        }
        return mapped, report

    def to_json(self) -> dict:
        return {"genes": list(self.genes), "gene_ids": list(self.gene_ids) if self.gene_ids is not None else None,
                "n_genes": len(self.genes), "mode": self.mode}



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


def read_gene_panel(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> dict:
    """``gene_panel.json`` of a dataset folder or Hub dataset id (``hub_kwargs``: revision, cache_dir, token,
    local_files_only), checked to hold a non-empty ``genes`` list: the genes ``gene_indices`` refer to."""
    from ..utils.hub_ids import resolve_file

    path = Path(path_or_repo_id)
    file = resolve_file(path_or_repo_id, GENE_PANEL_FILE, what="dataset", repo_type="dataset", **hub_kwargs)
    if file is None:
        raise FileNotFoundError(f"dataset {os.fspath(path)!r}: no {GENE_PANEL_FILE}. Fix: pass a directory written by "
                                "`spatia convert ...` / `spatia synth` (spatia_hf.data.builder.build_multiscale_dataset)")
    panel = json.loads(file.read_text())
    genes = panel.get("genes") if isinstance(panel, dict) else None
    if not isinstance(genes, list) or not genes:
        raise ValueError(f"{file}: 'genes' is missing or empty. Fix: rebuild the dataset")
    return panel
