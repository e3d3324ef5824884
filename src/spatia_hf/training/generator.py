"""Training the expression-conditioned generator (``SpatiaGenerationPipeline``) on a built dataset.

``train_generator(dataset_dir, out_dir, ...)`` is the whole loop as one reusable function (the
``examples/train_generator.py`` script and ``spatia demo`` call it):

* data: the ``cells`` config of a dataset written by the builder (uint8 ``(C, H, W)`` crops, sparse
  counts on ``gene_panel.json``), read batch by batch from the memory-mapped Arrow shards; one
  section is held out (``eval_sections``, default the last) so evaluation conditions on unseen cells;
  random 90-degree rotations and flips (cells have no preferred orientation);
* latent space (``vae=``, a folder written by :func:`spatia_hf.training.vae.train_vae`): the VAE is
  loaded frozen, each batch is encoded to ``latent_dist.sample() * scaling_factor`` (seeded by the
  training generator, so resumes replay it) and the denoiser works on ``image_size / factor`` px
  latents; the saved pipeline holds the VAE, checkpoints hold its path and fingerprint only;
* objective: DDPM v-prediction (or noise prediction) with optional min-SNR-gamma weighting and
  offset noise (``noise_offset``);
  classifier-free guidance is learned by replacing the condition of ``condition_dropout`` of the
  cells with the encoder's learned null condition (the cross-attention tokens and the global
  condition, ``class_labels`` of a UNet built with a projection class embedding); before training
  the per-gene log1p mean / std of (up to 4096) training cells are stored in the condition
  encoder's config, which standardises the expression profile with them (the global condition);
* optimisation: AdamW, warm-up then constant learning rate, gradient clipping, an EMA of the
  denoiser and condition encoder (diffusers ``EMAModel`` with warm-up), ``accelerate.Accelerator`` for
  devices, processes and mixed precision (fp32 on CPU, where bf16 is slower);
* stopping: ``max_steps`` and/or ``max_minutes`` (wall clock), whichever comes first;
* outputs (written atomically): ``OUT/pipeline`` (the EMA pipeline with a DPM-Solver++ sampler),
  ``OUT/checkpoints/checkpoint-<step>`` every ``checkpoint_every`` steps (raw and EMA weights,
  optimizer, learning-rate and RNG state, all safetensors/JSON; ``resume_from_checkpoint`` continues
  exactly), ``OUT/training_log.jsonl`` and ``OUT/generator_training.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from spatia_hf.data import schema
from ..utils.io import remove_own, staged_dir, weight_files, write_json
from .loop import (CHECKPOINT_PREFIX, STATE_FILE, CellBatches, LoopArguments, TrainingClock, find_checkpoint,
                   make_accelerator)

PIPELINE_DIR = "pipeline"
LOG_FILE = "training_log.jsonl"
SUMMARY_FILE = "generator_training.json"
PROFILE_STATISTICS_CELLS = 4096  # training cells sampled for the per-gene profile statistics


@dataclass
class GeneratorTrainingArguments(LoopArguments):
    """Settings of :func:`train_generator` (also the CLI of ``examples/train_generator.py``)."""

    dataset_dir: str = field(metadata={"help": "dataset folder written by the builder (cells config + gene_panel.json)"})
    out_dir: str = field(metadata={"help": "output folder: pipeline/, checkpoints/, training_log.jsonl"})
    size: str = field(default="small", metadata={"help": "denoiser/encoder preset: tiny, small or base"})
    denoiser: str = field(default="unet", metadata={
        "help": "unet (UNet2DConditionModel, default) or transformer (a PixArt DiT: patch tokens, cross-attention "
                "to the condition tokens only, no global condition)"})
    image_size: int | None = field(default=None, metadata={"help": "generated side in px (default: the crop size)"})
    prediction_type: str = field(default="v_prediction", metadata={
        "help": "v_prediction (default) or epsilon. v-prediction asks for the clean image at high noise, where "
                "epsilon-prediction barely depends on it: on the demo tissue 800 steps gave generated-cell type "
                "accuracy 0.53 vs 0.33 after 1286 epsilon steps, and the right brightness"})
    batch_size: int = field(default=32, metadata={"help": "cells per step per process"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    condition_dropout: float = field(default=0.1, metadata={"help": "fraction of cells trained unconditionally (CFG)"})
    snr_gamma: float | None = field(default=5.0, metadata={
        "help": "min-SNR-gamma loss weighting (0 or None: off, every timestep weighted alike in the prediction's "
                "own space). With v-prediction, min-SNR-gamma weighs the clean-image error by min(snr, gamma): "
                "near 0 at the high noise levels where a cell's size and shape, and so its response to the "
                "condition, are decided"})
    snr_floor: float | None = field(default=None, metadata={
        "help": "v-prediction: lower bound of the clean-image weight of min-SNR-gamma, i.e. weight "
                "clamp(snr, snr_floor, snr_gamma) / (snr + 1) on the v error. Default (None): 1 for v-prediction "
                "(the high-noise timesteps, snr < 1, keep the weight they have without min-SNR, where min-SNR gives "
                "them ~snr; the rest is weighed as min-SNR-gamma does), 0 for epsilon. On the demo tissue (DiT, "
                "1428 steps of 2 x 32 cells, 2 training seeds) it took NUCSIZE x4 from 1.42x to 1.68x (truth 2x) at "
                "the same type accuracy (session-8 note); 0: plain min-SNR-gamma"})
    noise_offset: float = field(default=0.1, metadata={
        "help": "per-image, per-channel offset noise (diffusers' --noise_offset; 0 switches it off): lets the model "
                "learn the mean brightness of dark, mostly-background crops"})
    ema_decay: float = field(default=0.999, metadata={"help": "maximum EMA decay (warm-up power 3/4)"})
    spatia_model: str | None = field(default=None, metadata={
        "help": "SPATIA checkpoint whose expression branch initialises the condition encoder"})
    vae: str | None = field(default=None, metadata={
        "help": "trained AutoencoderKL folder (examples/train_vae.py out_dir): denoise its latents, frozen; "
                "image_size must be a multiple of its downsampling factor (latent generation at >= 128 px)"})
    global_condition: bool = field(default=True, metadata={
        "help": "also feed the condition encoder's global vector (the standardised expression profile) to the "
                "UNet's class embedding (added to the timestep embedding); --global_condition false trains the "
                "cross-attention-only denoiser"})
    freeze_expression_branch: bool = field(default=False, metadata={
        "help": "keep the (pretrained) expression branch fixed; train pooling, projection, null tokens"})
    token_merging_ratio: float = field(default=0.0, metadata={"help": "token merging ratio saved with the pipeline"})
    checkpoint_every: int = field(default=500, metadata={"help": "save a checkpoint every N steps (0: never)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder or 'latest'"})

    def check(self) -> None:
        super().check()
        if self.denoiser not in ("unet", "transformer"):
            raise ValueError(f"denoiser={self.denoiser!r}: expected 'unet' or 'transformer'")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={self.prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout={self.condition_dropout}: expected a fraction in [0, 1)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma >= 0):
            raise ValueError(f"snr_gamma={self.snr_gamma}: expected > 0, or 0 / None to switch the weighting off")
        if self.snr_floor is None:
            self.snr_floor = 1.0 if self.prediction_type == "v_prediction" else 0.0
        if not (math.isfinite(self.snr_floor) and 0 <= self.snr_floor <= (self.snr_gamma or math.inf)):
            raise ValueError(f"snr_floor={self.snr_floor}: expected 0 <= snr_floor <= snr_gamma ({self.snr_gamma})")
        if self.snr_floor > 0 and self.prediction_type != "v_prediction":
            raise ValueError(f"snr_floor={self.snr_floor} with prediction_type={self.prediction_type!r}: a floor on the "
                             "clean-image weight makes epsilon's weight floor / snr, unbounded at high noise. Fix: "
                             "--prediction_type v_prediction or --snr_floor 0")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise ValueError(f"noise_offset={self.noise_offset}: expected >= 0 (0 switches it off; diffusers uses ~0.1)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: expected a fraction in (0, 1)")


@dataclass
class GeneratorTrainingResult:
    """What :func:`train_generator` did: where the pipeline is, how far it got, the loss curve."""

    pipeline_dir: Path
    global_step: int
    elapsed_s: float
    losses: list[float]
    train_sections: list[str]
    eval_sections: list[str]
    stopped_by: str


# ---------------------------------------------------------------------------------------- loss
def diffusion_loss(denoiser, condition_encoder, noise_scheduler, clean: torch.Tensor, counts: torch.Tensor,
                   generator: torch.Generator, condition_dropout: float = 0.0,
                   snr_gamma: float | None = None, noise_offset: float = 0.0, snr_floor: float = 0.0) -> torch.Tensor:
    """The denoising loss of one batch: noise (or v) prediction MSE, min-SNR weighted if asked.

    ``noise_offset`` adds ``noise_offset x N(0, 1)`` per image and channel to the noise (diffusers'
    ``--noise_offset``): plain Gaussian noise hardly perturbs an image's mean brightness, so a model
    never learns to set it and samples come out too bright on dark, mostly-background crops.

    ``denoiser`` is the pipeline's UNet or transformer (DDP-wrapped or not), called through
    :func:`~spatia_hf.pipelines.pipeline_spatia.denoise` as at sampling time. ``clean`` is ``[B, C, H, W]`` in
    [-1, 1] (or latents), ``counts`` ``[B, n_genes]`` raw counts. All randomness (noise, timesteps,
    condition dropout) comes from ``generator`` (a CPU generator).
    """
    from diffusers.training_utils import compute_snr

    from ..pipelines.denoisers import denoise

    b = clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, clean.shape[1], 1, 1), generator=generator)
    noise = noise.to(clean.device, clean.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(clean.device)
    drop = torch.rand(b, generator=generator) < condition_dropout
    cond, glob = condition_encoder(counts.to(clean.device), drop_condition=drop.to(clean.device), return_global=True)
    cond = cond.to(clean.dtype)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    class_labels = glob.to(clean.dtype) if _takes_global_condition(denoiser) else None  # dropped rows: the null's
    pred = denoise(denoiser, noisy, timesteps, cond, class_labels)  # a UNet or a transformer, as the pipeline
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if not snr_gamma:  # None or 0: unweighted
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps).to(per_sample.device).float()
    clipped = torch.clamp(snr, min=snr_floor, max=snr_gamma)
    weight = clipped / snr if noise_scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)
    return (per_sample * weight).mean()


def _takes_global_condition(unet) -> bool:
    """Whether the UNet takes ``class_labels`` (works on a DDP-wrapped UNet too)."""
    from ..pipelines.denoisers import uses_global_condition

    return uses_global_condition(getattr(unet, "module", unet))


# ---------------------------------------------------------------------------------------- checkpoints
def _named_trainable(unet, encoder) -> list[tuple[str, torch.nn.Parameter]]:
    from ..pipelines.denoisers import denoiser_kind

    return [(f"{denoiser_kind(unet)}.{n}", p) for n, p in unet.named_parameters()] + \
        [(f"condition_encoder.{n}", p) for n, p in encoder.named_parameters()]


def _optimizer_to_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{pid}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][key] = value
    return tensors, meta


def _optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _build_pipeline(args: GeneratorTrainingArguments, genes: list[str], channel_names: list[str], crop_px: int,
                    vae=None):
    from ..pipelines.condition_encoder import SpatiaConditionEncoder
    from ..pipelines.condition_encoder import ENCODER_PRESETS
    from ..pipelines.pipeline_spatia import SpatiaGenerationPipeline

    encoder = None
    if args.spatia_model:
        preset = {k: v for k, v in ENCODER_PRESETS[args.size].items()
                  if k in ("cross_attention_dim", "num_condition_tokens", "max_gene_tokens", "expression_token",
                           "global_vector")}
        encoder = SpatiaConditionEncoder.from_spatia_model(args.spatia_model, **preset)
    return SpatiaGenerationPipeline.from_genes(
        encoder.genes if encoder is not None else genes, image_size=args.image_size or crop_px,
        channel_names=channel_names, size=args.size, prediction_type=args.prediction_type, condition_encoder=encoder,
        global_condition=args.global_condition, vae=vae, denoiser=args.denoiser)


def _panel_column_map(model_genes: list[str], model_ids, dataset_genes: list[str], dataset_ids) -> np.ndarray | None:
    """Column of each dataset gene in the model's panel (-1: unknown), or None when they are the same list.

    A pretrained expression branch (``--spatia_model``) brings its own vocabulary; the dataset's
    panel is mapped onto it by Ensembl id / symbol (the processor's mapping). Unknown genes are
    dropped with a warning naming them; below 50% coverage training refuses to start.
    """
    import warnings

    from ..models.configuration_spatia import NUM_SPECIAL_TOKENS
    from ..models.processing_spatia import SpatiaProcessor

    if list(model_genes) == list(dataset_genes):
        return None
    mapping = SpatiaProcessor(model_genes, model_ids).map_panel(dataset_genes, dataset_ids)
    if mapping.unknown:
        warnings.warn(f"{len(mapping.unknown)} dataset genes are not in the condition encoder's vocabulary and are "
                      f"ignored: {mapping.unknown[:20]}", UserWarning, stacklevel=3)
    return np.where(mapping.vocab_ids >= 0, mapping.vocab_ids - NUM_SPECIAL_TOKENS, -1).astype(np.int64)


def _set_profile_statistics(encoder, train_cells, n_genes: int, column_map: np.ndarray | None, seed: int,
                            max_cells: int = PROFILE_STATISTICS_CELLS) -> None:
    """Per-gene log1p mean / std of (a seeded sample of) the training cells -> the encoder's config,
    before training: the standardised profile (global condition, expression token) is computed with them."""
    from ..pipelines.condition_encoder import profile_statistics

    reader = CellBatches(train_cells, n_genes, 1, seed, column_map=column_map, n_model_genes=encoder.num_genes)
    rows = np.sort(np.random.default_rng([seed, 7]).permutation(reader.n)[:max_cells])
    counts = torch.cat([reader.read(rows[i : i + 1024])[1] for i in range(0, len(rows), 1024)])
    encoder.set_profile_statistics(*profile_statistics(counts, encoder.config.normalize_total))


def train_generator(dataset_dir: str | Path, out_dir: str | Path, **kwargs) -> GeneratorTrainingResult:
    """Train a :class:`~spatia_hf.pipelines.pipeline_spatia.SpatiaGenerationPipeline` on ``dataset_dir``'s cells.

    ``kwargs`` are fields of :class:`GeneratorTrainingArguments` (``max_minutes``, ``max_steps``,
    ``batch_size``, ``seed``, ...). Returns a :class:`GeneratorTrainingResult`; the pipeline is in
    ``out_dir/pipeline``.
    """
    args = GeneratorTrainingArguments(dataset_dir=str(dataset_dir), out_dir=str(out_dir), **kwargs)
    return run_training(args)


def run_training(args: GeneratorTrainingArguments) -> GeneratorTrainingResult:
    """:func:`train_generator` from an arguments object."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from spatia_hf.data.builder import load_sections_info
    from ..pipelines.denoisers import sampling_scheduler, training_scheduler
    from ..pipelines.pipeline_spatia import SpatiaGenerationPipeline
    from ..data.datasets import load_spatia_dataset, split_by_section
    from .setup import section_lineage
    from spatia_hf.training.vae import encode_to_latents, vae_factor, vae_for_generator_run

    args.check()
    start = time.monotonic()
    accelerator = make_accelerator(args.mixed_precision, args.cpu)
    set_seed(args.seed)
    out = Path(args.out_dir)
    data = load_spatia_dataset(args.dataset_dir, ["cells"])
    genes = list(data.genes)
    build = load_sections_info(args.dataset_dir).get("build", {})
    cells = data["cells"]
    crop_px = int(np.asarray(cells[0][schema.IMAGE]).shape[-1])
    channel_names = list(build.get("channel_names") or [])
    n_channels = int(np.asarray(cells[0][schema.IMAGE]).shape[0])
    if len(channel_names) != n_channels:
        channel_names = [f"channel_{i}" for i in range(n_channels)]
    train_cells, eval_cells = split_by_section(cells, args.eval_sections)
    train_sections = sorted(set(np.asarray(train_cells[schema.SAMPLE_ID]).astype(str).tolist()))
    eval_sections = sorted(set(np.asarray(eval_cells[schema.SAMPLE_ID]).astype(str).tolist())) if eval_cells else []

    # A latent run: the frozen VAE (on resume: the checkpoint's); args.vae records it in checkpoints / summary
    vae, args.vae = vae_for_generator_run(args.vae, out, args.resume_from_checkpoint, n_channels,
                                          args.image_size or crop_px)
    torch.manual_seed(args.seed)
    try:
        pipe = _build_pipeline(args, genes, channel_names, crop_px, vae)
    except ValueError as err:
        if vae is None:
            raise
        raise ValueError(f"{err} (with vae={args.vae!r} the denoiser works on latents of image_size / "
                         f"{vae_factor(vae)} px)") from err
    unet, encoder = pipe.denoiser, pipe.condition_encoder  # ``unet``: the UNet or the transformer
    panel = pipe.condition_encoder
    column_map = _panel_column_map(panel.genes, panel.gene_ensembl_ids, genes, data.gene_ids)
    _set_profile_statistics(panel, train_cells, len(genes), column_map, args.seed)  # deterministic: resumes agree
    image_size = pipe.image_size
    if vae is not None:
        vae.to(accelerator.device)
    noise_scheduler = training_scheduler(args.prediction_type)
    if args.freeze_expression_branch:
        encoder.expression_encoder.requires_grad_(False)
    unet.train()
    encoder.train()
    named = [(n, p) for n, p in _named_trainable(unet, encoder) if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    unet, encoder, optimizer = accelerator.prepare(unet, encoder, optimizer)
    batches = CellBatches(train_cells, len(genes), args.batch_size, args.seed, accelerator.process_index,
                          accelerator.num_processes, column_map, panel.num_genes)
    gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)

    clock = TrainingClock(start, args.max_steps, args.max_minutes)
    if args.resume_from_checkpoint:
        ckpt = find_checkpoint(out, args.resume_from_checkpoint)
        clock.step, clock.epoch, clock.index = _load_checkpoint(ckpt, accelerator, unet, encoder, optimizer,
                                                                lr_scheduler, ema, named, gen)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    losses: list[float] = []
    running, n_running = 0.0, 0
    bar = tqdm(total=args.max_steps, initial=clock.step, desc="generator", unit="step",
               disable=not (args.progress and accelerator.is_local_main_process))
    while not clock.should_stop(accelerator):
        clean, counts = clock.next_batch(batches, image_size, args.augment, gen)
        clean = clean.to(accelerator.device)
        if vae is not None:  # a seeded posterior sample times scaling_factor (the resumed generator replays it)
            clean = encode_to_latents(vae, clean, gen)
        with accelerator.accumulate(unet), accelerator.autocast():
            loss = diffusion_loss(unet, encoder, noise_scheduler, clean, counts, gen, args.condition_dropout,
                                  args.snr_gamma, args.noise_offset, args.snr_floor)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        clock.step += 1
        step = clock.step
        value = float(accelerator.gather(loss.detach()[None]).mean())
        losses.append(value)
        running, n_running = running + value, n_running + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", epoch=clock.epoch)
        if accelerator.is_main_process and (step % args.log_every == 0):
            line = {"step": step, "epoch": clock.epoch, "loss": running / n_running,
                    "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value,
                    "elapsed_s": round(time.monotonic() - start, 1)}
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            running, n_running = 0.0, 0
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            _save_checkpoint(out, step, clock.epoch, clock.index, accelerator, unet, encoder, optimizer, lr_scheduler,
                             ema, named, gen, args)
    bar.close()

    accelerator.wait_for_everyone()
    pipeline_dir = out / PIPELINE_DIR
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        final_encoder = accelerator.unwrap_model(encoder)
        ema.copy_to(params)  # the EMA weights become the pipeline's weights
        final_unet.eval()
        final_encoder.eval()
        final = SpatiaGenerationPipeline(**{args.denoiser: final_unet},
                                         scheduler=sampling_scheduler(noise_scheduler, latent=vae is not None),
                                         condition_encoder=final_encoder, vae=vae, channel_names=channel_names,
                                         token_merging_ratio=args.token_merging_ratio)
        final.save_pretrained(pipeline_dir)
        summary = {"arguments": asdict(args), "global_step": clock.step, "epoch": clock.epoch,
                   "elapsed_s": round(time.monotonic() - start, 1), "stopped_by": clock.stopped_by,
                   **section_lineage(train_sections, args.spatia_model), "eval_sections": eval_sections,
                   "n_train_cells": batches.n, "image_size": image_size, "crop_px": crop_px, "channel_names": channel_names,
                   "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
                   "num_processes": accelerator.num_processes, "device": str(accelerator.device)}
        write_json(out / SUMMARY_FILE, summary)
    accelerator.wait_for_everyone()
    return GeneratorTrainingResult(pipeline_dir, clock.step, time.monotonic() - start, losses, train_sections,
                                   eval_sections, clock.stopped_by)


def _save_checkpoint(out: Path, step: int, epoch: int, index: int, accelerator, unet, encoder, optimizer,
                     lr_scheduler, ema, named, gen, args) -> None:
    from ..pipelines.denoisers import denoiser_kind
    from spatia_hf.training.vae import vae_fingerprint

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        model = accelerator.unwrap_model(unet)
        model.save_pretrained(tmp / denoiser_kind(model))  # "unet" or "transformer", as in a pipeline
        accelerator.unwrap_model(encoder).save_pretrained(tmp / "condition_encoder")
        save_file({n: s.detach().cpu().contiguous() for (n, _), s in zip(named, ema.shadow_params)},
                  str(tmp / "ema.safetensors"))
        tensors, meta = _optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"generator": gen.get_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "epoch": epoch, "index": index, "optimizer": meta,
                 "lr_scheduler": lr_scheduler.state_dict(), "ema_optimization_step": ema.optimization_step,
                 "arguments": asdict(args), "vae_fingerprint": vae_fingerprint(args.vae) if args.vae else None}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=float) + "\n")

    with staged_dir(root / f"{CHECKPOINT_PREFIX}{step}", stale=weight_files("diffusion_pytorch_model")) as tmp:
        write(tmp)
    keep = max(int(args.checkpoints_total_limit), 1)
    done = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()
                   and (p / STATE_FILE).is_file()),  # rotate only checkpoints this loop wrote
                  key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for old in done[:-keep]:
        remove_own(old, _checkpoint_file)


