"""Pretraining step time with and without the expression sketch, in one process (small preset, the demo's
niche batches: 8 neighbourhoods x 30 cells, 64 px crops, up to 256 genes), alternating variants, 2 warm-up +
N timed steps each. Usage: python ab_sketch_step_time.py [N]"""
import sys, time, tempfile
import numpy as np, torch
from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.synthetic import make_synthetic_sections
from spatia_hf.data.datasets import load_spatia_dataset
from spatia_hf.training.arguments import DataArguments, ModelArguments
from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
from spatia_hf.training.setup import build_processor

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
work = tempfile.mkdtemp()
data = build_multiscale_dataset(make_synthetic_sections(1, 1200, 0), f"{work}/data", crop_px=64, niche_px=64,
                                thumb_px=256, overwrite=True, progress=False)
dataset = load_spatia_dataset(data, ("cells", "niches"))
runs = {}
for sketch in (False, True):
    model_args = ModelArguments(preset="small")
    data_args = DataArguments(dataset_dir=str(data), eval_sections="")
    model = load_pretraining_model(model_args, data_args, dataset, 0)
    if not sketch:  # the same preset without the sketch (timing only: weights are fresh either way)
        from spatia_hf import SpatiaForPretraining
        cfg = model.config
        cfg.cell_config.expression_sketch = False
        model = SpatiaForPretraining(cfg)
    processor = build_processor(model_args, model.config, dataset, 0)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, 0)
    batches = [collator(train.__getitems__(list(range(8 * i, 8 * i + 8)))) for i in range(n + 2)]
    runs[sketch] = (model, batches)
times = {False: [], True: []}
for i in range(n + 2):
    for sketch in (False, True):
        model, batches = runs[sketch]
        model.train()
        t = time.perf_counter()
        loss = model(**batches[i]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times[sketch].append(time.perf_counter() - t)
for sketch in (False, True):
    print(f"sketch={sketch}: {np.mean(times[sketch]):.3f} +- {np.std(times[sketch]):.3f} s per forward+backward")
print(f"ratio with/without: {np.mean(times[True]) / np.mean(times[False]):.3f}")
