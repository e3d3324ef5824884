"""Tools in scanpy's style: AnnData in, results written into named slots.

``spatia_hf.tl.embed(adata, image, model)`` adds SPATIA cell embeddings (``obsm["X_spatia"]``),
the niche embedding of each cell's own neighbourhood (``obsm["X_spatia_niche"]``: its composition
over the model's cell states) and spatial domains (``obs["spatia_domain"]``) to an AnnData that has
raw counts and ``obsm["spatial"]``, leaving everything else as it was. ``spatia_hf.tl.domains``
clusters any embedding into spatial domains (Leiden on scanpy's neighbour graph, at a resolution or
a searched target number of domains, refined to the domains' centres).
``annotate`` writes cell types from a fine-tuned annotation head into ``obs``, ``impute`` predicted
expression from a fine-tuned imputation head into a layer, and ``to_spatialdata`` turns the result into a
SpatialData object for that ecosystem. Like scanpy: ``copy=False`` writes in place and returns None.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from spatia_hf.data import schema
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
    check_units: bool = True,
):
    """Embed every cell of ``adata`` with SPATIA and write the results into it.

    Writes ``obsm[key_added]`` (cell embeddings), ``obsm[niche_key_added]`` (the niche embedding of
    each cell's neighbourhood: its composition over the model's cell states, rows summing to 1, or
    the pooled niche token for a model without cell states; with cell states the pooled token goes
    to ``obsm[niche_key_added + "_token"]``) and ``obs[domain_key_added]`` (:func:`domains`).

    Args:
        adata: AnnData with raw counts in ``X`` (or ``layer``) and centroids in ``obsm[spatial_key]``.
        image: the section's morphology image: a path (``.tif``/``.ome.tif``) or a ``(C, H, W)`` array.
        model: a SPATIA checkpoint path / Hub id or a loaded model.
        pixel_size_um: µm per image pixel (default from ``uns`` or the OME metadata).
        spatial_units: ``"px"`` when ``obsm[spatial_key]`` is in pixels of ``image`` (scanpy/squidpy's
            convention, and ``spatia synth``'s), ``"um"`` when in µm (spatialdata-io's Xenium and MERSCOPE
            tables). Centroids that fall off the image, or crowd into a small corner where the other unit
            would fit, are refused with the other unit named; ``check_units=False`` skips that check.
        n_domains: target number of spatial domains: Leiden's resolution is searched to give it
            (k-means uses it directly). Give this or ``resolution``; neither = Leiden at resolution 1.
        resolution: Leiden resolution (higher = more domains); see :func:`domains`.
        cluster_method: ``"leiden"`` (default, on a 50-neighbour graph of ``obsm[niche_key_added]``, a
            composition compared by the Hellinger distance, its domains refined to their centres) or
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
    from spatia_hf.inference import describe_niche_embedding, embed_dataset

    _check_domain_args(n_domains, resolution, cluster_method)
    if adata.n_obs < 2:  # fail before any work, not in the domain clustering at the end
        raise ValueError(f"adata: {adata.n_obs} cell(s); spatial domains are clustered from at least 2 cells. Fix: "
                         "embed a whole section (all its cells in one AnnData)")
    adata = adata.copy() if copy else adata
    spatia_model, processor = load_model_and_processor(model, device)
    reading = dict(pixel_size_um=pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units, layer=layer,
                   check_units=check_units, crop_um=crop_um, niche_um=niche_um)
    with _section_dataset(adata, image, processor, spatia_model.config, min_gene_coverage, progress,
                          **reading) as dataset_dir:
        emb = embed_dataset(spatia_model, processor, dataset_dir, modalities=("fused",), niche_aware=True,
                            tissue=False, batch_size=batch_size, seed=seed, progress=progress,
                            min_gene_coverage=min_gene_coverage)
    order = _positions(emb.cell_ids, adata.obs_names)
    adata.obsm[key_added] = emb.cells["fused"][order]
    adata.obsm[niche_key_added] = emb.cell_niches[order]
    if emb.cell_state_source is not None:  # the niche embedding is the composition; keep the pooled token too
        adata.obsm[f"{niche_key_added}_token"] = emb.cell_niche_tokens[order]
    found = domains(adata, use_rep=niche_key_added, n_domains=n_domains, resolution=resolution,
                    method=cluster_method, key_added=domain_key_added, seed=seed)
    niche_cfg = spatia_model.config.niche_config
    adata.uns["spatia"] = {
        "params": {"key_added": key_added, "niche_key_added": niche_key_added, "domain_key_added": domain_key_added,
                   "niche": "cell-centred", "num_neighbours": niche_cfg.num_neighbours,
                   "niche_embedding": describe_niche_embedding(niche_cfg, emb.cell_state_source),
                   "neighbour_radius_um": niche_cfg.neighbour_radius_um, **found, "seed": seed,
                   "model": str(getattr(
                       spatia_model.config, "_name_or_path", "")) or "in-memory"},
        "gene_coverage": _jsonable(emb.gene_coverage),
    }
    return adata if copy else None


