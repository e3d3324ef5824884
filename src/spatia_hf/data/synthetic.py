"""A synthetic tissue with ground truth for every evaluation task: the package's embedded data.

Each section is a sheet of cells (jittered hexagonal lattice, ~12 µm apart, so crops are centred on
nuclei) split into smooth spatial domains, each with its own cell-type mixture. The truth that
the 12 tasks score against is generated, not inferred:

- cell types (default 6 of 8) with marker-gene programmes AND their own morphology (nucleus area,
  eccentricity, DAPI brightness, chromatin texture, membrane size) -> ``obs["cell_type"]``;
- spatial domains -> ``obs["domain"]``;
- neighbour-induced genes: rate of ``NBRk`` = baseline + slope x (fraction of its source type among
  neighbours within 30 µm) -> ``ground_truth["neighbor_genes"]``, ``obs["neighbor_frac_<type>"]``;
- a morphology-driving gene ``NUCSIZE``: ``nucleus_area_um2 = type_area x (rate / reference_rate) **
  exponent`` (exponent 0.5), so raising it by fold f scales nucleus area by f ** exponent. It is a
  dense, near-Poisson gene (~20 counts per cell, NB shape 50): with the ~2 overdispersed counts of a
  typical gene, count noise would hide most of the effect in the observed cells (an observational
  regression recovered 15% of the true log-fold), so no model trained on them could show it;
- section labels ``tissue`` / ``condition`` / ``donor``: disease sections expand some cell types and
  switch on the ``DISk`` programme; each tissue has its own ``TSxk`` programme;
- counts: negative binomial (gamma-Poisson, gene-wise dispersion), log-normal size factors,
  ~100-150 counts per cell over 200 genes by default (most entries zero).

``make_synthetic_tissue`` returns in-memory ``Section`` objects; ``write_synthetic`` writes per
section an ``.h5ad`` (raw integer counts, ``obsm["spatial"]`` in pixels,
``uns["spatial_pixel_size_um"]``, ground truth in ``obs`` and ``uns["synthetic_ground_truth"]``)
and a 2-channel uint16 OME-TIFF (DAPI-like nuclei, membrane), plus ``synthetic.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .section import Section
from .synthetic_render import CellShapes, render_cells
from spatia_hf.utils.progress import respects_progress
from ..utils.io import read_json, staged_dir, write_json

GROUND_TRUTH_KEY = "synthetic_ground_truth"
PIXEL_SIZE_KEY = "spatial_pixel_size_um"
MANIFEST = "synthetic.json"
CHANNELS = ["DAPI", "boundary"]
MORPH_GENE = "NUCSIZE"
LABEL_KEYS = ["cell_type", "domain"]
DOMAIN_GEOMETRIES = ("blobs", "bands")


@dataclass(frozen=True)
class CellTypeSpec:
    """Morphology of a cell type (µm², relative 0-1 intensities)."""

    name: str
    code: str  # prefix of its marker genes
    nucleus_area_um2: float
    eccentricity: float
    dapi: float
    texture: float
    membrane_radius_um: float
    membrane_eccentricity: float
    membrane: float


CELL_TYPES: tuple[CellTypeSpec, ...] = (
    CellTypeSpec("epithelial", "EPI", 38.0, 0.45, 0.55, 0.35, 5.6, 0.40, 0.80),
    CellTypeSpec("fibroblast", "FIB", 24.0, 0.93, 0.75, 0.08, 4.6, 0.90, 0.50),
    CellTypeSpec("T_cell", "TCL", 16.0, 0.20, 0.95, 0.05, 3.4, 0.20, 0.90),
    CellTypeSpec("macrophage", "MAC", 30.0, 0.65, 0.45, 0.20, 5.8, 0.50, 0.60),
    CellTypeSpec("endothelial", "END", 20.0, 0.90, 0.60, 0.10, 4.2, 0.88, 1.00),
    CellTypeSpec("tumor", "TUM", 52.0, 0.50, 0.80, 0.60, 5.8, 0.30, 0.70),
    CellTypeSpec("B_cell", "BCL", 19.0, 0.25, 0.85, 0.45, 3.7, 0.25, 0.70),
    CellTypeSpec("smooth_muscle", "SMC", 26.0, 0.97, 0.50, 0.05, 4.4, 0.95, 0.40),
)


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic tissue (sizes in µm)."""

    n_genes: int = 200
    n_cell_types: int = 6
    n_domains: int = 3
    domain_geometry: str = "blobs"  # "blobs" (warped Voronoi regions) or "bands" (parallel wavy layers)
    pixel_size_um: float = 0.5
    cell_spacing_um: float = 12.0  # lattice pitch; minimum spacing = pitch - 2*sqrt(2)*jitter
    jitter_um: float = 1.5
    fill: float = 0.92  # fraction of lattice sites holding a cell
    margin_um: float = 12.0
    n_markers: int = 8
    marker_rate: float = 4.0
    neighbor_radius_um: float = 30.0
    neighbor_baseline: float = 0.05
    neighbor_slope: float = 6.0
    n_neighbor_genes: int = 3
    morph_reference_rate: float = 20.0  # dense enough that counts measure the rate (Poisson CV ~0.22)
    morph_exponent: float = 0.5
    morph_log_sd: float = 0.5
    morph_dispersion: float = 50.0  # NB shape of the morphology gene (near-Poisson; typical genes ~2.5)
    n_condition_genes: int = 6
    condition_fold: float = 6.0
    n_tissue_genes: int = 4
    tissues: tuple[str, ...] = ("tissue_A", "tissue_B")
    conditions: tuple[str, ...] = ("healthy", "disease")
    size_factor_log_sd: float = 0.4
    dispersion: float = 2.5  # median NB shape (smaller = more overdispersed)

    def check(self) -> None:
        if not 5 <= self.n_cell_types <= len(CELL_TYPES):
            raise ValueError(f"n_cell_types={self.n_cell_types}: expected 5 to {len(CELL_TYPES)}")
        if self.n_domains < 2:
            raise ValueError(f"n_domains={self.n_domains}: expected at least 2")
        if self.domain_geometry not in DOMAIN_GEOMETRIES:
            raise ValueError(f"domain_geometry={self.domain_geometry!r}: expected one of {DOMAIN_GEOMETRIES}")
        if not self.pixel_size_um > 0:
            raise ValueError(f"pixel_size_um={self.pixel_size_um}: expected > 0")
        fixed = self.n_cell_types * self.n_markers + self.n_neighbor_genes + 1 + self.n_condition_genes + \
            self.n_tissue_genes * len(self.tissues)
        if self.n_genes < fixed + 10:
            raise ValueError(f"n_genes={self.n_genes}: needs at least {fixed + 10} (programme genes + 10 background)")


