"""Training the ``AutoencoderKL`` that lets the generator work in latent space (>= 128 px crops).

At 32-64 px the denoiser runs in pixel space; at paper crop sizes (128-256 px) a UNet on pixels is
slow, so SPATIA's generator can denoise the latents of a VAE instead (Stable Diffusion's recipe). A
stain-image VAE is trained here on the dataset's own cell crops (no natural-image VAE fits 2-channel
DAPI/boundary stains), then frozen while the generator learns its latents.

``train_vae(dataset_dir, out_dir, ...)`` (``examples/train_vae.py`` is its command line):

* data: the ``cells`` config read by :class:`~spatia_hf.training.generator.CellBatches`, crops in
  [-1, 1] at ``image_size`` (:func:`~spatia_hf.training.generator.images_to_model_space`), random
  90-degree rotations and flips; one section held out (``eval_sections``, default the last), as
  the generator does;
* model: a diffusers ``AutoencoderKL`` from :data:`VAE_PRESETS` (``tiny``: factor 2 for tests;
  ``small`` / ``base``: factor 4, so 128 px crops give 32 px latents), 4 latent channels;
* loss: L1 (or MSE) reconstruction of a latent *sample* plus ``kl_weight`` x KL(posterior || N(0, 1)),
  both per image element. The default 1e-6 is the weight Stable Diffusion's VAE (LDM) used in this
  normalisation: the KL only has to keep the latents bounded and the posterior from collapsing to a
  point (so nearby latents decode to similar cells); reconstruction, i.e. the nucleus boundary the
  evaluation measures, must dominate, and the latents' scale is fixed afterwards by
  ``scaling_factor``. A weight near 1 would pull the posterior to N(0, 1) and erase the image. On
  the demo data (3 CPU minutes, ~150 steps) the KL term was ~0.35 per element, so 1e-6 and 1e-4
  trained alike (held-out PSNR 20.2 vs 20.4 dB); the choice matters only in long runs;
* optimisation: AdamW, linear warm-up then constant learning rate, gradient clipping, accelerate,
  ``max_steps`` / ``max_minutes``, seeded;
* at the end: ``scaling_factor = 1 / std(latents)`` over a seeded sample of training crops
  (diffusers' convention, stored with ``vae.register_to_config``), so the generator's latents
  (``latent_dist.sample() * scaling_factor``) have unit variance like its noise; held-out
  reconstruction MSE / PSNR and the correlation of the central nucleus area
  (:func:`spatia_hf.evaluation.generation.nucleus_area`) between original and reconstructed crops,
  next to a resize baseline (the crop shrunk by the VAE factor and enlarged back);
* outputs (written atomically): ``OUT/vae`` (``AutoencoderKL.save_pretrained``, safetensors),
  ``OUT/vae_training.json`` (metrics, steps, minutes, arguments), ``OUT/vae_training_log.jsonl``.

A latent generator at >= 128 px, end to end::

    spatia synth --out runs/synth --pixel-size 0.25            # 32 µm crops are 128 native pixels
    spatia convert synthetic runs/synth --out runs/data128 --crop-px 128
    python examples/train_vae.py --dataset_dir runs/data128 --out_dir runs/vae --size small --max_minutes 30
    python examples/train_generator.py --dataset_dir runs/data128 --out_dir runs/gen128 \\
        --vae runs/vae --max_minutes 60

(``--crop-px 128`` on a 0.5 µm/px section also works; its crops are then upsampled 2x.) The
generator's pipeline then holds the VAE (``model_index.json`` lists ``vae``), its UNet works on
``image_size / 4`` px latents, and ``pipe(...)`` returns full-size images.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from spatia_hf.data import schema
from ..utils.io import staged_dir, weight_files, write_json
from .loop import LoopArguments

VAE_DIR = "vae"
# scores a trained VAE on held-out crops: (vae, uint8 images, µm per px, model px, channel names) -> dict
Measure = Callable[..., dict]
SUMMARY_FILE = "vae_training.json"
LOG_FILE = "vae_training_log.jsonl"

# Autoencoder sizes. The downsampling factor is 2 ** (len(block_out_channels) - 1) (diffusers'
# convention, read back by SpatiaGenerationPipeline.vae_scale_factor). ``small`` drops the mid-block
# self-attention: at 32 px latents it costs more on a CPU than it brings to cell-sized crops, whose
# structure fits the convolutions' receptive field.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                  mid_block_add_attention=False),
    "base": dict(block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32,
                 mid_block_add_attention=True),
}


@dataclass
class VaeTrainingArguments(LoopArguments):
    """Settings of :func:`train_vae` (also the CLI of ``examples/train_vae.py``)."""

    dataset_dir: str = field(metadata={"help": "dataset folder written by the builder (cells config)"})
    out_dir: str = field(metadata={"help": "output folder: vae/, vae_training.json, vae_training_log.jsonl"})
    size: str = field(default="small", metadata={"help": "autoencoder preset: tiny (factor 2), small or base (4)"})
    image_size: int | None = field(default=None, metadata={"help": "training side in px (default: the crop size)"})
    latent_channels: int = field(default=4, metadata={"help": "channels of the latent"})
    batch_size: int = field(default=16, metadata={"help": "crops per step per process"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear learning-rate warm-up steps"})
    reconstruction_loss: str = field(default="l1", metadata={"help": "l1 (sharper edges) or mse"})
    kl_weight: float = field(default=1e-6, metadata={
        "help": "weight of KL(posterior || N(0,1)) per image element (LDM's 1e-6; reconstruction must dominate)"})
    eval_cells: int = field(default=256, metadata={"help": "held-out crops the reconstruction metrics use"})
    scaling_cells: int = field(default=512, metadata={"help": "training crops the scaling factor is estimated on"})

    def check(self) -> None:
        super().check()
        if self.size not in VAE_PRESETS:
            raise ValueError(f"size={self.size!r}: expected one of {sorted(VAE_PRESETS)}")
        if self.reconstruction_loss not in ("l1", "mse"):
            raise ValueError(f"reconstruction_loss={self.reconstruction_loss!r}: expected 'l1' or 'mse'")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight={self.kl_weight}: expected a finite value >= 0 (e.g. 1e-6)")
        for name in ("batch_size", "latent_channels", "eval_cells", "scaling_cells", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")


@dataclass
class VaeTrainingResult:
    """What :func:`train_vae` did: where the VAE is, how far it got, the loss curve, the metrics."""

    vae_dir: Path
    global_step: int
    elapsed_s: float
    losses: list[float]
    scaling_factor: float
    metrics: dict[str, Any]
    stopped_by: str


# ---------------------------------------------------------------------------------------- model
def make_vae(size: str = "small", in_channels: int = 2, image_size: int = 64, latent_channels: int = 4,
             **overrides) -> "AutoencoderKL":  # noqa: F821
    """An ``AutoencoderKL`` of preset ``size`` for ``in_channels``-stain crops of ``image_size`` px."""
    from diffusers import AutoencoderKL

    if size not in VAE_PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(VAE_PRESETS)}")
    cfg = {**VAE_PRESETS[size], **overrides}
    levels = len(cfg["block_out_channels"])
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size}: not divisible by the {size!r} VAE's downsampling factor "
                         f"{factor}. Fix: use a multiple of {factor}")
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, sample_size=image_size, scaling_factor=1.0,
                         force_upcast=False, **cfg)


def vae_factor(vae) -> int:
    """Pixels per latent pixel of an ``AutoencoderKL`` (``2 ** (levels - 1)``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class _VaeWithPosterior(torch.nn.Module):
    """``x -> (reconstruction, posterior mean, posterior log-variance)`` through ``forward``, so a
    DDP-wrapped VAE synchronises its gradients (``vae.encode`` would bypass the wrapper)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample(generator=generator)).sample
        return rec, posterior.mean, posterior.logvar


def vae_loss(rec: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, kl_weight: float,
             kind: str = "l1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, reconstruction term, KL per image element)`` of one batch (see the module docstring)."""
    diff = rec.float() - x.float()
    rec_term = diff.abs().mean() if kind == "l1" else diff.pow(2).mean()
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=(1, 2, 3))
    kl = kl.mean() / x[0].numel()
    return rec_term + kl_weight * kl, rec_term, kl


