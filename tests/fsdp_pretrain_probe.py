"""Run by tests/test_sharded_training.py under ``torchrun --nproc_per_node 2``: FSDP2 (``fully_shard``) of a
tiny SpatiaForPretraining over gloo on the CPU, two optimiser steps on one batch of a real dataset per rank;
writes, per rank, the world size, how much of the model the rank holds and the losses.

Why not through the Trainer: accelerate 1.15 turns ``fsdp=`` into FSDP only from a multi-GPU-like state
(``accelerate/state.py``: MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU), so with ``use_cpu`` the Trainer
silently runs DDP; ``prepare_training_args`` now refuses that combination.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from spatia_hf.data.datasets import load_spatia_dataset
from spatia_hf.models.modeling_layers import SpatiaBlock
from spatia_hf.training.arguments import DataArguments, ModelArguments
from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
from spatia_hf.training.setup import build_processor


def main() -> None:
    dataset_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    dataset = load_spatia_dataset(dataset_dir, ("cells", "niches"))
    model_args, data_args = ModelArguments(preset="tiny"), DataArguments(dataset_dir=dataset_dir)
    model = load_pretraining_model(model_args, data_args, dataset, seed=0)
    processor = build_processor(model_args, model.config, dataset, 0)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, 0)
    total = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if isinstance(module, SpatiaBlock):  # one FSDP unit per transformer block, the rest in the root unit
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)  # every parameter, logit_scale too (shaped (1,): fully_shard refuses 0-d ones)
    params = list(model.parameters())
    local = sum(p.to_local().numel() if type(p).__name__ == "DTensor" else p.numel() for p in params)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = collator(train.__getitems__([2 * rank, 2 * rank + 1]))
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss))
    record = {"rank": rank, "world_size": world, "n_params": len(params),
              "n_dtensor": sum(type(p).__name__ == "DTensor" for p in params), "local_numel": local,
              "total_numel": total, "losses": losses}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
