"""Scoring generated cells (tasks 11 and 12): type accuracy, nucleus area, perturbation shift.

Generated and real crops are measured by the same functions, so differences are the generator's:

* :func:`nucleus_area` measures the central nucleus in the DAPI channel (smoothed, half-maximum
  contour around a robust peak), in µm²;
* :func:`morphology_features` turns crops into rotation-invariant features (nucleus area,
  elongation, brightness, texture, radial profiles of every stain), and :func:`fit_type_classifier`
  fits a logistic regression on them with real crops; :func:`type_accuracy_of_generated` applies it
  to generated crops and scores against the cell type of the conditioning expression;
* :func:`perturbation_area_shift` compares paired control / perturbed crops (same noise) with the
  ground-truth effect of the synthetic tissue's morphology gene;
* :func:`generate_images` runs a pipeline over a counts matrix in batches (seeded) and
  :func:`generate_for_suite` fills the ``generation`` / ``perturbation`` slots of
  :func:`spatia_hf.evaluation.suite.run_suite`;
* :func:`evaluate_generator` does all of it on a built dataset and returns a JSON-able report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ..utils.io import atomic_path
from .morphology import morphology_feature_names, morphology_features, nucleus_area


def fit_type_classifier(images: Any, labels: Sequence[str], pixel_size_um, seed: int = 0):
    """A scikit-learn pipeline (standardise + multinomial logistic regression) on
    :func:`morphology_features` of real crops, predicting ``labels`` (e.g. cell types)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = morphology_features(images, pixel_size_um)
    labels = np.asarray(labels).astype(str)
    if len(labels) != len(feats):
        raise ValueError(f"labels: {len(labels)} for {len(feats)} images")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels: need at least two classes to fit a classifier")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0, random_state=seed))
    return clf.fit(feats, labels)


def type_accuracy_of_generated(classifier, generated: Any, condition_labels: Sequence[str],
                               pixel_size_um) -> dict[str, Any]:
    """Accuracy of ``classifier`` (from :func:`fit_type_classifier`) on generated crops against the
    type of the expression each crop was conditioned on, with the chance levels to compare to."""
    labels = np.asarray(condition_labels).astype(str)
    feats = morphology_features(generated, pixel_size_um)
    if len(labels) != len(feats):
        raise ValueError(f"condition_labels: {len(labels)} for {len(feats)} generated images")
    pred = classifier.predict(feats)
    classes = [str(c) for c in classifier.classes_]
    _, counts = np.unique(labels, return_counts=True)
    per_type = {t: float((pred[labels == t] == t).mean()) for t in sorted(set(labels))}
    return {"accuracy": float((pred == labels).mean()), "chance_uniform": 1.0 / len(classes),
            "chance_majority": float(counts.max() / counts.sum()), "n": int(len(labels)), "per_type": per_type,
            "predictions": pred.tolist()}