def encode_to_latents(vae, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latents a generator trains on: a posterior sample (``generator``-seeded),
    shifted by ``shift_factor`` when the VAE has one, times ``scaling_factor`` (diffusers' convention)."""
    with torch.no_grad():
        z = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=generator)
    shift = vae.config.get("shift_factor")
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------- loading
def resolve_vae_dir(path: str | Path) -> Path:
    """A trained VAE folder: ``path`` itself (``config.json`` there) or ``path/vae`` (a :func:`train_vae`
    output folder)."""
    path = Path(path)
    for candidate in (path, path / VAE_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"vae={str(path)!r}: no config.json there nor in {path / VAE_DIR}. Fix: pass the "
                            "out_dir of examples/train_vae.py (or its vae/ folder)")


def load_frozen_vae(path: str | Path, n_channels: int | None = None, image_size: int | None = None):
    """The ``AutoencoderKL`` saved at ``path`` (see :func:`resolve_vae_dir`), frozen and in eval mode,
    checked against the dataset's ``n_channels`` and the generated ``image_size`` (px)."""
    from diffusers import AutoencoderKL

    folder = resolve_vae_dir(path)
    vae = AutoencoderKL.from_pretrained(folder)
    if n_channels is not None and vae.config.in_channels != n_channels:
        raise ValueError(f"vae={str(path)!r}: in_channels={vae.config.in_channels} but the dataset's crops have "
                         f"{n_channels} channels. Fix: train the VAE on this dataset (examples/train_vae.py)")
    factor = vae_factor(vae)
    if image_size is not None and image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor} "
                         f"(vae={str(path)!r}). Fix: --image_size a multiple of {factor}, e.g. "
                         f"{max(factor, image_size // factor * factor)}")
    vae.requires_grad_(False)
    return vae.eval()


