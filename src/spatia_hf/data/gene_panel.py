"""The dataset gene panel: one ordered gene list, and the mapping of each section onto it.

Every dataset carries one panel (``gene_panel.json["genes"]``); ``gene_indices`` in the rows
index it. Sections measured with other panels are mapped by Ensembl id where both sides have
ids, by symbol otherwise. Genes a section measures but the panel lacks are dropped *and
reported* (names, how many counts); panel genes a section did not measure are listed too, so a
zero is never mistaken for an unmeasured gene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

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