def perturbation_area_shift(before: Any, after: Any, pixel_size_um, fold: float,
                            exponent: float | None = None) -> dict[str, Any]:
    """Nucleus-area change between paired control (``before``) and perturbed (``after``) crops.

    ``measured_ratio`` is the geometric mean of the per-pair area ratios (pairs where both crops have
    a nucleus); ``true_ratio`` = ``fold ** exponent`` when the ground-truth exponent is given.
    """
    a0 = nucleus_area(before, pixel_size_um)
    a1 = nucleus_area(after, pixel_size_um)
    ok = (a0 > 0) & (a1 > 0)
    if not ok.any():
        raise ValueError("perturbation_area_shift: no pair has a measurable nucleus in both crops")
    log_ratio = np.log(a1[ok]) - np.log(a0[ok])
    out = {"fold": float(fold), "measured_ratio": float(np.exp(log_ratio.mean())),
           "median_ratio": float(np.exp(np.median(log_ratio))), "fraction_increased": float((log_ratio > 0).mean()),
           "n_pairs": int(ok.sum()), "n_skipped": int((~ok).sum()),
           "mean_area_before_um2": float(a0[ok].mean()), "mean_area_after_um2": float(a1[ok].mean())}
    if exponent is not None:
        out["true_ratio"] = float(fold**exponent)
    return out


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Fréchet distance between Gaussian fits of two feature sets, after standardising every feature
    by ``reference`` (default ``features_a``), so features in different units weigh alike.

    Features constant in ``reference`` (e.g. a background percentile that is 0 in every crop of a small
    set) have no scale to standardise by and are left out; divided by ~0 they would swamp the rest.
    """
    from scipy import linalg

    ref = features_a if reference is None else reference
    sd = ref.std(axis=0)
    keep = _varying(ref)
    if not keep.any():
        raise ValueError("frechet_distance: every feature is constant in the reference set")
    mu = ref.mean(axis=0)[keep]
    a, b = (features_a[:, keep] - mu) / sd[keep], (features_b[:, keep] - mu) / sd[keep]
    m1, m2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = np.real(covmean)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def feature_shifts(real: np.ndarray, generated: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per feature, how generated crops differ from real ones: the mean shift in real standard
    deviations and the ratio of standard deviations (1 and 0 are a perfect match). It says which
    features a large :func:`frechet_distance` comes from; features constant in ``real`` are left out,
    as there."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if real.shape[1] != generated.shape[1] or real.shape[1] != len(names):
        raise ValueError(f"feature_shifts: {real.shape[1]} real and {generated.shape[1]} generated features for "
                         f"{len(names)} names")
    sd = real.std(axis=0)
    out = {}
    for j in np.flatnonzero(_varying(real)):
        out[names[j]] = {"mean_shift_sd": float((generated[:, j].mean() - real[:, j].mean()) / sd[j]),
                         "sd_ratio": float(generated[:, j].std() / sd[j])}
    return out


def _varying(reference: np.ndarray) -> np.ndarray:
    """Which features vary in ``reference`` (a standard deviation above 1e-9 of their magnitude): the others
    have no scale to standardise by."""
    return reference.std(axis=0) > 1e-9 * np.maximum(np.abs(reference).max(axis=0), 1.0)


# ---------------------------------------------------------------------------------------- running a pipeline
def generate_images(pipe, counts, gene_names: Sequence[str], *, perturbation: Mapping[str, float] | None = None,
                    num_inference_steps: int = 25, guidance_scale: float | None = None, batch_size: int = 64,
                    seed: int = 0, out_px: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Generate one crop per row of ``counts`` (raw counts on ``gene_names``), batch by batch.

    Batch ``k`` uses ``torch.Generator().manual_seed(seed + k)``, so results do not depend on how
    many batches ran before. Returns uint8 ``(N, C, H, W)`` control crops and, with
    ``perturbation``, the perturbed crops from the same noise. ``out_px`` resizes to the dataset's
    crop size when it differs from the pipeline's.
    """
    import warnings

    import torch

    dense = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    controls, edits = [], []
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    for k, start in enumerate(range(0, len(dense), batch_size)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # panel notes repeat for every batch
            out = pipe(dense[start : start + batch_size], gene_names=list(gene_names), perturbation=perturbation,
                       num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed + k),
                       output_type="pt", **kwargs)
        controls.append(out.images)
        if perturbation is not None:
            edits.append(out.perturbed_images)
    return _to_uint8(controls, out_px), (_to_uint8(edits, out_px) if perturbation is not None else None)