def vae_for_generator_run(vae: str | None, out_dir: str | Path, resume_from_checkpoint: str | None,
                          n_channels: int, image_size: int) -> tuple[Any, str | None]:
    """The frozen VAE of a generator run and its path (``(None, None)`` for pixel space).

    On resume the VAE comes from the checkpoint's saved arguments when ``vae`` is None; a given
    ``vae`` must be the one the checkpoint was trained on (same :func:`vae_fingerprint`), and a
    pixel-space checkpoint cannot continue on latents.
    """
    saved_fp = None
    if resume_from_checkpoint:
        from .loop import STATE_FILE, find_checkpoint

        ckpt = find_checkpoint(out_dir, resume_from_checkpoint)
        state = json.loads((ckpt / STATE_FILE).read_text())
        saved, saved_fp = state.get("arguments", {}).get("vae"), state.get("vae_fingerprint")
        if vae is None:
            vae = saved
        elif saved is None:
            raise ValueError(f"vae={vae!r}: checkpoint {ckpt} was trained in pixel space (no VAE). Fix: resume "
                             "without --vae, or start a new run in another out_dir")
    if vae is None:
        return None, None
    model = load_frozen_vae(vae, n_channels, image_size)
    if saved_fp is not None and vae_fingerprint(vae) != saved_fp:
        raise ValueError(f"vae={vae!r}: its weights / config differ from the VAE the checkpoint was trained on. "
                         "Fix: resume with the same VAE folder, or start a new run")
    return model, str(vae)


