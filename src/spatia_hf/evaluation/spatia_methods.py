"""SPATIA's outputs for the 12 evaluation tasks, computed from checkpoints on the suite's own cells.

:func:`spatia_methods` turns a pretrained checkpoint (plus optional fine-tuned heads, a generation
pipeline and a concatenation-fusion checkpoint) into the ``extra`` / ``kinds`` arguments of
:func:`spatia_hf.evaluation.suite.run_suite`, so SPATIA is scored on exactly the rows, splits and
seeds the baselines get (``inputs`` from :func:`~spatia_hf.evaluation.suite.prepare_suite`).

What SPATIA contributes, per task (``kind`` "baseline" marks SPATIA ablations, which the full model
must beat; every learned map is fitted on the task's training rows only):

1. linear probe on the fused cell embedding; ablations: expression-only and image-only embeddings
   and their concatenation (no cross-attention), or a concat-fusion checkpoint when given;
2. image-branch embedding (image input only);
3. predictions of a fine-tuned ``SpatiaForCellClassification`` on the held-out cells;
4. clustering of fused embeddings (same ablations as task 1);
5. domain clustering of the niche model's context-aware cell embeddings vs the fused cell-only
   embeddings (ablation);
6. tissue embeddings of the tissue model, and section means of fused cell embeddings;
7. masked genes are removed from every cell's input (and from the sampled zeros): zero-shot, the
   pretraining masked-gene head predicts them as mask tokens; learned, a ridge from the fused
   embedding of the remaining genes (fitted on training cells); a fine-tuned ``SpatiaForGeneImputation``
   when given;
8. the same for neighbour-driven genes with niche context: zero-shot, the pretraining niche
   masked-cell decoder predicts a scored cell's genes from its niche (scored cells hidden as mask
   tokens); learned, a ridge from context-aware embeddings; ablation, the ridge from cell-only ones;
9. ridge from the image-branch embedding (training sections); a fine-tuned
   ``SpatiaForExpressionPrediction`` when given;
10. cosine retrieval through the pretraining head's contrastive projections of the image-only and
    expression-only branch outputs; CCA on the image-only / expression-only cell embeddings;
11-12. the generation pipeline (:func:`spatia_hf.evaluation.generation.generate_for_suite`), its
    token-merging variant, and the unconditional generator (same denoiser, learned null condition).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from spatia_hf.data import schema

from . import baselines as B
from .suite import SuiteInputs
from .tasks import section_means

# method names (the report and results.json show them; "SPATIA" first = a SPATIA variant)
FUSED = "SPATIA"
ABLATION_EXPRESSION = "SPATIA ablation: expression branch only"
ABLATION_IMAGE = "SPATIA ablation: image branch only"
ABLATION_CONCAT = "SPATIA ablation: concat(image-only, expression-only) embeddings, no cross-attention"
CONCAT_CHECKPOINT = "SPATIA ablation: concatenation-fusion checkpoint"
IMAGE_BRANCH = "SPATIA (image branch)"
FINETUNED_HEAD = "SPATIA (fine-tuned head)"
NICHE_AWARE = "SPATIA (niche-aware)"
NICHE_EMBEDDING = "SPATIA (niche embedding)"
NICHE_TOKEN = "SPATIA (pooled niche token)"
NICHE_HIDDEN = "SPATIA (niche context, cell hidden)"
CELL_ONLY = "SPATIA cell-only"
TISSUE = "SPATIA (tissue embedding)"
MEAN_CELLS = "SPATIA (section mean of cell embeddings)"
MASKED_HEAD = "SPATIA (masked-gene head, zero-shot)"
RIDGE_FUSED = "SPATIA (ridge on fused embedding)"
NICHE_HEAD = "SPATIA (niche masked-cell head, zero-shot)"
RIDGE_NICHE = "SPATIA (ridge on niche-aware embedding)"
RIDGE_CELL_COMPOSITION = "SPATIA (ridge on cell embedding + niche composition)"
RIDGE_CELL_ONLY = "SPATIA cell-only (ridge on fused embedding)"
RIDGE_IMAGE = "SPATIA (ridge on image-branch embedding)"
CONTRASTIVE = "SPATIA (contrastive projections)"
CCA = "SPATIA (CCA on image-only / expression-only embeddings)"
GENERATOR = "SPATIA generator"
N_HIDE_PASSES = 4  # masked-cell passes: ~1/4 of a niche hidden at a time, as in pretraining
UNCONDITIONAL = "unconditional generator (same denoiser, null condition)"


@dataclass
class SpatiaCheckpoint:
    """A SPATIA checkpoint ready for inference.

    Attributes:
        path: where it was loaded from.
        architecture: the class it was saved as (``config.architectures[0]``).
        model: the head model (or a bare ``SpatiaModel``), in eval mode on the chosen device.
        processor: its processor, mapped onto the evaluated dataset's gene panel.
    """

    path: str
    architecture: str
    model: Any
    processor: Any

    @property
    def backbone(self):
        """The composite :class:`~spatia_hf.models.modeling_spatia.SpatiaModel` inside any head."""
        return getattr(self.model, "spatia", self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class SpatiaOutputs:
    """What :func:`spatia_methods` computed: the suite's ``extra`` and ``kinds``, one note list per
    task number (how SPATIA's numbers were made), and arrays kept for pictures."""

    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, name: str, output: Any, kind: str | None = None) -> None:
        self.extra.setdefault(key, {})[name] = output
        if kind is not None:
            self.kinds.setdefault(key, {})[name] = kind

    def note(self, task: int, text: str) -> None:
        self.notes.setdefault(task, []).append(text)