def generate_perturbation_series(pipe, counts, gene_names: Sequence[str], gene: str, folds: Sequence[float], *,
                                 num_inference_steps: int = 25, guidance_scale: float | None = None,
                                 batch_size: int = 64, seed: int = 0, out_px: int | None = None,
                                 **edit_kwargs) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Control crops and, per fold, crops with ``gene``'s counts x fold, all from the same noise
    (:func:`generate_edit_series` with one edit per fold). Returns uint8 ``(N, C, H, W)`` controls
    and ``{fold: (N, C, H, W)}``."""
    folds = [float(f) for f in folds]
    controls, edited = generate_edit_series(pipe, counts, gene_names, [(gene, f) for f in folds],
                                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                            batch_size=batch_size, seed=seed, out_px=out_px, **edit_kwargs)
    return controls, dict(zip(folds, edited))


def generate_edit_series(pipe, counts, gene_names: Sequence[str], edits: Sequence[tuple[str, float]], *,
                         num_inference_steps: int = 25, guidance_scale: float | None = None, batch_size: int = 64,
                         seed: int = 0, out_px: int | None = None,
                         **edit_kwargs) -> tuple[np.ndarray, list[np.ndarray]]:
    """Control crops and, per edit ``(gene, fold)``, crops with that gene's counts x fold, all from
    the same noise.

    One pipeline pass per batch denoises the control and every edit together (``1 + len(edits)``
    images per cell, instead of ``2 * len(edits)`` when each edit is a separate ``perturbation=``
    call that regenerates the control). Cell ``i`` (row of ``counts``) gets its own generator seeded
    ``seed + i`` for the control and every edit, so the initial noise and any sampler noise are
    identical within a cell and the results do not depend on ``batch_size``. Returns uint8
    ``(N, C, H, W)`` controls and one such array per edit, in ``edits`` order. Every edited row is
    passed to the pipeline as an edit of its control (``reference_rows``), so the pipeline's
    ``perturbation_library`` / ``perturbation_guidance`` (``edit_kwargs``) apply as with ``perturbation=``.
    """
    import warnings

    import torch

    dense = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    names = list(gene_names)
    edits = [(str(g), float(f)) for g, f in edits]
    if not edits:
        raise ValueError("edits: expected at least one (gene, fold) pair, e.g. [('NUCSIZE', 4.0)]")
    for gene, fold in edits:
        if gene not in names:
            raise ValueError(f"gene={gene!r} is not in gene_names. Fix: perturb one of the {len(names)} given genes")
        if not (np.isfinite(fold) and fold > 0):
            raise ValueError(f"fold={fold!r} for gene {gene!r}: expected a finite number > 0")
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    per_batch = max(1, batch_size // (1 + len(edits)))  # images per pass stay about batch_size
    controls, edited_parts = [], [[] for _ in edits]
    for start in range(0, len(dense), per_batch):
        rows = dense[start : start + per_batch]
        variants = [rows]
        for gene, fold in edits:
            edited = rows.copy()
            edited[:, names.index(gene)] *= fold
            variants.append(edited)
        seeds = [seed + start + i for i in range(len(rows))] * len(variants)
        reference = list(range(len(rows))) * len(variants)  # each edited copy refers to its control
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # panel notes repeat for every batch
            out = pipe(np.concatenate(variants), gene_names=names, num_inference_steps=num_inference_steps,
                       generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                       reference_rows=reference, **kwargs, **edit_kwargs)
        parts = out.images.chunk(len(variants), dim=0)
        controls.append(parts[0])
        for k, part in enumerate(parts[1:]):
            edited_parts[k].append(part)
    return _to_uint8(controls, out_px), [_to_uint8(v, out_px) for v in edited_parts]


def _to_uint8(parts, out_px: int | None) -> np.ndarray:
    """Concatenated ``[0, 1]`` float crops -> uint8 ``(N, C, H, W)``, resized to ``out_px`` when given."""
    import torch

    from spatia_hf.data.crops import resize

    x = torch.cat(parts)
    if out_px is not None:
        x = resize(x, out_px)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def at_resolution(images: np.ndarray, work_px: int) -> np.ndarray:
    """Real uint8 crops ``(N, C, H, W)`` as a generator working at ``work_px`` px would deliver them:
    resized to ``work_px`` and back to ``H`` (the same resizing generated crops get), so real and
    generated crops are compared at the same resolution."""
    import torch

    from spatia_hf.data.crops import resize

    images = np.asarray(images, dtype=np.uint8)
    if images.shape[-1] == work_px:
        return images
    return _to_uint8([resize(torch.from_numpy(images).float() / 255.0, work_px)], int(images.shape[-1]))


def generate_for_suite(pipe, inputs, name: str = "SPATIA generator", num_inference_steps: int = 25,
                       guidance_scale: float | None = None, batch_size: int = 64, seed: int = 0) -> dict[str, dict]:
    """The ``extra`` entries of :func:`spatia_hf.evaluation.suite.run_suite` for a pipeline:
    ``{"generation": {name: crops}, "perturbation": {name: {"before": crops, "after": {fold: crops}}}}``
    (uint8 ``(N, C, H, W)`` at the dataset's crop size), conditioned on ``inputs.generation_idx`` /
    ``inputs.perturbation_idx`` cells; the control and every fold of a perturbed cell come from
    one pass with the same noise (:func:`generate_perturbation_series`)."""
    cells = inputs.cells
    out_px = int(cells.images.shape[-1]) if cells.images is not None else None
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                  out_px=out_px)
    generated, _ = generate_images(pipe, cells.counts[inputs.generation_idx], cells.genes, seed=seed, **common)
    extra: dict[str, dict] = {"generation": {name: generated}}
    if inputs.morphology_gene is not None:
        before, after = generate_perturbation_series(pipe, cells.counts[inputs.perturbation_idx], cells.genes,
                                                     inputs.morphology_gene, inputs.folds, seed=seed + 10_000,
                                                     **common)
        extra["perturbation"] = {name: {"before": before, "after": after}}
    return extra


def evaluate_generator(pipe, dataset_dir: str | Path, *, eval_sections: Sequence[str] | None = None,
                       n_per_type: int = 40, n_perturb: int = 64, fold: float = 4.0, gene: str | None = None,
                       num_inference_steps: int = 25, guidance_scale: float | None = None, batch_size: int = 64,
                       seed: int = 0, figures_dir: str | Path | None = None) -> dict[str, Any]:
    """Tasks 11/12 for one pipeline on a built (synthetic) dataset, as a JSON-able report.

    * a type classifier is fitted on real crops of the training sections (its held-out accuracy on
      real crops of ``eval_sections`` is reported as the ceiling); real crops are first brought to the
      generator's resolution (:func:`at_resolution`), so both sides are judged at the same detail;
    * up to ``n_per_type`` cells per type of ``eval_sections`` (default: the last section) condition
      the generator; the classifier labels the generated crops (accuracy vs chance);
    * ``n_perturb`` of those cells are generated again with ``gene`` (default: the ground truth's
      morphology gene) x ``fold`` from the same noise; the nucleus-area ratio is compared with the
      ground truth ``fold ** exponent``; the measurement itself is checked on real crops
      (correlation with the true ``nucleus_area_um2``);
    * with ``figures_dir``: ``generation_grid.png`` (real vs generated per type) and
      ``perturbation_strip.png`` (folds 0.25 ... 16 from the same noise).
    """
    from spatia_hf.data import schema
    from spatia_hf.data.synthetic import load_ground_truth
    from ..data.datasets import load_spatia_dataset, split_by_section
    from spatia_hf.training.loop import dense_counts

    data = load_spatia_dataset(dataset_dir, ["cells"])
    genes = list(data.genes)
    cells = data["cells"]
    train, held = split_by_section(cells, eval_sections)
    if held is None:
        raise ValueError("evaluate_generator: the dataset has one section, none is held out. Fix: pass a dataset "
                         "with several sections (or eval_sections=[...])")
    cols = [schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS, schema.PIXEL_SIZE_UM, "cell_type"]
    has_area = "nucleus_area_um2" in cells.column_names
    if has_area:
        cols.append("nucleus_area_um2")
    train_np = train.with_format("numpy", columns=cols)[:]
    held_np = held.with_format("numpy", columns=cols)[:]
    real_train = np.asarray(train_np[schema.IMAGE]).astype(np.uint8)
    real_held = np.asarray(held_np[schema.IMAGE]).astype(np.uint8)
    px_train, px_held = train_np[schema.PIXEL_SIZE_UM], held_np[schema.PIXEL_SIZE_UM]
    types_train, types_held = np.asarray(train_np["cell_type"]).astype(str), np.asarray(held_np["cell_type"]).astype(str)

    # real crops pass through the generator's resolution (e.g. 64 -> 32 -> 64 px) before the classifier
    # and the feature distance see them: a classifier fitted on full-resolution crops would misjudge any
    # 32 px image, real or generated (0.83 vs 0.99 on real held-out crops of the demo tissue)
    work_px = int(pipe.image_size)
    full_held = real_held
    real_train, real_held = at_resolution(real_train, work_px), at_resolution(real_held, work_px)
    clf = fit_type_classifier(real_train, types_train, px_train, seed=seed)
    real_acc = float((clf.predict(morphology_features(real_held, px_held)) == types_held).mean())

    rng = np.random.default_rng([seed, 11])
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(types_held == t))[:n_per_type]
                                     for t in sorted(set(types_held))]))
    counts = dense_counts(held_np[schema.GENE_INDICES][chosen], held_np[schema.GENE_COUNTS][chosen], len(genes)).numpy()
    out_px = real_held.shape[-1]
    generated, _ = generate_images(pipe, counts, genes, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, batch_size=batch_size, seed=seed, out_px=out_px)
    typing = type_accuracy_of_generated(clf, generated, types_held[chosen], px_held[chosen])
    typing["real_held_out_accuracy"] = real_acc
    typing["resolution_px"] = {"generator": work_px, "crops": int(real_held.shape[-1])}
    typing.pop("predictions")
    real_feats = morphology_features(real_held[chosen], px_held[chosen])
    gen_feats = morphology_features(generated, px_held[chosen])
    report: dict[str, Any] = {
        "dataset_dir": str(dataset_dir), "eval_sections": sorted(set(np.asarray(held["sample_id"]).astype(str))),
        "n_generated": int(len(chosen)), "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else "pipeline default", "seed": seed,
        "type_accuracy": typing,
        "feature_frechet_distance": {"generated_vs_real": frechet_distance(real_feats, gen_feats),
                                     "real_train_vs_real_held_out": frechet_distance(
                                         real_feats, morphology_features(real_train[: len(chosen)],
                                                                         px_train[: len(chosen)]), real_feats)},
        "feature_shift": feature_shifts(real_feats, gen_feats,
                                        morphology_feature_names(pipe.config.channel_names)),
    }
    if has_area:
        measured = nucleus_area(real_held, px_held)  # at the generator's resolution, as generated crops are
        truth = np.asarray(held_np["nucleus_area_um2"], dtype=np.float64)
        ok = measured > 0
        report["nucleus_area_check"] = {
            "pearson_log": float(np.corrcoef(np.log(measured[ok]), np.log(truth[ok]))[0, 1]),
            "median_measured_over_true": float(np.median(measured[ok] / truth[ok])), "n": int(ok.sum())}

    truth_gt = None
    try:
        truth_gt = load_ground_truth(dataset_dir)
    except (KeyError, IndexError, FileNotFoundError):
        pass
    morph = (truth_gt or {}).get("morphology_genes", {})
    gene = gene or next(iter(morph), None)
    if gene is not None and n_perturb > 0:  # n_perturb=0: typing and FID only (perturbation_response measures edits)
        exponent = morph.get(gene, {}).get("exponent")
        pidx = chosen[np.sort(rng.permutation(len(chosen))[:n_perturb])]
        col = genes.index(gene)
        pcounts = dense_counts(held_np[schema.GENE_INDICES][pidx], held_np[schema.GENE_COUNTS][pidx], len(genes)).numpy()
        pcounts = pcounts[pcounts[:, col] > 0]  # a fold of 0 counts is no edit
        before, after = generate_images(pipe, pcounts, genes, perturbation={gene: fold},
                                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                        batch_size=batch_size, seed=seed + 10_000, out_px=out_px)
        report["perturbation"] = {"gene": gene, **perturbation_area_shift(before, after, float(px_held[0]), fold,
                                                                           exponent)}
        if figures_dir is not None:
            _perturbation_figure(pipe, pcounts[:6], genes, gene, Path(figures_dir) / "perturbation_strip.png",
                                 num_inference_steps, guidance_scale, seed, out_px)
    if figures_dir is not None:
        _grid_figure(full_held, types_held, chosen, generated, pipe.config.channel_names,
                     Path(figures_dir) / "generation_grid.png")
        report["figures"] = sorted(str(p) for p in Path(figures_dir).glob("*.png"))
    return report


# ---------------------------------------------------------------------------------------- figures
def save_rgb_png(rgb: np.ndarray, path: Path, scale: int = 3) -> None:
    """Write an ``(H, W, 3)`` uint8 image enlarged ``scale`` x (nearest), atomically."""
    import PIL.Image

    big = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
    with atomic_path(path) as tmp:
        PIL.Image.fromarray(big).save(tmp, format="PNG")


def tile_rgb(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized ``(h, w, 3)`` images -> one contact sheet on white."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out[pad + i * (h + pad) : pad + i * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = im
    return out


def _grid_figure(real, types, chosen, generated, channel_names, path: Path, k: int = 6) -> None:
    """One row per cell type: ``k`` real held-out crops, a gap, ``k`` generated crops of that type."""
    from ..pipelines.image_processing import render_rgb

    rows = []
    for t in sorted(set(types[chosen])):
        sel = np.flatnonzero(types[chosen] == t)[:k]
        r = render_rgb(real[chosen[sel]] / 255.0, channel_names)
        g = render_rgb(generated[sel] / 255.0, channel_names)
        blank = np.full_like(r[0], 255)
        rows.append(list(r) + [blank] + list(g))
    save_rgb_png(tile_rgb(rows), path)


def _perturbation_figure(pipe, counts, genes, gene, path: Path, steps, guidance, seed, out_px,
                         folds: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)) -> None:
    """One row per cell: the same noise with ``gene`` scaled by each fold (left to right)."""
    from ..pipelines.image_processing import render_rgb

    cols = []
    for fold in folds:
        _, edit = generate_images(pipe, counts, genes, perturbation={gene: fold}, num_inference_steps=steps,
                                  guidance_scale=guidance, seed=seed + 20_000, batch_size=len(counts), out_px=out_px)
        cols.append(render_rgb(edit / 255.0, pipe.config.channel_names))
    rows = [[cols[j][i] for j in range(len(folds))] for i in range(len(counts))]
    save_rgb_png(tile_rgb(rows), path, scale=4)



# ---------------------------------------------------------------------------------------- VAE
NUCLEUS_CHANNEL_NAMES = ("dapi", "nuclei", "nucleus", "hoechst")


def _nucleus_channel(channel_names: list[str]) -> int:
    lower = [c.lower() for c in channel_names]
    return next((i for i, c in enumerate(lower) if c in NUCLEUS_CHANNEL_NAMES), 0)


def vae_reconstruction_metrics(vae, images: np.ndarray, pixel_size_um: np.ndarray, image_size: int,
                               channel_names: list[str], batch_size: int = 64) -> dict[str, Any]:
    """Held-out reconstruction quality of ``vae`` on uint8 crops ``images`` ``[N, C, H, W]``.

    MSE / PSNR (dB, data range 1) per channel and overall on the posterior mean (what decoding a
    clean latent gives), and the central nucleus area (µm², :func:`~spatia_hf.evaluation.morphology.nucleus_area`
    on the nuclear channel) of original vs reconstructed crops: Pearson / Spearman r and median ratio.
    The same numbers for a resize baseline (area shrink by the VAE factor, bilinear enlarge) say
    what the latent keeps beyond its pixel count.
    """
    import torch

    with torch.no_grad():
        return _vae_scores(vae, images, pixel_size_um, image_size, channel_names, batch_size)


def _vae_scores(vae, images, pixel_size_um, image_size: int, channel_names: list[str], batch_size: int) -> dict:
    import torch
    from scipy import stats

    from ..data.crops import resize
    from ..training.loop import images_to_model_space
    from ..training.vae import in_batches, vae_factor

    device = next(vae.parameters()).device
    x = images_to_model_space(torch.from_numpy(np.asarray(images, dtype=np.uint8)), image_size)
    rec = in_batches(lambda b: vae.decode(vae.encode(b.to(device, vae.dtype)).latent_dist.mode()).sample.float().cpu(),
                      x, batch_size)
    factor = vae_factor(vae)
    resized = resize(resize(x, x.shape[-1] // factor), x.shape[-1])
    original = ((x + 1) / 2).clamp(0, 1).numpy()
    px = np.asarray(pixel_size_um, dtype=np.float64) * images.shape[-1] / image_size  # µm per model pixel
    channel = _nucleus_channel(channel_names)
    area_orig = nucleus_area(original, px, channel=channel)

    def scores(other: torch.Tensor) -> dict[str, Any]:
        y = ((other + 1) / 2).clamp(0, 1).numpy()
        mse_c = ((y - original) ** 2).mean(axis=(0, 2, 3))
        mse = float(mse_c.mean())
        area = nucleus_area(y, px, channel=channel)
        both = (area_orig > 0) & (area > 0)
        out = {"mse": mse, "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12))),
               "mse_per_channel": {n: float(v) for n, v in zip(channel_names, mse_c)},
               "nucleus_found_fraction": float((area > 0).mean()), "nucleus_area_n": int(both.sum())}
        if both.sum() >= 3:
            out.update(nucleus_area_pearson=float(stats.pearsonr(area_orig[both], area[both])[0]),
                       nucleus_area_spearman=float(stats.spearmanr(area_orig[both], area[both])[0]),
                       nucleus_area_median_ratio=float(np.median(area[both] / area_orig[both])))
        return out

    return {"n_crops": int(len(x)), "nucleus_channel": channel_names[channel],
            "nucleus_found_fraction_original": float((area_orig > 0).mean()), "vae": scores(rec),
            f"resize_x{factor}_baseline": scores(resized)}


__all__ = [
    "fit_type_classifier",
    "type_accuracy_of_generated",
    "perturbation_area_shift",
    "frechet_distance",
    "at_resolution",
    "generate_images",
    "generate_perturbation_series",
    "generate_edit_series",
    "generate_for_suite",
    "evaluate_generator",
    "save_rgb_png",
    "tile_rgb",
    "vae_reconstruction_metrics",
]
