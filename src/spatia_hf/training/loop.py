"""What the crop-training loops (the generator's and the VAE's) share: their arguments base, reading crop
batches from a dataset, the stopping clock, checkpoint folders and the accelerator.

One module so both loops stop, checkpoint, resume and launch under ``torchrun`` the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import schema

CHECKPOINT_PREFIX = "checkpoint-"


STATE_FILE = "trainer_state.json"


@dataclass(kw_only=True)
class LoopArguments:
    """Settings every crop-training loop here shares (the generator's and the VAE's): stopping,
    clipping, augmentation, held-out sections, logging, devices, seed. Keyword-only, so each loop's
    constructor keeps its required ``dataset_dir`` / ``out_dir`` first."""

    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this much wall-clock time"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    augment: bool = field(default=True, metadata={"help": "random 90-degree rotations and flips"})
    eval_sections: list[str] | None = field(default=None, metadata={
        "help": "sections held out of training (default: the last section when there are several)"})
    log_every: int = field(default=25, metadata={"help": "write a log line every N steps"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (GPUs; fp32 is fastest on CPU)"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and all training randomness"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def check(self) -> None:
        TrainingClock.check_limits(self.max_steps, self.max_minutes)


class CellBatches:
    """Seeded batches of ``(images uint8 [B, C, H, W], counts float32 [B, G], row indices)`` from a
    ``cells`` dataset, read straight from its Arrow shards (bounded memory).

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; process ``p`` of ``world``
    takes every ``world``-th batch, so a resumed run replays the order an uninterrupted one saw.
    """

    def __init__(self, cells, n_genes: int, batch_size: int, seed: int, process_index: int = 0,
                 world_size: int = 1, column_map: np.ndarray | None = None, n_model_genes: int | None = None):
        self.cells = cells.with_format("numpy", columns=[schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS])
        self.n = len(cells)
        self.n_genes = n_genes
        self.column_map = column_map  # dataset gene j -> model panel column (-1: unknown to the model)
        self.n_model_genes = n_model_genes if n_model_genes is not None else n_genes
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.world_size = world_size
        if self.n < batch_size * world_size:
            raise ValueError(f"batch_size={batch_size}: the training sections hold only {self.n} cells "
                             f"({world_size} processes). Fix: use a smaller batch_size or more cells")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of epoch ``epoch`` for this process."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        k = index * self.world_size + self.process_index
        rows = np.sort(order[k * self.batch_size : (k + 1) * self.batch_size])
        return self.read(rows)

    def read(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.cells[np.asarray(rows, dtype=np.int64)]
        images = torch.from_numpy(np.asarray(data[schema.IMAGE]).astype(np.uint8))
        counts = dense_counts(data[schema.GENE_INDICES], data[schema.GENE_COUNTS], self.n_genes)
        if self.column_map is not None:
            known = np.flatnonzero(self.column_map >= 0)
            mapped = torch.zeros(counts.shape[0], self.n_model_genes)
            mapped[:, torch.from_numpy(self.column_map[known])] = counts[:, torch.from_numpy(known)]
            counts = mapped
        return images, counts


def dense_counts(gene_indices, gene_counts, n_genes: int) -> torch.Tensor:
    """Sparse per-cell ``gene_indices`` / ``gene_counts`` -> dense ``[B, n_genes]`` float32 counts."""
    out = np.zeros((len(gene_indices), n_genes), dtype=np.float32)
    for r, (idx, cnt) in enumerate(zip(gene_indices, gene_counts)):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_genes):
            raise ValueError(f"{schema.GENE_INDICES}: index {int(idx.max())} of row {r} is outside the gene panel "
                             f"({n_genes} genes). Fix: rebuild the dataset; gene_panel.json and the shards disagree")
        out[r, idx] = np.asarray(cnt, dtype=np.float32)
    return torch.from_numpy(out)


def images_to_model_space(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float in [-1, 1] at ``image_size`` px (area averaging when shrinking)."""
    from spatia_hf.data.crops import resize

    return resize(images.float() / 127.5 - 1.0, image_size)


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated by a random multiple of 90 degrees and randomly flipped (8 symmetries)."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for code in range(8):
        sel = (codes == code).nonzero().flatten()
        if sel.numel():
            y = torch.rot90(x[sel], k=code % 4, dims=(-2, -1))
            out[sel] = y.flip(-1) if code >= 4 else y
    return out


@dataclass
class TrainingClock:
    """Where a batch loop is (optimizer ``step``, ``epoch``, ``index`` of the next batch in it) and
    when it stops (``max_steps`` and/or ``max_minutes`` after ``start``, whichever comes first).

    In a multi-process run the processes must stop at the same step (a process that takes one more
    step waits forever for the others' gradients), so the wall-clock decision of the main process
    is broadcast to all of them.
    """

    start: float
    max_steps: int | None = None
    max_minutes: float | None = None
    step: int = 0
    epoch: int = 0
    index: int = 0
    stopped_by: str = "max_steps"

    @staticmethod
    def check_limits(max_steps: int | None, max_minutes: float | None) -> None:
        """Refuse stop settings that never stop or stop before the first step."""
        if max_steps is None and max_minutes is None:
            raise ValueError("max_steps and max_minutes are both None: training would never stop. Fix: set one "
                             "(e.g. --max_minutes 15)")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps={max_steps}: expected >= 1")
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"max_minutes={max_minutes}: expected > 0")

    def should_stop(self, accelerator=None) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            self.stopped_by = "max_steps"
            return True
        late = bool(self.max_minutes) and time.monotonic() >= self.start + 60.0 * self.max_minutes
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            late = bool(broadcast(torch.tensor([int(late)], device=accelerator.device), from_process=0).item())
        if late:
            self.stopped_by = "max_minutes"
        return late

    def next_batch(self, batches: CellBatches, image_size: int, augment: bool,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of ``batches`` (epochs roll over): crops in model space at ``image_size``
        (randomly rotated / flipped with ``augment``) and their counts."""
        if self.index >= batches.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        images, counts = batches.batch(self.epoch, self.index)
        self.index += 1
        x = images_to_model_space(images, image_size)
        return (random_dihedral(x, generator) if augment else x), counts


def find_checkpoint(out_dir: str | Path, which: str) -> Path:
    """``which`` = a checkpoint folder, or ``"latest"`` for the newest under ``OUT/checkpoints``."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={which!r}: no {STATE_FILE} there. Fix: pass a "
                                    f"{CHECKPOINT_PREFIX}<step> folder or 'latest'")
        return path
    found = sorted((Path(out_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]) if p.name[len(CHECKPOINT_PREFIX):].isdigit() else -1)
    found = [p for p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"resume_from_checkpoint='latest': no checkpoint under {Path(out_dir) / 'checkpoints'}")
    return found[-1]


def make_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """An ``accelerate.Accelerator`` that also spans processes on a machine without a GPU.

    Under ``torchrun --nproc_per_node N`` without CUDA, accelerate only sets up its multi-CPU (gloo)
    state when asked for the CPU; otherwise every process believes it is the only one and all of
    them write the same checkpoints. A launched run on such a machine therefore gets ``cpu=True``.
    DDP looks for unused parameters: the condition encoder's null condition only takes part in steps
    where condition dropout hit a cell.
    """
    import os

    from accelerate import Accelerator, DistributedDataParallelKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu or (launched and not torch.cuda.is_available()),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])