@contextlib.contextmanager
def _section_dataset(adata, image: Any, processor, config, min_gene_coverage: float | None, progress: bool, *,
                     pixel_size_um: float | None, spatial_key: str, spatial_units: str, layer: str | None,
                     check_units: bool, crop_um: float | None = None, niche_um: float | None = None
                     ) -> Iterator[Path]:
    """The AnnData + image as a one-section dataset in a temporary folder (crops at the model's size),
    after the units check and the gene-panel check, so every tool reads cells as training did."""
    section = read_anndata(adata, image, pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units,
                           layer=layer, label_keys=[], check_units=check_units)
    processor.map_panel(section.genes, section.gene_ids, min_coverage=min_gene_coverage)  # refuse before building
    sizes = {k: v for k, v in {"crop_um": crop_um, "niche_um": niche_um}.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="spatia-tl-") as tmp:
        yield build_multiscale_dataset([section], Path(tmp) / "dataset", crop_px=config.cell_config.image_size,
                                       progress=progress, **sizes)


def _load_head(model: Any, architecture: str, task: str, device: Any):
    """A fine-tuned SPATIA head (folder / Hub id, or the loaded model) and its saved processor."""
    import spatia_hf

    from .models.processing_spatia import PROCESSOR_FILE, SpatiaProcessor
    from .utils.hub_ids import resolve_folder

    if not isinstance(model, (str, Path)):
        if type(model).__name__ != architecture:
            raise TypeError(f"model: expected a {architecture}, got {type(model).__name__}. Fix: pass the folder "
                            f"written by `spatia finetune --task {task}`")
        return model.to(device).eval(), SpatiaProcessor.from_config(model.config)
    folder = resolve_folder(model, what="model", required=("config.json",))
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or ["SpatiaModel"]
    if archs[0] != architecture:
        raise ValueError(f"model {str(model)!r} is a {archs[0]}, not a {architecture}. Fix: fine-tune one with "
                         f"`spatia finetune --task {task} --model PRETRAINED ...` and pass its output folder")
    head = getattr(spatia_hf, architecture).from_pretrained(folder)
    if not (folder / PROCESSOR_FILE).is_file():
        raise FileNotFoundError(f"model {str(model)!r} has no {PROCESSOR_FILE}. Fix: save the processor it was "
                                "trained with beside the weights (processor.save_pretrained(folder))")
    return head.to(device).eval(), SpatiaProcessor.from_pretrained(folder)


def _cell_batches(dataset_dir: Path, batch_size: int, desc: str, progress: bool) -> Iterator[dict]:
    """Rows of the dataset's ``cells`` config in batches (cell id, image, sparse counts)."""
    from tqdm.auto import tqdm

    from .data.datasets import load_spatia_dataset

    cells = load_spatia_dataset(dataset_dir, configs=("cells",)).configs["cells"]
    view = cells.select_columns([schema.CELL_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS]
                                ).with_format("numpy")
    for start in tqdm(range(0, len(cells), batch_size), desc=desc, disable=not progress):
        yield view[start: start + batch_size]