# ----------------------------------------------------------------------------- loading
def checkpoint_architecture(path: str | Path) -> str:
    """The class a SPATIA checkpoint was saved as, from its ``config.json``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json. Fix: pass a folder written by `spatia pretrain`, "
                                "`spatia finetune` or save_pretrained")
    data = json.loads(config.read_text())
    if data.get("model_type") != "spatia":
        raise ValueError(f"{path}: model_type={data.get('model_type')!r} is not a composite SPATIA checkpoint "
                         "(model_type='spatia'). Fix: pass a checkpoint written by `spatia pretrain` / `spatia finetune`")
    archs = data.get("architectures") or ["SpatiaModel"]
    return str(archs[0])


def load_checkpoint(path: str | Path, dataset_dir: str | Path, device: torch.device | str = "cpu",
                    fallback_processor: Any = None) -> SpatiaCheckpoint:
    """Load a SPATIA checkpoint as the class it was saved as, with its processor mapped onto the
    dataset's gene panel (``fallback_processor`` when the folder has none)."""
    from ..models import modeling_cell, modeling_heads, modeling_niche, modeling_spatia, modeling_tissue
    from ..models.processing_spatia import PROCESSOR_FILE, SpatiaProcessor

    arch = checkpoint_architecture(path)
    modules = (modeling_spatia, modeling_heads, modeling_cell, modeling_niche, modeling_tissue)
    cls = next((getattr(m, arch) for m in modules if hasattr(m, arch)), None)
    if cls is None:
        raise ValueError(f"{path}: architecture {arch!r} is not a spatia_hf class. Fix: save it with a SPATIA head")
    model = cls.from_pretrained(str(path)).to(device).eval()
    if (Path(path) / PROCESSOR_FILE).is_file() or fallback_processor is None:
        processor = SpatiaProcessor.from_pretrained(path)
    else:
        processor = copy.copy(fallback_processor)
    processor.map_dataset_panel(dataset_dir)
    return SpatiaCheckpoint(str(path), arch, model, processor)


# ----------------------------------------------------------------------------- encoding the suite's cells
def hiding_processor(processor, hidden_columns: Sequence[int]):
    """A copy of ``processor`` for which the dataset genes ``hidden_columns`` do not exist: they are
    neither input nor sampled as zeros (the model must not be told a hidden gene is 0)."""
    panel = processor._require_panel()
    out = copy.copy(processor)
    ids = panel.vocab_ids.copy()
    ids[np.asarray(hidden_columns, dtype=np.int64)] = -1
    out.panel = dataclasses.replace(panel, vocab_ids=ids)
    return out


def cell_rows(inputs: SuiteInputs, idx: np.ndarray, hidden_columns: Sequence[int] = ()) -> dict[str, Any]:
    """Rows of the ``cells`` config (the processor's input) for the suite's cells ``idx``, with the
    genes ``hidden_columns`` removed from the counts (so the library excludes them, as in the truth)."""
    c = inputs.cells
    counts = c.counts[idx]
    if len(hidden_columns):
        keep = np.ones(counts.shape[1], dtype=np.float32)
        keep[np.asarray(hidden_columns, dtype=np.int64)] = 0.0
        counts = sp.csr_matrix(counts.multiply(keep[None, :]))
        counts.eliminate_zeros()
    rows = {schema.CELL_ID: c.cell_ids[idx],
            schema.GENE_INDICES: [counts.indices[counts.indptr[i]:counts.indptr[i + 1]] for i in range(len(idx))],
            schema.GENE_COUNTS: [counts.data[counts.indptr[i]:counts.indptr[i + 1]] for i in range(len(idx))]}
    if c.images is not None:
        rows[schema.IMAGE] = c.images[idx]
    return rows


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        yield slice(start, min(start + batch_size, n))


