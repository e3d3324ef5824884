"""Train/test splits of cells for the evaluation tasks: whole sections where the task allows, cells
otherwise, always seeded.

Cells of one section share a slide, a stain and their neighbours, so holding out whole sections
(``sample_id``) is the honest default. The default held-out section is the one training holds out
(:func:`spatia_hf.data.datasets.default_eval_sections`, the last by name), so a model fine-tuned
with the package's defaults is never scored on its own training sections. Tasks that need training
cells next to the scored ones (imputation from spatial neighbours) split cells within sections,
stratified by section. Section-level classification with few sections uses leave-one-section-out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


SPLIT_KINDS = ("section", "cell")


@dataclass(frozen=True)
class Split:
    """Row indices of the training and scored (test) cells.

    Attributes:
        train, test: sorted int64 row indices, disjoint.
        kind: "section" (whole sections held out) or "cell" (cells held out within sections).
        seed: the seed that drew it (cell splits) or 0.
        held_out_sections: the held-out ``sample_id`` values (section splits).
    """

    train: np.ndarray
    test: np.ndarray
    kind: str
    seed: int = 0
    held_out_sections: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {SPLIT_KINDS}")
        if len(self.train) == 0 or len(self.test) == 0:
            raise ValueError(f"{self.kind} split with {len(self.train)} train and {len(self.test)} test cells: both "
                             "must be non-empty. Fix: use more cells or sections, or another test fraction")
        if np.intersect1d(self.train, self.test).size:
            raise ValueError("train and test indices overlap")

    def to_json(self) -> dict:
        """A short JSON-able description for results.json (not the indices)."""
        return {"kind": self.kind, "seed": self.seed, "n_train": int(len(self.train)), "n_test": int(len(self.test)),
                "held_out_sections": list(self.held_out_sections)}


def section_split(sample_ids: Sequence[str], held_out: Sequence[str] | None = None) -> Split:
    """Hold out whole sections: ``held_out`` (default: the training default, the last section by name)."""
    from ..data.datasets import default_eval_sections

    ids = np.asarray(sample_ids).astype(str)
    present = sorted(set(ids.tolist()))
    if len(present) < 2:
        raise ValueError(f"sample_id has a single section {present}: a section split needs at least 2. "
                         "Fix: use cell_split (kind='cell') or add sections")
    held = list(held_out) if held_out is not None else default_eval_sections(present)
    missing = [s for s in held if s not in present]
    if missing:
        raise ValueError(f"held_out={held}: {missing} not among the sections {present}")
    test = np.isin(ids, held)
    return Split(np.flatnonzero(~test), np.flatnonzero(test), "section", 0, tuple(held))


def cell_split(n_cells: int, test_fraction: float = 0.25, seed: int = 0,
               stratify: Sequence | None = None) -> Split:
    """Hold out a seeded ``test_fraction`` of cells, stratified by ``stratify`` (e.g. sample_id) when
    every stratum has at least 2 cells."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
    strata = None
    if stratify is not None:
        strata = np.asarray(stratify).astype(str)
        if len(strata) != n_cells:
            raise ValueError(f"stratify has {len(strata)} values for {n_cells} cells")
        if np.unique(strata, return_counts=True)[1].min() < 2:
            strata = None
    train, test = train_test_split(np.arange(n_cells), test_size=test_fraction, random_state=seed, stratify=strata)
    return Split(np.sort(train), np.sort(test), "cell", seed)


def leave_one_section_out(sample_ids: Sequence[str]) -> list[Split]:
    """One split per section, holding out that section (rows = ``sample_ids``, e.g. one per section)."""
    present = sorted(set(np.asarray(sample_ids).astype(str).tolist()))
    return [section_split(sample_ids, [s]) for s in present]