@respects_progress
def annotate(adata, image: Any, model: Any, *, pixel_size_um: float | None = None, spatial_key: str = "spatial",
             spatial_units: str = "px", layer: str | None = None, key_added: str = "spatia_cell_type",
             batch_size: int = 64, device: Any = "cpu", seed: int = 0, copy: bool = False, progress: bool = True,
             min_gene_coverage: float | None = None, check_units: bool = True):
    """Cell types from a fine-tuned annotation head (``spatia finetune --task annotation``) into ``obs``.

    Reads the AnnData and image as :func:`embed` does (same arguments, same unit and gene-panel checks)
    and writes ``obs[key_added]`` (categorical, the head's label names) and
    ``obs[key_added + "_probability"]`` (softmax probability of that label). Each cell is classified
    from its own crop and expression (the cell head, as evaluation task 3 scores it).

    Returns:
        None, or the annotated copy when ``copy=True``.
    """
    import pandas as pd
    import torch

    from .inference import encode_cells

    adata = adata.copy() if copy else adata
    head, processor = _load_head(model, "SpatiaForCellClassification", "annotation", device)
    dev = next(head.parameters()).device
    id2label = {int(k): str(v) for k, v in head.config.id2label.items()}
    ids, labels, probs = [], [], []
    reading = dict(pixel_size_um=pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units, layer=layer,
                   check_units=check_units)
    with _section_dataset(adata, image, processor, head.config, min_gene_coverage, progress, **reading) as ds:
        for rows in _cell_batches(ds, batch_size, "cell types", progress):
            enc = {k: v.to(dev) for k, v in encode_cells(processor, rows, "fused", seed).items()}
            with torch.no_grad():
                p = head(**enc, return_dict=True).logits.float().softmax(-1).cpu().numpy()
            ids.extend(str(c) for c in rows[schema.CELL_ID])
            labels.extend(id2label[int(i)] for i in p.argmax(-1))
            probs.append(p.max(-1))
    order = _positions(np.asarray(ids), adata.obs_names)
    adata.obs[key_added] = pd.Categorical(np.asarray(labels)[order], categories=sorted(set(id2label.values())))
    adata.obs[f"{key_added}_probability"] = np.concatenate(probs)[order].astype(np.float32)
    adata.uns.setdefault("spatia", {})["annotate"] = {"key_added": key_added, "seed": seed, "model": str(
        getattr(head.config, "_name_or_path", "")) or "in-memory", "labels": sorted(set(id2label.values()))}
    return adata if copy else None


