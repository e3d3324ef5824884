"""Seconds of the cell-state fit that `spatia pretrain` runs after training (embed up to 2,048 training cells with the
trained model, k-means into 32 states), on a finished run.  python fit_cost.py RUN_DIR DATASET_DIR"""
import json, sys, time
from pathlib import Path

import torch

from spatia_hf import SpatiaProcessor
from spatia_hf.data.datasets import load_spatia_dataset
from spatia_hf.models.modeling_heads import SpatiaForPretraining
from spatia_hf.training.cell_states import fit_cell_states, training_cells

run, data = Path(sys.argv[1]), Path(sys.argv[2])
summary = json.loads((run / "spatia_training.json").read_text())
model = SpatiaForPretraining.from_pretrained(run).eval()
processor = SpatiaProcessor.from_pretrained(run)
processor.map_dataset_panel(data)
cells = training_cells(load_spatia_dataset(data, ("cells",)), summary["eval_sections"], 0, 2048)
start = time.perf_counter()
n = fit_cell_states(model, processor, cells, seed=0)
print(json.dumps({"cells": n, "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                  "train_seconds": summary["train_seconds"], "steps": summary["global_step"]}))