def vae_fingerprint(path: str | Path) -> str:
    """SHA-256 of a trained VAE's config and weights: a resumed generator run checks it was trained on
    the same latents."""
    folder = resolve_vae_dir(path)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.name == "config.json"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def in_batches(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def estimate_scaling_factor(vae, crops: torch.Tensor, generator: torch.Generator, batch_size: int = 64) -> float:
    """``1 / std`` of posterior samples of ``crops`` (``[N, C, H, W]`` in [-1, 1]): diffusers' scaling factor."""
    device = next(vae.parameters()).device
    z = in_batches(lambda b: vae.encode(b.to(device, vae.dtype)).latent_dist.sample(generator=generator).float().cpu(),
                    crops, batch_size)
    std = float(z.std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the latents of {len(crops)} crops have std {std}: cannot set scaling_factor. Fix: check "
                         "the crops are not constant and the training did not diverge")
    return 1.0 / std


# ---------------------------------------------------------------------------------------- main loop
def train_vae(dataset_dir: str | Path, out_dir: str | Path, measure: Measure | None = None,
              **kwargs) -> VaeTrainingResult:
    """Train an ``AutoencoderKL`` on ``dataset_dir``'s cell crops; it is saved in ``out_dir/vae``.

    ``kwargs`` are fields of :class:`VaeTrainingArguments` (``size``, ``max_steps``, ``max_minutes``,
    ``batch_size``, ``kl_weight``, ``seed``, ...). ``measure(vae, images, pixel_size_um, image_size,
    channel_names) -> dict`` scores the trained VAE on held-out crops for the summary, e.g.
    :func:`spatia_hf.evaluation.generation.vae_reconstruction_metrics` (what ``examples/train_vae.py`` passes);
    training itself measures nothing, so it does not depend on the evaluation package.
    """
    return run_vae_training(VaeTrainingArguments(dataset_dir=str(dataset_dir), out_dir=str(out_dir), **kwargs),
                            measure=measure)


def run_vae_training(args: VaeTrainingArguments, measure: Measure | None = None) -> VaeTrainingResult:
    """:func:`train_vae` from an arguments object."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from spatia_hf.data.builder import load_sections_info
    from ..data.datasets import load_spatia_dataset, split_by_section
    from .loop import (CellBatches, TrainingClock, images_to_model_space,
                                              make_accelerator)

    args.check()
    start = time.monotonic()
    accelerator = make_accelerator(args.mixed_precision, args.cpu)
    set_seed(args.seed)
    out = Path(args.out_dir)
    data = load_spatia_dataset(args.dataset_dir, ["cells"])
    n_genes = len(data.genes)
    cells = data["cells"]
    first = np.asarray(cells[0][schema.IMAGE])
    n_channels, crop_px = int(first.shape[0]), int(first.shape[-1])
    channel_names = list(load_sections_info(args.dataset_dir).get("build", {}).get("channel_names") or [])
    if len(channel_names) != n_channels:
        channel_names = [f"channel_{i}" for i in range(n_channels)]
    image_size = int(args.image_size or crop_px)
    train_cells, eval_cells = split_by_section(cells, args.eval_sections)
    train_sections = sorted(set(np.asarray(train_cells[schema.SAMPLE_ID]).astype(str).tolist()))
    eval_sections = sorted(set(np.asarray(eval_cells[schema.SAMPLE_ID]).astype(str).tolist())) if eval_cells else []

    torch.manual_seed(args.seed)
    vae = make_vae(args.size, n_channels, image_size, args.latent_channels)
    model = _VaeWithPosterior(vae)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = CellBatches(train_cells, n_genes, args.batch_size, args.seed, accelerator.process_index,
                          accelerator.num_processes)
    gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log_path.unlink(missing_ok=True)
    losses: list[float] = []
    running: dict[str, float] = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    n_running = 0
    clock = TrainingClock(start, args.max_steps, args.max_minutes)
    bar = tqdm(total=args.max_steps, desc="vae", unit="step",
               disable=not (args.progress and accelerator.is_local_main_process))
    while not clock.should_stop(accelerator):
        x, _ = clock.next_batch(batches, image_size, args.augment, gen)
        x = x.to(accelerator.device)
        with accelerator.autocast():
            rec, mean, logvar = model(x, gen)
            loss, rec_term, kl = vae_loss(rec, x, mean, logvar, args.kl_weight, args.reconstruction_loss)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step += 1
        step, epoch = clock.step, clock.epoch
        value = float(accelerator.gather(loss.detach()[None]).mean())
        if not math.isfinite(value):
            raise FloatingPointError(f"VAE loss became {value} at step {step}. Fix: lower learning_rate "
                                     f"(now {args.learning_rate}) or use mixed_precision='no'")
        losses.append(value)
        for k, v in (("loss", value), ("reconstruction", float(rec_term.detach())), ("kl", float(kl.detach()))):
            running[k] += v
        n_running += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", epoch=epoch)
        if accelerator.is_main_process and step % args.log_every == 0:
            line = {"step": step, "epoch": epoch, **{k: v / n_running for k, v in running.items()},
                    "lr": lr_scheduler.get_last_lr()[0], "elapsed_s": round(time.monotonic() - start, 1)}
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            running, n_running = dict.fromkeys(running, 0.0), 0
    bar.close()
    train_minutes = (time.monotonic() - start) / 60

    accelerator.wait_for_everyone()
    vae = accelerator.unwrap_model(model).vae.eval()
    vae_dir = out / VAE_DIR
    scaling_factor, metrics = float("nan"), {}
    if accelerator.is_main_process:
        sample_gen = torch.Generator().manual_seed(args.seed + 1)
        reader = CellBatches(train_cells, n_genes, 1, args.seed)
        rows = np.sort(np.random.default_rng([args.seed, 11]).permutation(reader.n)[: args.scaling_cells])
        crops = images_to_model_space(reader.read(rows)[0], image_size)
        scaling_factor = estimate_scaling_factor(vae, crops, sample_gen)
        vae.register_to_config(scaling_factor=scaling_factor)
        held = eval_cells if eval_cells is not None else train_cells
        rows = np.sort(np.random.default_rng([args.seed, 13]).permutation(len(held))[: args.eval_cells])
        picked = held.select(rows).with_format("numpy", columns=[schema.IMAGE, schema.PIXEL_SIZE_UM])[:]
        if measure is not None:
            metrics = measure(vae, np.asarray(picked[schema.IMAGE]), np.asarray(picked[schema.PIXEL_SIZE_UM]),
                              image_size, channel_names)
            metrics["evaluated_on"] = ("held-out sections" if eval_cells is not None
                                       else "training crops (no held-out section)")
        with staged_dir(vae_dir, stale=weight_files("diffusion_pytorch_model")) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        summary = {"arguments": asdict(args), "global_step": clock.step, "epoch": clock.epoch,
                   "stopped_by": clock.stopped_by,
                   "train_minutes": round(train_minutes, 2), "elapsed_s": round(time.monotonic() - start, 1),
                   "train_sections": train_sections, "eval_sections": eval_sections, "n_train_cells": batches.n,
                   "image_size": image_size, "crop_px": crop_px, "channel_names": channel_names,
                   "downsampling_factor": vae_factor(vae), "latent_size": image_size // vae_factor(vae),
                   "latent_channels": args.latent_channels, "scaling_factor": scaling_factor,
                   "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
                   "reconstruction": metrics, "num_processes": accelerator.num_processes,
                   "device": str(accelerator.device)}
        write_json(out / SUMMARY_FILE, summary)
    accelerator.wait_for_everyone()
    return VaeTrainingResult(vae_dir, clock.step, time.monotonic() - start, losses, scaling_factor, metrics,
                             clock.stopped_by)


__all__ = [
    "VAE_PRESETS",
    "VaeTrainingArguments",
    "VaeTrainingResult",
    "make_vae",
    "vae_factor",
    "vae_loss",
    "encode_to_latents",
    "load_frozen_vae",
    "resolve_vae_dir",
    "vae_fingerprint",
    "estimate_scaling_factor",

    "train_vae",
    "run_vae_training",
]