_CHECKPOINT_FILES = {STATE_FILE, "ema.safetensors", "optimizer.safetensors", "rng.safetensors"}
_CHECKPOINT_MODELS = {"unet", "transformer", "condition_encoder"}


def _checkpoint_file(rel: Path) -> bool:
    """The files ``_save_checkpoint`` writes (rotation removes these, and keeps anything else)."""
    if len(rel.parts) == 1:
        return rel.name in _CHECKPOINT_FILES
    return (len(rel.parts) == 2 and rel.parts[0] in _CHECKPOINT_MODELS
            and (rel.name == "config.json" or weight_files("diffusion_pytorch_model")(rel)))


def _load_checkpoint(ckpt: Path, accelerator, unet, encoder, optimizer, lr_scheduler, ema, named, gen):
    from ..pipelines.condition_encoder import SpatiaConditionEncoder
    from ..pipelines.denoisers import denoiser_kind

    state = json.loads((ckpt / STATE_FILE).read_text())
    model = accelerator.unwrap_model(unet)
    kind = denoiser_kind(model)
    if not (ckpt / kind).is_dir():
        saved = next((k for k in ("unet", "transformer") if (ckpt / k).is_dir()), None)
        raise ValueError(f"{ckpt}: holds a {saved} denoiser, but this run trains a {kind}. Fix: resume with "
                         f"--denoiser {saved} (or start a new out_dir)")
    raw_unet = type(model).from_pretrained(ckpt / kind)  # the pipeline's component class; safetensors
    raw_encoder = SpatiaConditionEncoder.from_pretrained(ckpt / "condition_encoder")
    accelerator.unwrap_model(unet).load_state_dict(raw_unet.state_dict())
    accelerator.unwrap_model(encoder).load_state_dict(raw_encoder.state_dict())
    shadow = load_file(str(ckpt / "ema.safetensors"))
    missing = [n for n, _ in named if n not in shadow]
    if missing:
        raise ValueError(f"{ckpt}: EMA weights missing for {missing[:5]}. Fix: resume with the same model settings")
    ema.shadow_params = [shadow[n].to(p.device) for n, p in named]
    ema.optimization_step = int(state["ema_optimization_step"])
    _optimizer_from_tensors(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    gen.set_state(load_file(str(ckpt / "rng.safetensors"))["generator"])
    return int(state["step"]), int(state["epoch"]), int(state["index"])


__all__ = [
    "LoopArguments",
    "GeneratorTrainingArguments",
    "GeneratorTrainingResult",
    "CellBatches",
    "TrainingClock",
    "diffusion_loss",
    "train_generator",
    "run_training",
]
