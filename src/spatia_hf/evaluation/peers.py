"""Published methods of the field run next to SPATIA: Novae (spatial domains) and scVI from
scvi-tools (cell embedding, clustering, imputation), from ``pip install "spatia-hf[peers]"``.

Each peer is trained from scratch on the training sections' cells, as SPATIA is, and applied to the
held-out sections; its outputs fill the suite's slots, so the same probe, clustering and ridge score
it on the same cells (rows "Novae ..." / "scVI ..." are baselines). Normally one would start from
their pretrained weights (Novae's ``MICS-Lab/novae-human-0`` and friends, scvi-tools' hub models),
which live on the Hugging Face Hub and are not reachable offline here. A peer whose package is
missing is skipped with a note, never an error, so the default install (and CI) runs without them.

- Novae 1.1.2: at its documented defaults and, because on small synthetic panels its defaults
  collapse (loss stuck at ln(number of prototypes)), also with the knobs its docs name for that:
  the whole panel per view (``panel_subset_size=1.0``) and a larger ``background_noise_lambda``.
  Its latent ("novae_latent") of the held-out cells goes to task 5 (domain clustering).
- scVI (``scvi.model.SCVI`` defaults): trained on the genes observed by every imputation task (the
  task-7 masked genes and the task-8 neighbour-driven genes left out, so its latent cannot carry
  them); its latent goes to tasks 1 and 4 (probe, clustering) and to the ridge of tasks 7 and 8.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Sequence

import numpy as np

from .spatia_methods import SpatiaOutputs
from .suite import SuiteInputs

PEERS = ("novae", "scvi")
PACKAGES = {"novae": "novae", "scvi": "scvi"}
INSTALL_HINT = "pip install 'spatia-hf[peers]'"
NOVAE_DEFAULTS = "Novae (defaults, from scratch)"
NOVAE_TUNED = "Novae (panel_subset_size=1, background_noise_lambda=40, from scratch)"
SCVI = "scVI (defaults, from scratch)"
NOVAE_RADIUS_UM = 80.0  # Delaunay edges longer than this are cut (novae.spatial_neighbors radius)
TASKS_OF = {"novae": (5,), "scvi": (1, 4, 7, 8)}


def peer_installed(name: str) -> bool:
    """Whether the package of peer ``name`` ("novae" or "scvi") imports here."""
    if name not in PACKAGES:
        raise ValueError(f"peer {name!r}: expected one of {list(PEERS)}")
    return importlib.util.find_spec(PACKAGES[name]) is not None


def _adata(inputs: SuiteInputs, rows: np.ndarray, genes: Sequence[str] | None = None):
    """An AnnData of raw counts of ``rows`` (``obsm["spatial"]`` in µm, ``obs["slide"]``)."""
    import anndata
    import scipy.sparse as sp

    c = inputs.cells
    cols = np.arange(len(c.genes)) if genes is None else c.gene_index(genes)
    adata = anndata.AnnData(X=sp.csr_matrix(c.counts[rows][:, cols], dtype=np.float32))
    adata.var_names = [c.genes[j] for j in cols]
    adata.obs_names = [f"{s}:{i}" for s, i in zip(c.sample_ids[rows], c.cell_ids[rows])]
    adata.obs["slide"] = np.asarray(c.sample_ids[rows]).astype(str)
    adata.obsm["spatial"] = np.asarray(c.xy_um[rows], np.float64)
    return adata


def run_novae(inputs: SuiteInputs, out: SpatiaOutputs, seed: int = 0, max_epochs: int = 20,
              tuned_background_noise: float = 40.0, runs: int = 3) -> None:
    """Novae trained on the training sections (one AnnData per section), its latent of the held-out
    cells in ``domain_clustering``: at defaults and with the knobs for small panels, each trained
    ``runs`` times (seeds ``seed, seed + 1, ...``): Novae's training is not reproducible run to run
    even when seeded (the same command gave domain ARI 0.59 and 0.82; session 9 note), so task 5 clusters
    one run per clustering seed and the interval covers the training spread."""
    import lightning
    import novae

    if max_epochs < 3:  # Novae's cosine schedule divides by (max_epochs - 2): 2 epochs fail inside fit
        raise ValueError(f"max_epochs={max_epochs}: Novae needs at least 3 epochs")
    c, sec = inputs.cells, inputs.section_split
    train = [_adata(inputs, np.flatnonzero(c.sample_ids == s)) for s in np.unique(c.sample_ids[sec.train])]
    test = _adata(inputs, sec.test)
    for a in (*train, test):
        novae.spatial_neighbors(a, radius=[0, NOVAE_RADIUS_UM])
    if runs < 1:
        raise ValueError(f"runs={runs}: train Novae at least once")
    for name, kwargs in ((NOVAE_DEFAULTS, {}),
                         (NOVAE_TUNED, {"panel_subset_size": 1.0, "background_noise_lambda": tuned_background_noise})):
        t0 = time.perf_counter()
        latents = []
        for run in range(runs):
            lightning.seed_everything(seed + run, verbose=False)
            model = novae.Novae(train, **kwargs)
            model.fit(max_epochs=max_epochs, accelerator="cpu", num_workers=0, enable_progress_bar=False)
            model.compute_representations(test)
            latent = np.zeros((c.n_cells, test.obsm["novae_latent"].shape[1]), np.float32)
            latent[sec.test] = test.obsm["novae_latent"]
            latents.append(latent)
        out.add("domain_clustering", name, latents if runs > 1 else latents[0], kind="baseline")
        out.seconds[name] = round(time.perf_counter() - t0, 1)
    out.note(5, f"{NOVAE_DEFAULTS} / {NOVAE_TUNED}: Novae {novae.__version__} trained from scratch on the training "
                f"sections ({max_epochs} epochs at most, its early stopping; Delaunay graph cut at "
                f"{NOVAE_RADIUS_UM:g} µm), latent of the held-out cells clustered like every method; {runs} training "
                f"run(s), seeds {seed}..{seed + runs - 1}, clustering seed j on run j mod {runs} (Novae's training "
                f"is not reproducible run to run, so the interval covers it); seconds for all runs "
                f"{out.seconds[NOVAE_DEFAULTS]} / {out.seconds[NOVAE_TUNED]}. Its pretrained weights "
                "(MICS-Lab/novae-*) would normally be the start; they are on the Hub, unreachable offline")


def run_scvi(inputs: SuiteInputs, out: SpatiaOutputs, seed: int = 0, max_epochs: int | None = None) -> None:
    """scVI trained on the training sections' observed genes; its latent of every cell in tasks 1
    and 4, and of the held-out cells in the ridge of tasks 7 and 8."""
    import scvi

    c, sec = inputs.cells, inputs.section_split
    hidden = set(inputs.masked_genes) | set(inputs.neighbor_genes)
    genes = [g for g in c.genes if g not in hidden]
    t0 = time.perf_counter()
    scvi.settings.seed = seed
    train = _adata(inputs, sec.train, genes)
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train)
    model.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
    everything = _adata(inputs, np.arange(c.n_cells), genes)
    scvi.model.SCVI.setup_anndata(everything)
    latent = np.asarray(model.get_latent_representation(everything), np.float32)
    out.seconds[SCVI] = round(time.perf_counter() - t0, 1)
    for key in ("cell_annotation", "cell_clustering"):
        out.add(key, SCVI, latent, kind="baseline")
    for key in ("gene_imputation_features", "niche_imputation_features"):
        out.add(key, SCVI, latent[sec.test], kind="baseline")
    text = (f"{SCVI}: scvi-tools {scvi.__version__} SCVI at its defaults (latent {latent.shape[1]}, epochs "
            f"{'its default rule' if max_epochs is None else max_epochs}), trained from scratch on the training "
            f"sections' {len(genes)} genes that no imputation task scores, in {out.seconds[SCVI]} s; pretrained "
            "scvi-tools hub models would normally be an option, and are unreachable offline")
    for task in TASKS_OF["scvi"]:
        out.note(task, text + ("; imputation: the suite's ridge on its latent" if task in (7, 8) else ""))


def run_peers(inputs: SuiteInputs, names: Sequence[str] = PEERS, seed: int = 0, novae_epochs: int = 20,
              scvi_epochs: int | None = None, novae_runs: int = 3) -> SpatiaOutputs:
    """The requested peers' outputs for the suite (``extra`` / ``kinds`` / ``notes`` / ``seconds``);
    a peer that is not installed gets a "not installed" note on its tasks instead of a row."""
    out = SpatiaOutputs()
    for name in names:
        if not peer_installed(name):
            for task in TASKS_OF[name]:
                out.note(task, f"{name}: not installed, its row is skipped ({INSTALL_HINT})")
            continue
        try:
            if name == "novae":
                run_novae(inputs, out, seed, max_epochs=novae_epochs, runs=novae_runs)
            else:
                run_scvi(inputs, out, seed, max_epochs=scvi_epochs)
        except Exception as err:  # a third-party trainer's failure is reported, not the end of the evaluation
            for task in TASKS_OF[name]:
                out.note(task, f"{name}: failed ({type(err).__name__}: {err}); its row is skipped")
    return out


__all__ = ["PEERS", "peer_installed", "run_novae", "run_scvi", "run_peers"]
