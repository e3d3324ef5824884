"""Tools in scanpy's style: AnnData in, results written into named slots.

``spatia_hf.tl.embed(adata, image, model)`` adds SPATIA cell embeddings (``obsm["X_spatia"]``),
niche-aware embeddings (``obsm["X_spatia_niche"]``) and spatial domains (``obs["spatia_domain"]``)
to an AnnData that has raw counts and ``obsm["spatial"]``, leaving everything else as it was.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.readers.anndata_reader import read_anndata
from spatia_hf.utils.progress import respects_progress


def load_model_and_processor(model: Any, device: Any = "cpu"):
    """A folder / Hub id, a ``SpatiaModel`` or any SPATIA task model -> (``SpatiaModel``, ``SpatiaProcessor``).

    A Hub id is downloaded once into the Hub cache (offline: read from it; not cached: one-line error
    with the fix). The processor comes from the checkpoint's ``spatia_processor.json``; a checkpoint
    without one (or an in-memory model) gets the processor defaults for its config, with a warning,
    since its normalisation may differ from what the model was trained with.
    """
    from .models.modeling_spatia import SpatiaModel
    from .models.processing_spatia import PROCESSOR_FILE, SpatiaProcessor
    from .utils.hub_ids import resolve_folder

    if isinstance(model, (str, Path)):
        folder = resolve_folder(model, what="model", required=("config.json",))
        loaded = SpatiaModel.from_pretrained(folder)
        if (folder / PROCESSOR_FILE).is_file():
            processor = SpatiaProcessor.from_pretrained(folder)
        else:
            warnings.warn(f"model {str(model)!r} has no {PROCESSOR_FILE}: using the processor defaults for its "
                          "config (log1p of counts scaled to 10,000, images (x/255-0.5)/0.5). Fix: save the "
                          "processor it was trained with beside the weights (processor.save_pretrained(folder))",
                          UserWarning, stacklevel=3)
            processor = SpatiaProcessor.from_config(loaded.config)
        model = loaded
    else:
        model = getattr(model, "spatia", model)
        if not isinstance(model, SpatiaModel):
            raise TypeError(f"model: expected a SpatiaModel (or a SPATIA task model), a folder or a Hub id, got "
                            f"{type(model).__name__}")
        warnings.warn("model given as an object: using the processor defaults for its config. Fix: pass the "
                      "checkpoint folder or Hub id so its saved processor is used", UserWarning, stacklevel=3)
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
    n_domains: int = 5,
    cluster_method: str = "auto",
    crop_um: float | None = None,
    niche_um: float | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
    seed: int = 0,
    copy: bool = False,
    progress: bool = True,
    min_gene_coverage: float | None = None,
    check_units: bool = True,
):
    """Embed every cell of ``adata`` with SPATIA and write the results into it.

    Args:
        adata: AnnData with raw counts in ``X`` (or ``layer``) and centroids in ``obsm[spatial_key]``.
        image: the section's morphology image: a path (``.tif``/``.ome.tif``) or a ``(C, H, W)`` array.
        model: a SPATIA checkpoint path / Hub id or a loaded model.
        pixel_size_um: µm per image pixel (default from ``uns`` or the OME metadata).
        spatial_units: ``"px"`` when ``obsm[spatial_key]`` is in pixels of ``image`` (scanpy/squidpy's
            convention, and ``spatia synth``'s), ``"um"`` when in µm (spatialdata-io's Xenium and MERSCOPE
            tables). Centroids that fall off the image, or crowd into a small corner where the other unit
            would fit, are refused with the other unit named; ``check_units=False`` skips that check.
        n_domains: number of spatial domains clustered from the niche-aware embedding.
        cluster_method: ``"auto"`` (Leiden when installed, else k-means), ``"leiden"`` or ``"kmeans"``.
        crop_um / niche_um: crop and niche sizes in µm (default: the builder's defaults).
        copy: return a modified copy instead of writing into ``adata``.
        min_gene_coverage: refuse the AnnData when less than this fraction of its genes is in the model
            vocabulary, naming the first unknown genes (default: the processor's ``min_coverage``, 0.5).
            Genes match by Ensembl id (``var["gene_ids"]``) where both sides have one, else by symbol.

    Returns:
        None, or the annotated copy when ``copy=True``. Also sets ``uns["spatia"]`` (parameters and the
        gene-panel coverage against the model's vocabulary).
    """
    from spatia_hf.evaluation.tasks import cluster
    from spatia_hf.inference import embed_dataset

    if adata.n_obs < 2:  # fail before any work, not in the domain clustering at the end
        raise ValueError(f"adata: {adata.n_obs} cell(s); spatial domains are clustered from at least 2 cells. Fix: "
                         "embed a whole section (all its cells in one AnnData)")
    adata = adata.copy() if copy else adata
    spatia_model, processor = load_model_and_processor(model, device)
    section = read_anndata(adata, image, pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units,
                           layer=layer, label_keys=[], check_units=check_units)
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
    adata.obsm[niche_key_added] = emb.cells_in_niche[order]
    k = int(min(n_domains, max(2, adata.n_obs - 1)))
    domains, used = cluster(adata.obsm[niche_key_added], k, method=cluster_method, seed=seed)
    adata.obs[domain_key_added] = np.asarray(domains).astype(str)
    adata.obs[domain_key_added] = adata.obs[domain_key_added].astype("category")
    adata.uns["spatia"] = {
        "params": {"key_added": key_added, "niche_key_added": niche_key_added, "domain_key_added": domain_key_added,
                   "n_domains": k, "cluster_method": used, "seed": seed, "model": str(getattr(
                       spatia_model.config, "_name_or_path", "")) or "in-memory"},
        "gene_coverage": _jsonable(emb.gene_coverage),
    }
    return adata if copy else None


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