def _encode(processor, inputs: SuiteInputs, idx: np.ndarray, modality: str, hidden: Sequence[int], seed: int,
            device) -> dict[str, torch.Tensor]:
    from spatia_hf.inference import encode_cells

    enc = encode_cells(processor, cell_rows(inputs, idx, hidden), modality, seed)
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def embed_cells(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, idx: np.ndarray | None = None, modality: str = "fused",
                hidden_columns: Sequence[int] = (), seed: int = 0, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """Cell embeddings ``(len(idx), D)`` of the suite's cells with genes ``hidden_columns`` hidden;
    the per-cell zero sampling is seeded by cell id, as in :func:`spatia_hf.inference.embed_dataset`."""
    idx = np.arange(inputs.cells.n_cells) if idx is None else np.asarray(idx)
    proc = hiding_processor(ckpt.processor, hidden_columns) if len(hidden_columns) else ckpt.processor
    out = []
    for sl in _batches(len(idx), batch_size, f"SPATIA cell embeddings ({modality})", progress):
        enc = _encode(proc, inputs, idx[sl], modality, hidden_columns, seed, ckpt.device)
        out.append(ckpt.backbone.cell(**enc, return_dict=True).cell_embeds.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, ckpt.backbone.config.cell_config.hidden_size), np.float32)