@respects_progress
def impute(adata, image: Any, model: Any, genes: Sequence[str], *, pixel_size_um: float | None = None,
           spatial_key: str = "spatial", spatial_units: str = "px", layer: str | None = None,
           layer_added: str = "spatia_imputed", key_added: str = "X_spatia_imputed", batch_size: int = 64,
           device: Any = "cpu", seed: int = 0, copy: bool = False, progress: bool = True,
           min_gene_coverage: float | None = None, check_units: bool = True):
    """Expression of ``genes`` predicted by a fine-tuned imputation head (``spatia finetune --task imputation``).

    The genes are hidden from the input (neither counted in a cell's library nor input as zeros) and
    predicted from the rest of its expression and its crop, as log1p of counts scaled to the
    processor's ``target_sum`` (10,000 by default). Genes measured in ``adata`` get their predictions in
    ``layers[layer_added]`` (NaN in every other column); every requested gene, measured or not, is in
    ``obsm[key_added]`` (a DataFrame with one column per gene). Genes outside the model's vocabulary are
    refused by name.

    Returns:
        None, or the annotated copy when ``copy=True``.
    """
    import pandas as pd
    import torch

    from .evaluation.spatia_methods import hiding_processor
    from .inference import encode_cells

    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        raise ValueError(f"genes={genes!r}: expected a non-empty list of distinct gene names")
    adata = adata.copy() if copy else adata
    head, processor = _load_head(model, "SpatiaForGeneImputation", "imputation", device)
    dev = next(head.parameters()).device
    target = copy_module.copy(processor).map_panel(genes, min_coverage=0.0)
    if target.unknown:
        raise ValueError(f"genes: {target.unknown[:10]} are not in the model's vocabulary, so it cannot predict "
                         f"them. Fix: pick genes among its {len(processor.gene_vocab)} vocabulary genes "
                         "(processor.gene_vocab)")
    ids, preds = [], []
    reading = dict(pixel_size_um=pixel_size_um, spatial_key=spatial_key, spatial_units=spatial_units, layer=layer,
                   check_units=check_units)
    with _section_dataset(adata, image, processor, head.config, min_gene_coverage, progress, **reading) as ds:
        panel = processor.panel.genes
        hidden = np.asarray([panel.index(g) for g in genes if g in panel], dtype=np.int64)
        proc = hiding_processor(processor, hidden) if hidden.size else processor
        target_ids = torch.as_tensor(target.vocab_ids, device=dev)
        for rows in _cell_batches(ds, batch_size, "imputation", progress):
            rows = _without_columns(rows, hidden)
            enc = {k: v.to(dev) for k, v in encode_cells(proc, rows, "fused", seed).items()}
            targets = target_ids[None].expand(len(rows[schema.CELL_ID]), -1)
            with torch.no_grad():
                out = head(enc["gene_ids"], enc["gene_values"], targets, gene_attention_mask=enc["gene_attention_mask"],
                           pixel_values=enc["pixel_values"], return_dict=True).logits
            ids.extend(str(c) for c in rows[schema.CELL_ID])
            preds.append(out.float().cpu().numpy())
    values = np.concatenate(preds)[_positions(np.asarray(ids), adata.obs_names)].astype(np.float32)
    adata.obsm[key_added] = pd.DataFrame(values, index=adata.obs_names, columns=genes)
    measured = [g for g in genes if g in adata.var_names]
    if measured:
        full = np.full(adata.shape, np.nan, dtype=np.float32)
        full[:, adata.var_names.get_indexer(measured)] = values[:, [genes.index(g) for g in measured]]
        adata.layers[layer_added] = full
    adata.uns.setdefault("spatia", {})["impute"] = {
        "genes": genes, "measured_genes": measured, "layer_added": layer_added if measured else None,
        "key_added": key_added, "units": f"log1p(counts / library * {processor.target_sum:g})", "seed": seed}
    return adata if copy else None


def to_spatialdata(adata, path: str | Path | None = None, *, spatial_key: str = "spatial",
                   spatial_units: str = "px", pixel_size_um: float | None = None, region: str = "cells",
                   cell_diameter_um: float = 10.0, overwrite: bool = False):
    """The AnnData (with what ``embed`` / ``annotate`` / ``impute`` wrote) as a SpatialData object.

    Cells become circles (``cell_diameter_um``) at their centroids in µm in the ``global`` coordinate
    system, and the AnnData the table annotating them (``obs["region"]`` / ``obs["instance_id"]``), so
    ``spatialdata-plot`` and napari-spatialdata show SPATIA's domains, labels and embeddings on the cells.
    Needs the ``spatialdata`` extra (``pip install 'spatia-hf[spatialdata]'``).

    Args:
        path: a ``.zarr`` folder to write (atomically: written beside it, then renamed); None only returns.
        spatial_units / pixel_size_um: what ``obsm[spatial_key]`` holds; pixels need the pixel size.
    """
    import os
    import shutil

    import pandas as pd

    from .data.readers.spatialdata_reader import _require_spatialdata

    _require_spatialdata()
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    if spatial_key not in adata.obsm:
        raise ValueError(f"adata: obsm[{spatial_key!r}] is missing (obsm has {list(adata.obsm)}). Fix: store the "
                         "cell centroids there or name the key with spatial_key")
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if spatial_units == "px":
        px = pixel_size_um if pixel_size_um is not None else adata.uns.get("spatial_pixel_size_um")
        if px is None:
            raise ValueError("spatial_units='px' needs the pixel size to place cells in µm. Fix: pass "
                             "pixel_size_um=..., or spatial_units='um' when obsm holds µm")
        xy = xy * float(px)
    elif spatial_units != "um":
        raise ValueError(f"spatial_units={spatial_units!r}: expected 'px' or 'um'")
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), cell_diameter_um / 2.0),
                               index=pd.RangeIndex(len(xy)))
    table = adata.copy()
    table.obs["region"] = pd.Categorical([region] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=region, region_key="region", instance_key="instance_id")
    sdata = SpatialData(shapes={region: shapes}, tables={"table": table})
    if path is not None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists. Fix: choose another path or pass overwrite=True")
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sdata.write(os.fspath(tmp))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return sdata