@dataclass
class _Programme:
    """Gene panel and the rate structure shared by all sections of one seed."""

    genes: list[str]
    types: list[CellTypeSpec]
    base: np.ndarray  # (T, G) rate per type at size factor 1
    dispersion: np.ndarray  # (G,) NB shape
    compositions: np.ndarray  # (D, T) healthy type mixture per domain
    markers: dict[str, list[str]]
    neighbor: dict[str, dict]
    condition_genes: list[str]
    condition_types: list[str]
    expanded_types: list[str]
    tissue_genes: dict[str, list[str]]
    background: list[str] = field(default_factory=list)


def _programme(cfg: SyntheticConfig, seed: int) -> _Programme:
    rng = np.random.default_rng([seed, 7001])
    types = list(CELL_TYPES[: cfg.n_cell_types])
    t = len(types)
    names = [ct.name for ct in types]
    markers = {ct.name: [f"{ct.code}{j + 1}" for j in range(cfg.n_markers)] for ct in types}
    nbr_sources = [names[i % t] for i in (2, 3, 5, 4, 0, 1)[: cfg.n_neighbor_genes]]
    neighbor = {f"NBR{k + 1}": {"source_type": src, "radius_um": cfg.neighbor_radius_um,
                                "baseline_rate": cfg.neighbor_baseline, "slope": cfg.neighbor_slope}
                for k, src in enumerate(nbr_sources)}
    cond = [f"DIS{k + 1}" for k in range(cfg.n_condition_genes)]
    tissue_genes = {ts: [f"TS{chr(65 + i)}{k + 1}" for k in range(cfg.n_tissue_genes)]
                    for i, ts in enumerate(cfg.tissues)}
    programme = [g for gs in markers.values() for g in gs] + list(neighbor) + [MORPH_GENE] + cond + \
        [g for gs in tissue_genes.values() for g in gs]
    background = [f"GENE{k + 1:04d}" for k in range(cfg.n_genes - len(programme))]
    genes = programme + background
    col = {g: i for i, g in enumerate(genes)}

    base = np.zeros((t, len(genes)))
    for ti, ct in enumerate(types):
        for g in markers[ct.name]:
            base[:, col[g]] = 0.03
            base[ti, col[g]] = cfg.marker_rate * rng.lognormal(0.0, 0.4)
    for g in cond:
        base[:, col[g]] = 0.08
    bg = np.array([col[g] for g in background])
    base[:, bg] = rng.lognormal(math.log(0.25), 1.1, size=len(bg))[None, :] * rng.lognormal(0.0, 0.35,
                                                                                          size=(t, len(bg)))
    dispersion = cfg.dispersion * rng.lognormal(0.0, 0.4, size=len(genes))
    dispersion[col[MORPH_GENE]] = cfg.morph_dispersion

    d = cfg.n_domains
    comp = np.full((d, t), 0.03)
    for k in range(d):
        comp[k, k % t] += 0.55
        comp[k, (k + d) % t] += 0.25
        comp[k] += 0.1 * rng.dirichlet(np.ones(t))
    comp /= comp.sum(axis=1, keepdims=True)
    by_name = {n: i for i, n in enumerate(names)}
    cond_types = [n for n in ("macrophage", "tumor") if n in by_name] or [names[0]]
    expanded = [n for n in ("tumor", "macrophage") if n in by_name] or [names[-1]]
    return _Programme(genes, types, base, dispersion, comp, markers, neighbor, cond, cond_types, expanded,
                      tissue_genes, background)