def align_rows(inputs: SuiteInputs, sample_ids: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Positions in (``sample_ids``, ``cell_ids``) of every cell of ``inputs`` (rows of another
    load of the same ``cells`` config), with a clear error when a cell is missing."""
    c = inputs.cells
    if len(cell_ids) == c.n_cells and np.array_equal(cell_ids, c.cell_ids) and np.array_equal(sample_ids, c.sample_ids):
        return np.arange(c.n_cells)
    where = {(s, i): k for k, (s, i) in enumerate(zip(sample_ids.tolist(), cell_ids.tolist()))}
    try:
        return np.array([where[(s, i)] for s, i in zip(c.sample_ids.tolist(), c.cell_ids.tolist())])
    except KeyError as err:
        raise ValueError(f"cell {err.args[0]} of the evaluation inputs is missing from the embeddings. Fix: embed "
                         "the same dataset directory the suite was prepared from") from None


# ----------------------------------------------------------------------------- niche context
def _niche_members(inputs: SuiteInputs, niches) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per niche: row indices of its member cells in ``inputs.cells`` and their µm offsets ``(n, 2)``."""
    from spatia_hf.inference import cell_row_index

    c = inputs.cells
    row = cell_row_index(c.cell_ids, c.sample_ids)
    view = niches.select_columns([schema.SAMPLE_ID, schema.CELL_IDS, schema.CELL_REL_X_UM, schema.CELL_REL_Y_UM])
    members = []
    for r in view:
        rows = np.array([row.get((str(r[schema.SAMPLE_ID]), str(cid)), -1) for cid in r[schema.CELL_IDS]])
        pos = np.stack([np.asarray(r[schema.CELL_REL_X_UM], np.float32), np.asarray(r[schema.CELL_REL_Y_UM], np.float32)],
                       axis=1).reshape(-1, 2)
        keep = rows >= 0
        if keep.any():
            members.append((rows[keep], pos[keep]))
    return members


@torch.no_grad()
def niche_context(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, niches, cell_embeddings: np.ndarray,
                  hide: np.ndarray | None = None, decode_gene_ids: np.ndarray | None = None, batch_size: int = 16,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Context-aware embeddings of every cell from its niche (cells in no niche keep their own).

    With ``hide`` (bool per cell) those cells enter as the niche model's mask token, as in
    pretraining's masked-cell prediction; with ``decode_gene_ids`` (vocabulary ids ``(K,)``) the
    pretraining niche decoder predicts those genes' log1p values for the hidden cells ``(n_cells, K)``
    (NaN elsewhere).
    """
    niche_model = ckpt.backbone.niche
    members = _niche_members(inputs, niches)
    ctx = cell_embeddings.astype(np.float32).copy()
    preds = None
    if decode_gene_ids is not None:
        preds = np.full((inputs.cells.n_cells, len(decode_gene_ids)), np.nan, np.float32)
        ids = torch.as_tensor(np.asarray(decode_gene_ids, np.int64), device=ckpt.device)
        table = ckpt.backbone.cell.expression_encoder.gene_embeddings
    d = cell_embeddings.shape[1]
    for sl in _batches(len(members), batch_size, "SPATIA niche context", progress):
        group = members[sl]
        n_max = max(len(m[0]) for m in group)
        emb = np.zeros((len(group), n_max, d), np.float32)
        pos = np.zeros((len(group), n_max, 2), np.float32)
        real = np.zeros((len(group), n_max), bool)
        mask = np.zeros((len(group), n_max), bool)
        for b, (rows, p) in enumerate(group):
            emb[b, : len(rows)], pos[b, : len(rows)], real[b, : len(rows)] = cell_embeddings[rows], p, True
            if hide is not None:
                mask[b, : len(rows)] = hide[rows]
        t = {k: torch.as_tensor(v, device=ckpt.device) for k, v in (("e", emb), ("p", pos), ("r", real), ("m", mask))}
        out = niche_model(t["e"], t["p"], t["r"], cell_mask=t["m"] if hide is not None else None, return_dict=True)
        cells_out = out.cell_embeds.float()
        for b, (rows, _) in enumerate(group):
            ctx[rows] = cells_out[b, : len(rows)].cpu().numpy()
            if preds is not None and mask[b].any():
                hidden = np.flatnonzero(mask[b, : len(rows)])
                h = cells_out[b, torch.as_tensor(hidden, device=ckpt.device)]
                k_ids = ids[None].expand(len(hidden), -1)
                preds[rows[hidden]] = ckpt.model.niche_decoder(h, k_ids, table).float().cpu().numpy()
    return ctx, preds


def niche_compositions(ckpt, emb, cell_embeddings: np.ndarray, xy_um: np.ndarray, sample_ids: np.ndarray, *,
                       batch_size: int = 64) -> np.ndarray | None:
    """Each cell's neighbourhood composition over the cell states ``embed_dataset`` used (``emb``; as
    ``spatia embed`` writes it), from the given cell embeddings; None for a model without states."""
    from spatia_hf.inference import embed_cell_niches

    if emb.cell_states is None:
        return None
    return embed_cell_niches(ckpt.backbone, cell_embeddings, xy_um, sample_ids, cell_states=emb.cell_states,
                             batch_size=batch_size, progress=False).compositions


def hidden_cell_context(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, niches, cell_embeddings: np.ndarray, *,
                        n_passes: int = 4, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Each cell's context-only embedding: the niche model's output at its position while the cell
    enters as the mask token. Cells are split at random (seeded) into ``n_passes`` groups hidden one
    group per pass, so ~1/n_passes of a niche is hidden at a time, as in masked-cell pretraining."""
    group = np.random.default_rng(seed).integers(0, n_passes, size=len(cell_embeddings))
    out = cell_embeddings.astype(np.float32).copy()
    for g in range(n_passes):
        hide = group == g
        ctx, _ = niche_context(ckpt, inputs, niches, cell_embeddings, hide=hide, progress=progress)
        out[hide] = ctx[hide]
    return out


def _held_out_niches(niches, sections: Sequence[str]):
    """The niches of the held-out sections (niches never cross sections), so context is computed only
    where it is scored."""
    keep = np.isin(np.asarray(niches.with_format("numpy")[schema.SAMPLE_ID]).astype(str), list(sections))
    return niches.select(np.flatnonzero(keep))


# ----------------------------------------------------------------------------- heads
def _vocab_ids(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, genes: Sequence[str]) -> np.ndarray | None:
    """Vocabulary ids of dataset genes (None when the model does not know one of them)."""
    ids = ckpt.processor._require_panel().vocab_ids[inputs.cells.gene_index(genes)]
    return None if (ids < 0).any() else ids


def _as_log1p(pred: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The masked-gene head's output as a log1p-normalised value (its training target for "mse";
    for NB/ZINB channel 0 is the log mean per size factor, channel 1 the ZINB dropout logit)."""
    if likelihood == "mse":
        return pred[..., 0]
    mean = torch.exp(pred[..., 0].clamp(max=15.0))
    if likelihood == "zinb":
        mean = mean * torch.sigmoid(-pred[..., 1])
    return torch.log1p(mean)


@torch.no_grad()
def masked_gene_predictions(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, idx: np.ndarray, genes: Sequence[str],
                            seed: int = 0, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Zero-shot imputation by the pretraining masked-gene head: ``genes`` are removed from the
    input and re-entered as tokens whose value is the mask token; ``(len(idx), len(genes))`` log1p."""
    hidden = inputs.cells.gene_index(genes)
    target = torch.as_tensor(_vocab_ids(ckpt, inputs, genes), device=ckpt.device)
    proc = hiding_processor(ckpt.processor, hidden)
    k = len(genes)
    model = ckpt.model
    out = []
    for sl in _batches(len(idx), batch_size, "SPATIA masked-gene head", progress):
        enc = _encode(proc, inputs, idx[sl], "fused", hidden, seed, ckpt.device)
        b = enc["gene_ids"].shape[0]
        ids = torch.cat([target[None].expand(b, -1), enc["gene_ids"]], dim=1)
        values = torch.cat([torch.zeros(b, k, device=ckpt.device), enc["gene_values"]], dim=1)
        att = torch.cat([torch.ones(b, k, dtype=torch.long, device=ckpt.device), enc["gene_attention_mask"]], dim=1)
        vmask = torch.zeros_like(ids, dtype=torch.bool)
        vmask[:, :k] = True
        cell = model.spatia.cell(enc.get("pixel_values"), ids, values, att, gene_value_mask=vmask, return_dict=True)
        pred = model.mgm_head(cell.gene_tokens[:, :k])
        out.append(_as_log1p(pred, model.config.expression_likelihood).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def contrastive_pairs(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, idx: np.ndarray, seed: int = 0,
                      batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(expression, image)`` embeddings of cells ``idx`` through the pretraining head's contrastive
    projections; each branch sees only its own modality (the pre-fusion outputs the InfoNCE trained)."""
    model = ckpt.model
    e_out, i_out = [], []
    for sl in _batches(len(idx), batch_size, "SPATIA contrastive projections", progress):
        expr = _encode(ckpt.processor, inputs, idx[sl], "expression", (), seed, ckpt.device)
        img = _encode(ckpt.processor, inputs, idx[sl], "image", (), seed, ckpt.device)
        e = model.spatia.cell(**expr, return_dict=True).expression_embeds
        i = model.spatia.cell(**img, return_dict=True).image_embeds
        e_out.append(torch.nn.functional.normalize(model.expression_projection(e), dim=-1).float().cpu().numpy())
        i_out.append(torch.nn.functional.normalize(model.image_projection(i), dim=-1).float().cpu().numpy())
    return np.concatenate(e_out), np.concatenate(i_out)


@torch.no_grad()
def finetuned_outputs(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, seed: int = 0, batch_size: int = 64,
                      progress: bool = False) -> tuple[str, np.ndarray] | None:
    """``(task key, output)`` of a fine-tuned head on the suite's scored rows, or None for a head the
    suite has no slot for: cell types of the held-out cells (``SpatiaForCellClassification``), the
    masked genes of task 7 (``SpatiaForGeneImputation``, masked genes removed from the input) or
    the target genes of task 9 (``SpatiaForExpressionPrediction``, image only)."""
    arch, model, dev = ckpt.architecture, ckpt.model, ckpt.device
    if arch == "SpatiaForCellClassification":
        idx, out = inputs.section_split.test, []
        for sl in _batches(len(idx), batch_size, "fine-tuned annotation head", progress):
            logits = model(**_encode(ckpt.processor, inputs, idx[sl], "fused", (), seed, dev), return_dict=True).logits
            out.append(logits.argmax(-1).cpu().numpy())
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        return "finetuned_annotation", np.array([id2label[int(i)] for i in np.concatenate(out)])
    if arch == "SpatiaForGeneImputation":
        genes, idx = inputs.masked_genes, inputs.section_split.test
        hidden = inputs.cells.gene_index(genes)
        target = torch.as_tensor(_vocab_ids(ckpt, inputs, genes), device=dev)
        proc, out = hiding_processor(ckpt.processor, hidden), []
        for sl in _batches(len(idx), batch_size, "fine-tuned imputation head", progress):
            enc = _encode(proc, inputs, idx[sl], "fused", hidden, seed, dev)
            b = enc["gene_ids"].shape[0]
            out.append(model(enc["gene_ids"], enc["gene_values"], target[None].expand(b, -1),
                             gene_attention_mask=enc["gene_attention_mask"], pixel_values=enc.get("pixel_values"),
                             return_dict=True).logits.float().cpu().numpy())
        return "gene_imputation", np.concatenate(out)
    if arch == "SpatiaForExpressionPrediction":
        idx = inputs.section_split.test
        target = torch.as_tensor(_vocab_ids(ckpt, inputs, inputs.target_genes), device=dev)
        out = []
        for sl in _batches(len(idx), batch_size, "fine-tuned image->expression head", progress):
            px = _encode(ckpt.processor, inputs, idx[sl], "image", (), seed, dev)["pixel_values"]
            out.append(model(px, target[None].expand(px.shape[0], -1), return_dict=True).logits.float().cpu().numpy())
        return "image_to_expression", np.concatenate(out)
    return None


# ----------------------------------------------------------------------------- generation
@contextmanager
def null_condition(pipe) -> Iterator[None]:
    """Inside the block ``pipe`` ignores the expression and conditions every image on its learned
    null condition (the one classifier-free guidance was trained with): the unconditional generator."""
    def encode(counts: torch.Tensor, do_classifier_free_guidance: bool, library_size=None) -> torch.Tensor:
        n = counts.shape[0] * (2 if do_classifier_free_guidance else 1)
        return pipe.condition_encoder.null_condition(n).to(pipe._execution_device)

    def encode_global(counts: torch.Tensor, do_classifier_free_guidance: bool, tokens: torch.Tensor,
                      library_size=None):
        return pipe.null_global_condition(tokens.shape[0])  # the UNet's global condition path, if any

    pipe.encode_expression = encode
    pipe.encode_global_condition = encode_global
    try:
        yield
    finally:
        del pipe.encode_expression
        del pipe.encode_global_condition


def generator_methods(pipe, inputs: SuiteInputs, out: SpatiaOutputs, num_inference_steps: int = 20,
                      guidance_scale: float | None = None, batch_size: int = 64, seed: int = 0,
                      variants: bool = True, progress: bool = False) -> None:
    """Tasks 11-12 for a generation pipeline: the pipeline as saved, plus (``variants``) the same
    weights with token merging switched (off when it was on, ratio 0.5 otherwise) and the
    unconditional generator, on the same conditions and noise seeds."""
    from .generation import at_resolution, generate_for_suite, generate_images

    pipe.set_progress_bar_config(disable=True)
    gen = generate_for_suite(pipe, inputs, name=GENERATOR, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, batch_size=batch_size, seed=seed)
    for key, methods in gen.items():
        for name, value in methods.items():
            out.add(key, name, value)
    ratio = float(pipe.config.token_merging_ratio or 0.0)
    gs = guidance_scale if guidance_scale is not None else "the pipeline default"
    out.note(11, f"{GENERATOR}: {num_inference_steps} sampler steps, guidance {gs}, token merging ratio {ratio:g}; "
                 "one image per held-out cell of generation_idx, noise seeded per batch")
    out.note(12, f"{GENERATOR}: the control and every fold of a cell are denoised in one pass from the same noise "
                 "(one generator per cell), so the morphology change is attributable to the edit")
    work_px = int(pipe.image_size)
    crop_px = int(inputs.cells.images.shape[-1]) if inputs.cells.images is not None else work_px
    if work_px != crop_px:  # the ceiling of a generator that works at fewer pixels than the crops have
        real = at_resolution(inputs.cells.images[inputs.generation_idx], work_px)
        out.add("generation", f"real held-out crops at {work_px} px", real, kind="reference")
        out.note(11, f"{GENERATOR} works at {work_px} px (crops {crop_px} px, resized for scoring); 'real held-out "
                     f"crops at {work_px} px' are the same real crops through that resizing: the best such a "
                     "generator can score")
    if not variants:
        return
    counts = inputs.cells.counts[inputs.generation_idx]
    common = dict(num_inference_steps=num_inference_steps, batch_size=batch_size, seed=seed, out_px=crop_px)
    max_down = pipe.config.token_merging_max_downsample
    alt = 0.0 if ratio > 0 else 0.5
    pipe.set_token_merging(alt)
    try:
        images, _ = generate_images(pipe, counts, inputs.cells.genes, guidance_scale=guidance_scale, **common)
    finally:
        pipe.set_token_merging(ratio, max_down)
    name = f"{GENERATOR} ({'unmerged' if alt == 0 else 'token merging 0.5'})"
    out.add("generation", name, images)
    with null_condition(pipe):
        images, _ = generate_images(pipe, counts, inputs.cells.genes, guidance_scale=1.0, **common)
    out.add("generation", UNCONDITIONAL, images, kind="baseline")
    out.note(11, f"{name}: the same weights and noise with the token merging ratio switched to {alt:g}; "
                 f"{UNCONDITIONAL}: the same noise, every image conditioned on the learned null condition")


# ----------------------------------------------------------------------------- everything
def _progress(stages: list[str], progress: bool, seconds: dict[str, float]) -> Callable[[str], None]:
    """A stage counter: ``step(name)`` closes stage ``name``, records its seconds and moves the bar."""
    import time

    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), desc="SPATIA methods", disable=not progress)
    last = [time.perf_counter()]

    def step(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - last[0], 1)
        last[0] = now
        bar.set_postfix_str(name)
        bar.update(1)
        if bar.n >= bar.total:
            bar.close()

    return step


def spatia_methods(ckpt: SpatiaCheckpoint, inputs: SuiteInputs, dataset_dir: str | Path, *,
                   finetuned: Sequence[SpatiaCheckpoint] = (), concat: SpatiaCheckpoint | None = None,
                   pipeline: Any = None, tasks: Sequence[int] | None = None, seed: int = 0, batch_size: int = 64,
                   num_inference_steps: int = 20, guidance_scale: float | None = None,
                   generation_variants: bool = True, progress: bool = False) -> SpatiaOutputs:
    """SPATIA's outputs for the tasks ``tasks`` (default all) on ``inputs``; see the module docstring.

    ``ckpt`` is the pretrained model (a ``SpatiaForPretraining`` checkpoint brings the zero-shot
    heads of tasks 7, 8 and 10; any other SPATIA checkpoint gives the embedding-based methods only).
    """
    from spatia_hf.inference import describe_niche_embedding, embed_dataset
    from ..data.datasets import load_spatia_dataset

    wanted = set(tasks or range(1, 13))
    out = SpatiaOutputs()
    pre = ckpt.architecture == "SpatiaForPretraining"
    c, sec = inputs.cells, inputs.section_split
    held = sec.test
    stages = ["embeddings", "imputation", "niche imputation", "retrieval", "fine-tuned heads", "generation"]
    step = _progress(stages, progress, out.seconds)

    emb = embed_dataset(ckpt.backbone, ckpt.processor, dataset_dir, modalities=("fused", "image", "expression"),
                        niche_aware=True, tissue=True, batch_size=batch_size, seed=seed, progress=progress)
    order = align_rows(inputs, emb.cell_sample_ids, emb.cell_ids)
    fused, image, expression = (emb.cells[m][order] for m in ("fused", "image", "expression"))
    in_niche = emb.cells_in_niche[order]
    out.arrays.update(fused=fused, niche_aware=in_niche)
    concat_emb = np.hstack([image, expression])
    ablations = {ABLATION_EXPRESSION: expression, ABLATION_IMAGE: image}
    if concat is not None:
        ablations[CONCAT_CHECKPOINT] = embed_cells(concat, inputs, seed=seed, batch_size=batch_size, progress=progress)
    else:
        ablations[ABLATION_CONCAT] = concat_emb
    for key in ("cell_annotation", "cell_clustering"):
        out.add(key, FUSED, fused)
        for name, x in ablations.items():
            out.add(key, name, x, kind="baseline")
    no_concat = ("no concatenation-fusion checkpoint was given: the concatenation ablation joins SPATIA's own "
                 "image-only and expression-only embeddings (no cross-attention between them)")
    for task in (1, 4):
        out.note(task, f"{FUSED}: fused image + expression cell embedding; SPATIA ablations are scored as baselines"
                 + ("" if concat is not None else f"; {no_concat}"))
    out.add("image_annotation", IMAGE_BRANCH, image)
    out.note(2, f"{IMAGE_BRANCH}: the cell model run on the crop alone (no expression input)")
    out.add("domain_clustering", NICHE_EMBEDDING, emb.cell_niches[order])
    if emb.cell_state_source is not None:
        out.add("domain_clustering", NICHE_TOKEN, emb.cell_niche_tokens[order])
    out.add("domain_clustering", NICHE_AWARE, in_niche)
    if 5 in wanted:
        niches = _held_out_niches(load_spatia_dataset(dataset_dir, ("niches",))["niches"], sec.held_out_sections)
        out.add("domain_clustering", NICHE_HIDDEN, hidden_cell_context(ckpt, inputs, niches, fused, seed=seed,
                                                                        progress=progress))
    out.add("domain_clustering", CELL_ONLY, fused, kind="baseline")
    niche_cfg = ckpt.backbone.config.niche_config
    token_note = (f"; {NICHE_TOKEN}: the niche transformer's pooled token of the cell's {niche_cfg.num_neighbours}"
                  "-cell neighbourhood" if emb.cell_state_source is not None else "")
    out.note(5, f"{NICHE_EMBEDDING}: each cell's own neighbourhood as the "
                f"{describe_niche_embedding(niche_cfg, emb.cell_state_source)} (obsm['X_spatia_niche'] of `spatia "
                f"embed`){token_note}"
                + f"; {NICHE_AWARE}: the niche model's context-aware embedding of the centre cell; "
                f"{NICHE_HIDDEN}: the niche model's output at the cell's position with the cell itself hidden "
                "(the masked-cell objective of pretraining; a quarter of the cells hidden per pass, four passes), "
                f"so it describes the neighbourhood only; {CELL_ONLY}: the same cells' fused embeddings without "
                "context (ablation, scored as a baseline)")
    tissue = emb.tissues[[list(emb.tissue_sample_ids).index(s) for s in inputs.sections.sample_ids]]
    out.add("section_classification", TISSUE, tissue)
    out.add("section_classification", MEAN_CELLS, section_means(fused, c.sample_ids, inputs.sections.sample_ids))
    out.note(6, f"{TISSUE}: the tissue transformer (token merging) over the section's grid-niche embeddings; "
                "pretraining trains it by masked niche modelling over nearby neighbourhoods (the 'niche' schedule)")
    y9 = inputs.log1p[:, c.gene_index(inputs.target_genes)]
    out.add("image_to_expression", RIDGE_IMAGE, B.ridge_regression(image[sec.train], y9[sec.train], image[sec.test]))
    out.note(9, f"{RIDGE_IMAGE}: standardised RidgeCV from the image-branch embedding, fitted on the training "
                "sections (the protocol of the ridge baselines)")
    out.add("retrieval", CCA, B.pca_cca_embeddings(expression, image, sec.train, inputs.retrieval_idx, seed=seed))
    step("embeddings")

    if 7 in wanted:
        genes = inputs.masked_genes
        hidden = c.gene_index(genes)
        x = embed_cells(ckpt, inputs, held, hidden_columns=hidden, seed=seed, batch_size=batch_size, progress=progress)
        out.add("gene_imputation_features", RIDGE_FUSED, x)
        if pre and _vocab_ids(ckpt, inputs, genes) is not None:
            out.add("gene_imputation", MASKED_HEAD, masked_gene_predictions(ckpt, inputs, held, genes, seed,
                                                                            batch_size, progress))
            out.note(7, f"{MASKED_HEAD}: the pretraining masked-gene head (gene tokens whose value is the mask token)")
        out.note(7, f"the {len(genes)} scored genes are removed from every cell's input and from the sampled zeros; "
                    f"{RIDGE_FUSED}: the suite's RidgeCV on the fused embedding of the remaining genes")
    step("imputation")

    if 8 in wanted and inputs.neighbor_genes:
        genes = inputs.neighbor_genes
        hidden = c.gene_index(genes)
        niches = _held_out_niches(load_spatia_dataset(dataset_dir, ("niches",))["niches"], sec.held_out_sections)
        x = np.zeros((c.n_cells, ckpt.backbone.config.cell_config.hidden_size), np.float32)
        x[held] = embed_cells(ckpt, inputs, held, hidden_columns=hidden, seed=seed, batch_size=batch_size,
                              progress=progress)
        ctx, _ = niche_context(ckpt, inputs, niches, x, progress=progress)
        out.add("niche_imputation_features", RIDGE_NICHE, ctx[held])
        composition = niche_compositions(ckpt, emb, x[held], c.xy_um[held], c.sample_ids[held],
                                         batch_size=batch_size)
        if composition is not None:
            out.add("niche_imputation_features", RIDGE_CELL_COMPOSITION, np.hstack([x[held], composition]))
            out.note(8, f"{RIDGE_CELL_COMPOSITION}: the cell's own embedding (these genes hidden) next to its "
                        f"neighbourhood's composition over the model's cell states (obsm['X_spatia_niche'] of "
                        f"`spatia embed`, here from the same hidden-gene embeddings)")
        out.add("niche_imputation_features", RIDGE_CELL_ONLY, x[held], kind="baseline")
        ids = _vocab_ids(ckpt, inputs, genes)
        if pre and ids is not None:
            pred = np.full((c.n_cells, len(genes)), np.nan, np.float32)
            group = np.random.default_rng(seed).integers(0, N_HIDE_PASSES, size=c.n_cells)
            for g in range(N_HIDE_PASSES):
                hide = np.zeros(c.n_cells, bool)
                hide[held[group[held] == g]] = True
                _, got = niche_context(ckpt, inputs, niches, x, hide=hide, decode_gene_ids=ids, progress=progress)
                pred[hide] = got[hide]
            pred = pred[held]
            missing = np.isnan(pred).any(axis=1)
            if missing.any():  # held-out cells in no niche: the head's mean prediction (counted in the note)
                pred[missing] = pred[~missing].mean(axis=0)
            out.add("niche_imputation", NICHE_HEAD, pred)
            out.note(8, f"{NICHE_HEAD}: the pretraining niche decoder reads a cell's genes from its niche while the "
                        f"cell is hidden as the mask token (a random 1/{N_HIDE_PASSES} of the held-out cells hidden per "
                        f"pass, {N_HIDE_PASSES} passes); {int(missing.sum())} held-out cells in no niche get its mean prediction")
        out.note(8, f"the neighbour-driven genes are removed from every cell's input; {RIDGE_NICHE} / "
                    f"{RIDGE_CELL_ONLY}: the suite's RidgeCV on context-aware / cell-only embeddings")
    step("niche imputation")

    if 10 in wanted:
        if pre:
            out.add("retrieval", CONTRASTIVE, contrastive_pairs(ckpt, inputs, inputs.retrieval_idx, seed, batch_size,
                                                                progress))
            out.note(10, f"{CONTRASTIVE}: cosine similarity of the InfoNCE projections of the image-only and "
                         "expression-only branch outputs")
        else:
            out.note(10, f"{ckpt.path} is not a pretraining checkpoint: it has no contrastive projections")
    out.note(10, f"{CCA}: PCA + CCA fitted on the training sections, as the CCA baselines")
    step("retrieval")

    finetuned_keys = set()
    for f in finetuned:
        got = finetuned_outputs(f, inputs, seed, batch_size, progress)
        if got is None:
            continue
        key, value = got
        name = {"finetuned_annotation": FINETUNED_HEAD, "gene_imputation": "SPATIA (fine-tuned imputation head)",
                "image_to_expression": "SPATIA (fine-tuned image->expression head)"}[key]
        out.add(key, name, value)
        finetuned_keys.add(key)
        task = {"finetuned_annotation": 3, "gene_imputation": 7, "image_to_expression": 9}[key]
        out.note(task, f"{name}: {f.architecture} from {f.path}")
    if "finetuned_annotation" not in finetuned_keys:
        out.note(3, "SPATIA not run: no fine-tuned SpatiaForCellClassification checkpoint was given (--finetuned)")
    step("fine-tuned heads")

    if pipeline is not None and ({11, 12} & wanted):
        generator_methods(pipeline, inputs, out, num_inference_steps, guidance_scale, batch_size, seed,
                          generation_variants, progress)
    elif {11, 12} & wanted:
        for task in (11, 12):
            out.note(task, "SPATIA not run: no generation pipeline was given (--pipeline)")
    step("generation")
    return out


__all__ = [
    "SpatiaCheckpoint",
    "SpatiaOutputs",
    "checkpoint_architecture",
    "load_checkpoint",
    "hiding_processor",
    "cell_rows",
    "embed_cells",
    "align_rows",
    "niche_context",
    "hidden_cell_context",
    "masked_gene_predictions",
    "contrastive_pairs",
    "finetuned_outputs",
    "null_condition",
    "generator_methods",
    "spatia_methods",
]
