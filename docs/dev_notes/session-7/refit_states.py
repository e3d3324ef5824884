#!/usr/bin/env python
"""Give a pretraining run saved before cell states existed the states `spatia pretrain` now fits after training.

Exactly what `run_pretraining` does after `trainer.train()` (the same seeded sample of up to 2,048 training
cells, the same k-means), applied to the saved model: the weights are the trained ones, so the result is the
checkpoint today's `spatia pretrain` with the same seed would have written (pretraining itself is unchanged).

    python refit_states.py OLD_RUN NEW_RUN DATASET
"""
import json, shutil, sys
from pathlib import Path

from spatia_hf import SpatiaConfig, SpatiaProcessor
from spatia_hf.data.datasets import load_spatia_dataset
from spatia_hf.models.modeling_heads import SpatiaForPretraining
from spatia_hf.training.cell_states import fit_cell_states, training_cells

old, new, data = map(Path, sys.argv[1:4])
summary = json.loads((old / "spatia_training.json").read_text())
seed = json.loads((old / "training_args.json").read_text()).get("seed", 0) if (old / "training_args.json").exists() \
    else int(summary.get("seed", 0))
shutil.copytree(old, new, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*"))
config = SpatiaConfig.from_pretrained(old)
config.niche_config.num_cell_states = 32  # what the small preset sets now
model = SpatiaForPretraining.from_pretrained(old, config=config).eval()
processor = SpatiaProcessor.from_pretrained(old)
processor.map_dataset_panel(data)
dataset = load_spatia_dataset(data, ("cells",))
n = fit_cell_states(model, processor, training_cells(dataset, summary["eval_sections"], seed, 2048), seed=seed)
model.save_pretrained(new)
print(f"{new}: {model.spatia.niche.cell_states.num_states} states on {n} training cells (seed {seed})")