def _without_columns(rows: dict, hidden: np.ndarray) -> dict:
    """Batch rows with the dataset genes ``hidden`` removed from the sparse counts."""
    if not hidden.size:
        return rows
    out = dict(rows)
    keep = [~np.isin(np.asarray(i), hidden) for i in rows[schema.GENE_INDICES]]
    out[schema.GENE_INDICES] = [np.asarray(i)[k] for i, k in zip(rows[schema.GENE_INDICES], keep)]
    out[schema.GENE_COUNTS] = [np.asarray(c)[k] for c, k in zip(rows[schema.GENE_COUNTS], keep)]
    return out


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
            max_search_steps: int = 20, refine: bool = True, hellinger: bool | None = None) -> dict:
    """Spatial domains from a niche embedding, written to ``obs[key_added]`` (categorical).

    Leiden (igraph flavour, 2 iterations, undirected) on scanpy's ``n_neighbors`` graph of
    ``obsm[use_rep]`` (50 by default, not scanpy's 15: neighbourhood embeddings vary smoothly in
    space, and on a 15-neighbour graph Leiden split domains along those gradients; issue 16 note). Leiden's domain count follows the resolution, not a requested number, so with
    ``n_domains`` the resolution is bisected (log scale, at most ``max_search_steps`` runs on the one
    graph) to the count closest to it (the lowest such resolution on ties). ``method="kmeans"``
    runs k-means with ``n_domains`` clusters instead. The graph goes to ``obsp``/``uns`` under
    ``f"{key_added}_neighbors"``. With ``refine`` (default), Leiden's domains are then refined by
    Lloyd iterations in ``obsm[use_rep]`` started from their centres
    (:func:`spatia_hf.utils.clustering.refine_to_centroids`): the graph decides which domains there
    are, distances to their centres where their boundaries lie (Leiden alone may cut anywhere along
    the band of intermediate cells between two domains).

    When ``obsm[use_rep]`` is a composition (rows of proportions, what ``tl.embed`` writes for a
    checkpoint with cell states), cells are compared by the Hellinger distance: the graph and the
    refinement use the square roots of the proportions, kept in ``obsm[f"{use_rep}_hellinger"]``
    (``hellinger=False`` clusters the raw proportions; :func:`spatia_hf.utils.clustering.domain_features`).

    Returns:
        ``{"cluster_method", "resolution", "n_domains", "n_domains_requested", "refined", "metric"}``
        (also the params recorded).
    """
    import scanpy as sc

    from spatia_hf.utils.clustering import domain_features, refine_to_centroids, search_resolution

    _check_domain_args(n_domains, resolution, method)
    x, sqrt_applied = domain_features(adata.obsm[use_rep], hellinger)
    metric = "hellinger" if sqrt_applied else "euclidean"
    if sqrt_applied:
        use_rep = f"{use_rep}_hellinger"
        adata.obsm[use_rep] = x.astype(np.float32)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        k = int(min(n_domains, adata.n_obs))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        _write_labels(adata, key_added, labels)
        return {"cluster_method": "kmeans", "resolution": None, "n_domains": int(k), "n_domains_requested": n_domains,
                "refined": False, "metric": metric}
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
        res, labels = search_resolution(run, int(n_domains), max_search_steps)
    if refine:
        labels = refine_to_centroids(x, labels)
    _write_labels(adata, key_added, labels)
    return {"cluster_method": "leiden", "resolution": float(res), "n_domains": int(np.unique(labels).size),
            "n_domains_requested": n_domains, "refined": bool(refine), "metric": metric}


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
