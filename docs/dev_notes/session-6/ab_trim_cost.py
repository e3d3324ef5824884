"""Cost of release_free_heap in embed_cells_config: the same 4,096 cells embedded with the trim every 32 batches
and never, alternating, twice each, one process (small preset, random weights). Usage: python ab_trim_cost.py DATASET"""
import json, sys, time
from pathlib import Path
import torch
from spatia_hf.utils.allocator import bound_heap_growth
bound_heap_growth()
torch.set_num_threads(1)
import spatia_hf.inference as inf
from spatia_hf import SpatiaConfig, SpatiaModel, SpatiaProcessor
from spatia_hf.data.datasets import load_spatia_dataset
work = Path(sys.argv[1])
genes = json.loads((work / "gene_panel.json").read_text())["genes"]
torch.manual_seed(0)
model = SpatiaModel(SpatiaConfig.from_preset("small", gene_vocab=genes, num_channels=2)).eval()
processor = SpatiaProcessor.from_config(model.config)
processor.map_dataset_panel(work)
cells = load_spatia_dataset(work, configs=("cells",)).configs["cells"].select(range(4096))
times = {32: [], 10**9: []}
for _ in range(2):
    for every in (32, 10**9):
        inf._TRIM_EVERY_BATCHES = every
        t = time.perf_counter()
        inf.embed_cells_config(model, processor, cells, batch_size=64, progress=False)
        times[every].append(time.perf_counter() - t)
print({("trim every 32" if k == 32 else "never"): [round(x, 1) for x in v] for k, v in times.items()})
