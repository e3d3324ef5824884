"""Tools in scanpy's style: AnnData in, results written into named slots.

``spatia_hf.tl.embed(adata, image, model)`` adds SPATIA cell embeddings (``obsm["X_spatia"]``),
the niche embedding of each cell's own neighbourhood (``obsm["X_spatia_niche"]``) and spatial
domains (``obs["spatia_domain"]``) to an AnnData that has raw counts and ``obsm["spatial"]``, leaving
everything else as it was. ``spatia_hf.tl.domains`` clusters any embedding into spatial domains
(Leiden on scanpy's neighbour graph, at a resolution or a searched target number of domains).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import math

import numpy as np

from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.readers.anndata_reader import read_anndata
from spatia_hf.utils.progress import respects_progress


def load_model_and_processor(model: Any, device: Any = "cpu"):
    """A path / Hub id, a ``SpatiaModel`` or any SPATIA task model -> (``SpatiaModel``, ``SpatiaProcessor``)."""
    from .models.modeling_spatia import SpatiaModel
    from .models.processing_spatia import SpatiaProcessor

    if isinstance(model, (str, Path)):
        path = model
        model = SpatiaModel.from_pretrained(path)
        try:
            processor = SpatiaProcessor.from_pretrained(path)
        except (OSError, FileNotFoundError):
            processor = SpatiaProcessor.from_config(model.config)
    else:
        model = getattr(model, "spatia", model)
        processor = SpatiaProcessor.from_config(model.config)
    if not isinstance(model, SpatiaModel):
        raise TypeError(f"model: expected a SpatiaModel (or a SPATIA task model), got {type(model).__name__}")
    return model.to(device).eval(), processor


@respects_progress
def embed(
    adata,
    image: Any,
    model: Any,
    *,
    pixel_size_um: float | None = None,
    spatial_key: str = "spatial",
    spatial_units: str = "px",
    layer: str | None = None,
    key_added: str = "X_spatia",
    niche_key_added: str = "X_spatia_niche",
    domain_key_added: str = "spatia_domain",
    n_domains: int | None = None,
    resolution: float | None = None,
    cluster_method: str = "leiden",
    crop_um: float | None = None,
    niche_um: float | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
    seed: int = 0,
    copy: bool = False,
    progress: bool = True,
    min_gene_coverage: float | None = None,
):
    """Embed every cell of ``adata`` with SPATIA and write the results into it.

    Args:
        adata: AnnData with raw counts in ``X`` (or ``layer``) and centroids in ``obsm[spatial_key]``.
        image: the section's morphology image: a path (``.tif``/``.ome.tif``) or a ``(C, H, W)`` array.
        model: a SPATIA checkpoint path / Hub id or a loaded model.
        pixel_size_um: µm per image pixel (default from ``uns`` or the OME metadata).
        spatial_units: ``"px"`` when ``obsm[spatial_key]`` is in image pixels, ``"um"`` when in µm.
        n_domains: target number of spatial domains: Leiden's resolution is searched to give it
            (k-means uses it directly). Give this or ``resolution``; neither = Leiden at resolution 1.
        resolution: Leiden resolution (higher = more domains); see :func:`domains`.
        cluster_method: ``"leiden"`` (default, on a 50-neighbour graph of ``obsm[niche_key_added]``) or
            ``"kmeans"`` (needs ``n_domains``).
        crop_um / niche_um: crop and niche sizes in µm (default: the builder's defaults).
        copy: return a modified copy instead of writing into ``adata``.
        min_gene_coverage: refuse the AnnData when less than this fraction of its genes is in the model
            vocabulary, naming the first unknown genes (default: the processor's ``min_coverage``, 0.5).
            Genes match by Ensembl id (``var["gene_ids"]``) where both sides have one, else by symbol.

    Returns:
        None, or the annotated copy when ``copy=True``. Also sets ``uns["spatia"]`` (parameters and the
        gene-panel coverage against the model's vocabulary).
    """
    from spatia_hf.inference import embed_dataset

    _check_domain_args(n_domains, resolution, cluster_method)
    if adata.n_obs < 2:  # fail before any work, not in the domain clustering at the end
        raise ValueError(f"adata: {adata.n_obs} cell(s); spatial domains are clustered from at least 2 cells. Fix: "
                         "embed a whole section (all its cells in one AnnData)")
    adata = adata.copy() if copy else adata
    spatia_model, processor = load_model_and_processor(model, device)
    section = read_anndata(adata, image, pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units,
                           layer=layer, label_keys=[])
    processor.map_panel(section.genes, section.gene_ids, min_coverage=min_gene_coverage)  # refuse before building
    sizes = {k: v for k, v in {"crop_um": crop_um, "niche_um": niche_um}.items() if v is not None}
    image_size = spatia_model.config.cell_config.image_size
    with tempfile.TemporaryDirectory(prefix="spatia-embed-") as tmp:
        dataset_dir = build_multiscale_dataset([section], Path(tmp) / "dataset", crop_px=image_size,
                                               progress=progress, **sizes)
        emb = embed_dataset(spatia_model, processor, dataset_dir, modalities=("fused",), niche_aware=True,
                            tissue=False, batch_size=batch_size, seed=seed, progress=progress,
                            min_gene_coverage=min_gene_coverage)
    order = _positions(emb.cell_ids, adata.obs_names)
    adata.obsm[key_added] = emb.cells["fused"][order]
    adata.obsm[niche_key_added] = emb.cell_niches[order]
    found = domains(adata, use_rep=niche_key_added, n_domains=n_domains, resolution=resolution,
                    method=cluster_method, key_added=domain_key_added, seed=seed)
    niche_cfg = spatia_model.config.niche_config
    adata.uns["spatia"] = {
        "params": {"key_added": key_added, "niche_key_added": niche_key_added, "domain_key_added": domain_key_added,
                   "niche": "cell-centred", "num_neighbours": niche_cfg.num_neighbours,
                   "neighbour_radius_um": niche_cfg.neighbour_radius_um, **found, "seed": seed,
                   "model": str(getattr(
                       spatia_model.config, "_name_or_path", "")) or "in-memory"},
        "gene_coverage": _jsonable(emb.gene_coverage),
    }
    return adata if copy else None


def _check_domain_args(n_domains, resolution, method) -> None:
    if method not in ("leiden", "kmeans"):
        raise ValueError(f"cluster_method={method!r}: expected 'leiden' or 'kmeans'")
    if n_domains is not None and resolution is not None:
        raise ValueError(f"n_domains={n_domains} and resolution={resolution}: give one (n_domains searches the "
                         "resolution)")
    if n_domains is not None and n_domains < 1:
        raise ValueError(f"n_domains={n_domains}: expected a positive number of domains")
    if resolution is not None and not resolution > 0:
        raise ValueError(f"resolution={resolution}: expected a positive Leiden resolution (e.g. 1.0)")
    if method == "kmeans" and n_domains is None:
        raise ValueError("cluster_method='kmeans' needs n_domains. Fix: pass n_domains (or use Leiden)")


def domains(adata, *, use_rep: str = "X_spatia_niche", n_domains: int | None = None, resolution: float | None = None,
            method: str = "leiden", n_neighbors: int = 50, key_added: str = "spatia_domain", seed: int = 0,
            max_search_steps: int = 20) -> dict:
    """Spatial domains from a niche embedding, written to ``obs[key_added]`` (categorical).

    Leiden (igraph flavour, 2 iterations, undirected) on scanpy's ``n_neighbors`` graph of
    ``obsm[use_rep]`` (50 by default, not scanpy's 15: neighbourhood embeddings vary smoothly in
    space, and on a 15-neighbour graph Leiden split domains along those gradients; issue 16 note). Leiden's domain count follows the resolution, not a requested number, so with
    ``n_domains`` the resolution is bisected (log scale, at most ``max_search_steps`` runs on the one
    graph) to the count closest to it (the lowest such resolution on ties). ``method="kmeans"``
    runs k-means with ``n_domains`` clusters instead. The graph goes to ``obsp``/``uns`` under
    ``f"{key_added}_neighbors"``.

    Returns:
        ``{"cluster_method", "resolution", "n_domains", "n_domains_requested"}`` (also the params recorded).
    """
    import scanpy as sc

    _check_domain_args(n_domains, resolution, method)
    x = np.asarray(adata.obsm[use_rep])
    if method == "kmeans":
        from sklearn.cluster import KMeans

        k = int(min(n_domains, adata.n_obs))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        _write_labels(adata, key_added, labels)
        return {"cluster_method": "kmeans", "resolution": None, "n_domains": int(k), "n_domains_requested": n_domains}
    graph_key = f"{key_added}_neighbors"
    sc.pp.neighbors(adata, n_neighbors=int(min(n_neighbors, max(2, adata.n_obs - 1))), use_rep=use_rep,
                    key_added=graph_key, random_state=seed)

    def run(res: float) -> np.ndarray:
        sc.tl.leiden(adata, resolution=res, flavor="igraph", n_iterations=2, directed=False, random_state=seed,
                     neighbors_key=graph_key, key_added=key_added)
        return adata.obs[key_added].astype(int).to_numpy()

    if n_domains is None:
        res = 1.0 if resolution is None else float(resolution)
        labels = run(res)
    else:
        res, labels = _search_resolution(run, int(n_domains), max_search_steps)
    _write_labels(adata, key_added, labels)
    return {"cluster_method": "leiden", "resolution": float(res), "n_domains": int(np.unique(labels).size),
            "n_domains_requested": n_domains}


def _search_resolution(run, target: int, steps: int) -> tuple[float, np.ndarray]:
    """Bisect log(resolution) in [1e-3, 10] for ``target`` Leiden clusters; the closest count wins."""
    lo, hi = math.log(1e-3), math.log(10.0)
    best_res, best = 1.0, run(1.0)
    for _ in range(steps):
        if np.unique(best).size == target:
            break
        mid = 0.5 * (lo + hi)
        labels = run(math.exp(mid))
        k = np.unique(labels).size
        if abs(k - target) < abs(np.unique(best).size - target) or (
                abs(k - target) == abs(np.unique(best).size - target) and math.exp(mid) < best_res):
            best_res, best = math.exp(mid), labels
        lo, hi = (mid, hi) if k < target else (lo, mid)
    return best_res, best


def _write_labels(adata, key: str, labels: np.ndarray) -> None:
    adata.obs[key] = np.asarray(labels).astype(str)
    adata.obs[key] = adata.obs[key].astype("category")


def _positions(cell_ids: np.ndarray, obs_names) -> np.ndarray:
    """Index into ``cell_ids`` for every obs name (the builder keeps every cell, so all are found)."""
    where = {c: i for i, c in enumerate(cell_ids.tolist())}
    missing = [n for n in obs_names if n not in where]
    if missing:
        raise ValueError(f"{len(missing)} cells were not embedded (first: {missing[:5]}); check that their "
                         "centroids lie inside the image")
    return np.asarray([where[n] for n in obs_names], dtype=np.int64)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