def _lattice(n_cells: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """``n_cells`` jittered hexagonal-lattice positions (µm) in a square starting at ``margin_um``."""
    pitch = cfg.cell_spacing_um
    side = math.sqrt(n_cells / cfg.fill * pitch * pitch * math.sqrt(3) / 2)
    while True:
        dy = pitch * math.sqrt(3) / 2
        rows, cols = int(side // dy) + 1, int(side // pitch) + 1
        rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        pts = np.stack([cc * pitch + (rr % 2) * pitch / 2, rr * dy], axis=-1).reshape(-1, 2)
        pts = pts[(pts[:, 0] <= side) & (pts[:, 1] <= side)]
        if len(pts) >= n_cells:
            break
        side *= 1.05
    keep = np.sort(rng.choice(len(pts), size=n_cells, replace=False))
    pts = pts[keep] + rng.uniform(-cfg.jitter_um, cfg.jitter_um, size=(n_cells, 2))
    return pts + cfg.margin_um + cfg.jitter_um


def _domains(xy: np.ndarray, n_domains: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth domains: nearest of ``n_domains`` spread seeds, boundaries warped by low-frequency waves."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    extent = float(np.max(hi - lo))
    cand = lo + rng.uniform(0, 1, size=(64, 2)) * (hi - lo)
    seeds = [cand[0]]
    for _ in range(n_domains - 1):  # farthest-point sampling: every domain gets room
        dist = np.min(np.linalg.norm(cand[:, None] - np.array(seeds)[None], axis=-1), axis=1)
        seeds.append(cand[int(np.argmax(dist))])
    seeds = np.array(seeds)
    order = rng.permutation(n_domains)  # which domain sits where changes between sections
    seeds = seeds[order]
    score = -np.linalg.norm(xy[:, None, :] - seeds[None], axis=-1)
    for k in range(n_domains):
        for _ in range(3):
            ang = rng.uniform(0, 2 * math.pi)
            freq = 2 * math.pi / (extent * rng.uniform(0.5, 1.0))
            wave = np.cos(ang) * xy[:, 0] + np.sin(ang) * xy[:, 1]
            score[:, k] += 0.08 * extent * np.sin(freq * wave + rng.uniform(0, 2 * math.pi))
    return np.argmax(score, axis=1), seeds


def _bands(xy: np.ndarray, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """Layered domains (cortex-, epidermis-like): ``n_domains`` parallel bands of random widths across
    the section along a random direction, their boundaries bent by one low-frequency wave."""
    ang = rng.uniform(0, math.pi)
    along = np.cos(ang) * xy[:, 0] + np.sin(ang) * xy[:, 1]
    across = -np.sin(ang) * xy[:, 0] + np.cos(ang) * xy[:, 1]
    extent = float(np.ptp(along))
    wave = 0.06 * extent * np.sin(2 * math.pi * across / (extent * rng.uniform(0.8, 1.5)) + rng.uniform(0, 2 * math.pi))
    t = (along - along.min() + wave) / extent
    widths = rng.uniform(0.7, 1.3, size=n_domains)
    edges = np.cumsum(widths)[:-1] / widths.sum()
    order = rng.permutation(n_domains)  # which domain sits in which layer changes between sections
    return order[np.searchsorted(edges, t)]


def _neighbor_fractions(xy: np.ndarray, type_idx: np.ndarray, n_types: int, radius: float) -> np.ndarray:
    """(n, T) fraction of each type among the other cells within ``radius`` µm (0 if none)."""
    tree = cKDTree(xy)
    adj = tree.sparse_distance_matrix(tree, radius, output_type="coo_matrix").tocsr()
    adj.setdiag(0)
    adj.eliminate_zeros()
    adj.data[:] = 1.0
    onehot = sp.csr_matrix((np.ones(len(xy)), (np.arange(len(xy)), type_idx)), shape=(len(xy), n_types))
    counts = np.asarray((adj @ onehot).todense())
    deg = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, deg, out=np.zeros_like(counts), where=deg > 0)


def _section_labels(i: int, cfg: SyntheticConfig) -> dict[str, str]:
    return {"tissue": cfg.tissues[(i // len(cfg.conditions)) % len(cfg.tissues)],
            "condition": cfg.conditions[i % len(cfg.conditions)],
            "donor": f"donor_{i // len(cfg.conditions)}"}


def _ground_truth(prog: _Programme, cfg: SyntheticConfig, seed: int) -> dict:
    types = [ct.name for ct in prog.types]
    return {
        "version": 1,
        "seed": seed,
        "pixel_size_um": cfg.pixel_size_um,
        "cell_types": types,
        "domains": [f"domain_{k}" for k in range(cfg.n_domains)],
        "label_keys": LABEL_KEYS,
        "marker_genes": prog.markers,
        "type_morphology": {ct.name: {k: v for k, v in asdict(ct).items() if k not in ("name", "code")}
                            for ct in prog.types},
        "domain_composition": {f"domain_{k}": dict(zip(types, map(float, prog.compositions[k])))
                               for k in range(cfg.n_domains)},
        "neighbor_genes": prog.neighbor,
        "neighbor_rate_formula": "rate = baseline_rate + slope * neighbor_frac_<source_type> (x size factor)",
        "morphology_genes": {MORPH_GENE: {
            "feature": "nucleus_area_um2", "exponent": cfg.morph_exponent,
            "reference_rate": cfg.morph_reference_rate, "log_sd": cfg.morph_log_sd, "nb_shape": cfg.morph_dispersion,
            "formula": "nucleus_area_um2 = type_morphology[cell_type].nucleus_area_um2 * "
                       "(rate / reference_rate) ** exponent; raising the gene by fold f multiplies "
                       "nucleus area by f ** exponent"}},
        "condition_effects": {cfg.conditions[-1]: {
            "programme_genes": prog.condition_genes, "programme_fold_in_types": cfg.condition_fold,
            "responding_types": prog.condition_types, "programme_fold_elsewhere": 1.5,
            "expanded_types": prog.expanded_types, "expansion_factor": 2.0}},
        "tissue_programmes": prog.tissue_genes,
        "counts_model": "negative binomial (gamma-Poisson), mean = size_factor * rate, gene-wise shape",
    }


def _simulate_section(i: int, n_cells: int, seed: int, cfg: SyntheticConfig, prog: _Programme,
                      gt: dict, render: bool = True) -> Section:
    rng = np.random.default_rng([seed, 1, i])
    labels = _section_labels(i, cfg)
    types = [ct.name for ct in prog.types]
    t = len(types)
    xy = _lattice(n_cells, cfg, rng)
    domain = _domains(xy, cfg.n_domains, rng)[0] if cfg.domain_geometry == "blobs" else \
        _bands(xy, cfg.n_domains, rng)

    comp = prog.compositions.copy()
    disease = labels["condition"] == cfg.conditions[-1]
    if disease:
        for name in prog.expanded_types:
            comp[:, types.index(name)] *= 2.0
        comp /= comp.sum(axis=1, keepdims=True)
    cum = np.cumsum(comp[domain], axis=1)
    type_idx = np.minimum((rng.uniform(size=(n_cells, 1)) > cum).sum(axis=1), t - 1)

    frac = _neighbor_fractions(xy, type_idx, t, cfg.neighbor_radius_um)
    col = {g: j for j, g in enumerate(prog.genes)}
    rate = prog.base[type_idx].copy()
    for g, spec in prog.neighbor.items():
        rate[:, col[g]] = spec["baseline_rate"] + spec["slope"] * frac[:, types.index(spec["source_type"])]
    morph_rate = cfg.morph_reference_rate * np.exp(cfg.morph_log_sd * rng.standard_normal(n_cells))
    rate[:, col[MORPH_GENE]] = morph_rate
    if disease:
        responding = np.isin(type_idx, [types.index(n) for n in prog.condition_types])
        for g in prog.condition_genes:
            rate[:, col[g]] *= np.where(responding, cfg.condition_fold, 1.5)
    for ts, gs in prog.tissue_genes.items():
        for g in gs:
            rate[:, col[g]] = 1.5 if ts == labels["tissue"] else 0.03
    size_factor = rng.lognormal(0.0, cfg.size_factor_log_sd, size=n_cells)
    mu = size_factor[:, None] * rate
    theta = prog.dispersion[None, :]
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.int32)

    specs = [prog.types[k] for k in type_idx]
    base_area = np.array([s.nucleus_area_um2 for s in specs])
    area = base_area * (morph_rate / cfg.morph_reference_rate) ** cfg.morph_exponent
    ecc = np.clip(np.array([s.eccentricity for s in specs]) + rng.normal(0, 0.03, n_cells), 0.0, 0.98)
    root = (1 - ecc**2) ** 0.25
    na, nb = np.sqrt(area / math.pi) / root, np.sqrt(area / math.pi) * root
    mecc = np.array([s.membrane_eccentricity for s in specs])
    mroot = (1 - mecc**2) ** 0.25
    mrad = np.array([s.membrane_radius_um for s in specs]) * rng.lognormal(0, 0.06, n_cells)
    ma, mb = np.maximum(mrad / mroot, na + 1.2), np.maximum(mrad * mroot, nb + 1.2)
    dapi = np.array([s.dapi for s in specs]) * rng.lognormal(0, 0.08, n_cells)
    memb = np.array([s.membrane for s in specs]) * rng.lognormal(0, 0.08, n_cells)
    orient = rng.uniform(0, math.pi, n_cells)

    sample_id = f"synth_s{i:02d}"
    cell_ids = [f"{sample_id}-{k:06d}" for k in range(n_cells)]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical([types[k] for k in type_idx], categories=types),
        "domain": pd.Categorical([f"domain_{k}" for k in domain], categories=gt["domains"]),
        "nucleus_area_um2": area.astype(np.float32),
        "nucleus_eccentricity": ecc.astype(np.float32),
        "nucleus_orientation_rad": orient.astype(np.float32),
        "nucleus_intensity": dapi.astype(np.float32),
        "cell_area_um2": (math.pi * ma * mb).astype(np.float32),
        "size_factor": size_factor.astype(np.float32),
        f"{MORPH_GENE}_rate": morph_rate.astype(np.float32),
        **{f"neighbor_frac_{src}": frac[:, types.index(src)].astype(np.float32)
           for src in dict.fromkeys(s["source_type"] for s in prog.neighbor.values())},
    }, index=pd.Index(cell_ids, name="cell_id"))

    px = cfg.pixel_size_um
    extent = xy.max(axis=0) + cfg.margin_um + cfg.jitter_um
    width, height = int(math.ceil(extent[0] / px)), int(math.ceil(extent[1] / px))
    shapes = CellShapes(xy[:, 0], xy[:, 1], na, nb, ma, mb, orient, dapi,
                        np.array([s.texture for s in specs]), memb)
    image = render_cells(shapes, height, width, px, np.random.default_rng([seed, 2, i])) if render else \
        np.lib.stride_tricks.as_strided(np.zeros(1, np.uint16), (2, height, width), (0, 0, 0))
    section_gt = {**gt, "section_index": i, "section_labels": labels}
    return Section(
        sample_id=sample_id, counts=sp.csr_matrix(counts), genes=list(prog.genes), cell_ids=cell_ids,
        centroids_um=xy, image=image, pixel_size_um=px, channel_names=list(CHANNELS), obs=obs,
        label_keys=list(LABEL_KEYS), section_labels=labels, technology="synthetic",
        uns={GROUND_TRUTH_KEY: section_gt},
    )


def make_synthetic_tissue(n_sections: int = 2, n_cells: int = 2000, seed: int = 0, *,
                          config: SyntheticConfig | None = None, progress: bool = False, render: bool = True,
                          **overrides) -> list[Section]:
    """``n_sections`` synthetic sections of ``n_cells`` cells each, deterministic per ``seed``.

    ``overrides`` set fields of :class:`SyntheticConfig` (e.g. ``n_genes=300``, ``pixel_size_um=0.2125``).
    ``render=False`` skips painting the image (an all-zero image of the right shape; for benchmarks
    that read the image from a file written earlier). Sections alternate ``condition`` (healthy,
    disease) and change ``tissue`` every two sections.
    """
    if n_sections < 1 or n_cells < 1:
        raise ValueError(f"n_sections={n_sections}, n_cells={n_cells}: expected at least 1 of each")
    cfg = SyntheticConfig(**{**asdict(config or SyntheticConfig()), **overrides})
    cfg.check()
    prog = _programme(cfg, seed)
    gt = _ground_truth(prog, cfg, seed)
    from tqdm.auto import tqdm

    return [_simulate_section(i, n_cells, seed, cfg, prog, gt, render=render)
            for i in tqdm(range(n_sections), desc="synthetic sections", disable=not progress)]


def make_synthetic_sections(n_sections: int = 2, n_cells: int = 200, seed: int = 0, **kwargs) -> list[Section]:
    """In-memory synthetic Sections (no disk) with small defaults, for tests and quick experiments."""
    return make_synthetic_tissue(n_sections, n_cells, seed, **kwargs)


def _write_h5ad(section: Section, path: Path, image_name: str) -> None:
    import anndata as ad

    px = section.pixel_size_um
    adata = ad.AnnData(
        X=section.counts_csr().astype(np.int32),
        obs=section.obs.copy(),
        var=pd.DataFrame(index=pd.Index(section.genes, name="gene")),
    )
    adata.obsm["spatial"] = np.asarray(section.centroids_um, dtype=np.float64) / px  # pixels (x=col, y=row)
    adata.uns[PIXEL_SIZE_KEY] = float(px)
    adata.uns["sample_id"] = section.sample_id
    adata.uns["section_labels"] = dict(section.section_labels)
    adata.uns["label_keys"] = list(section.label_keys)
    adata.uns["technology"] = section.technology
    adata.uns["image_file"] = image_name
    adata.uns["channel_names"] = list(section.channel_names or CHANNELS)
    adata.uns[GROUND_TRUTH_KEY] = json.dumps(section.uns[GROUND_TRUTH_KEY])
    adata.write_h5ad(path)


def write_ome_tiff(image: np.ndarray, path: Path, pixel_size_um: float, channel_names: Sequence[str]) -> None:
    """A tiled (C, Y, X) OME-TIFF with the physical pixel size and channel names."""
    import tifffile

    tifffile.imwrite(
        path, image, ome=True, photometric="minisblack", tile=(256, 256),
        metadata={"axes": "CYX", "PhysicalSizeX": float(pixel_size_um), "PhysicalSizeXUnit": "µm",
                  "PhysicalSizeY": float(pixel_size_um), "PhysicalSizeYUnit": "µm",
                  "Channel": {"Name": list(channel_names)}},
    )


def load_ground_truth(source) -> dict:
    """Ground truth of a synthetic section from an ``.h5ad`` path, an AnnData, a Section, or a
    built dataset folder (first section's ``sections.json`` entry)."""
    if isinstance(source, Section):
        return source.uns[GROUND_TRUTH_KEY]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        info = json.loads((Path(source) / "sections.json").read_text())
        return info["sections"][0]["uns"][GROUND_TRUTH_KEY]
    if isinstance(source, (str, Path)):
        import anndata as ad

        source = ad.read_h5ad(source, backed="r")
    value = source.uns[GROUND_TRUTH_KEY]
    return json.loads(value) if isinstance(value, str) else value


def _stale_sections(out: Path):
    """``stale=`` rule for :func:`write_synthetic`: the section files an earlier manifest in ``out`` lists."""
    try:
        named = {Path(e[k]) for e in read_json(out / MANIFEST)["sections"] for k in ("h5ad", "image")}
    except (OSError, ValueError, KeyError, TypeError):
        named = set()
    return lambda rel: rel in named


@respects_progress
def write_synthetic(out_dir: str | Path, n_sections: int = 2, n_cells: int = 2000, seed: int = 0, *,
                    overwrite: bool = False, progress: bool = True, **overrides) -> list[dict]:
    """Write ``<sample_id>.h5ad`` + ``<sample_id>.ome.tif`` per section and ``synthetic.json``.

    The folder is assembled in a temporary sibling and moved into place when complete; over an existing
    folder (``overwrite=True``) only its files are replaced, and the sections its old ``synthetic.json``
    lists are removed. Returns the manifest entries (paths relative to ``out_dir``).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists. Fix: choose another folder or pass overwrite=True "
                              "(CLI: --overwrite)")
    cfg = SyntheticConfig(**{**asdict(SyntheticConfig()), **overrides})
    cfg.check()
    prog = _programme(cfg, seed)
    gt = _ground_truth(prog, cfg, seed)
    entries = []
    with staged_dir(out, stale=_stale_sections(out)) as tmp:
        for i in tqdm(range(n_sections), desc="synthetic sections", disable=not progress):
            s = _simulate_section(i, n_cells, seed, cfg, prog, gt)
            h5, tif = f"{s.sample_id}.h5ad", f"{s.sample_id}.ome.tif"
            write_ome_tiff(s.image, tmp / tif, s.pixel_size_um, s.channel_names)
            _write_h5ad(s, tmp / h5, tif)
            entries.append({"sample_id": s.sample_id, "h5ad": h5, "image": tif, "n_cells": s.n_cells,
                            "image_shape": list(s.image.shape), "pixel_size_um": s.pixel_size_um,
                            "section_labels": s.section_labels})
        manifest = {"seed": seed, "n_sections": n_sections, "n_cells": n_cells, "n_genes": len(prog.genes),
                    "pixel_size_um": cfg.pixel_size_um, "config": asdict(cfg), "sections": entries,
                    "ground_truth": gt}
        write_json(tmp / MANIFEST, manifest)
    return entries


def build_tiny_dataset(out_dir: str | Path, n_sections: int = 2, n_cells: int = 200, seed: int = 0, *,
                       crop_px: int = 32, niche_px: int = 32, thumb_px: int = 64, **synth_kwargs) -> Path:
    """A complete small multi-scale dataset (cells / niches / tissues + card + gene panel) in seconds,
    for tests of models, training and evaluation. Rebuilds ``out_dir`` if it exists."""
    from .builder import build_multiscale_dataset

    sections = make_synthetic_sections(n_sections, n_cells, seed, **synth_kwargs)
    return build_multiscale_dataset(sections, out_dir, crop_px=crop_px, niche_px=niche_px, thumb_px=thumb_px,
                                    overwrite=True, progress=False)
