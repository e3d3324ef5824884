"""Same embeddings before and after the streamed embed_dataset: run once per source tree, then compare.
    PYTHONPATH=OLD/src python compare_embed.py DATASET old.npz ; python compare_embed.py DATASET new.npz [OUT_DIR]
    python compare_embed.py --compare old.npz new.npz
"""
import sys

import numpy as np

if sys.argv[1] == "--compare":
    a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
    assert sorted(a.files) == sorted(b.files), (a.files, b.files)
    for k in sorted(a.files):
        x, y = a[k], b[k]
        same = x.shape == y.shape and (np.array_equal(x, y) if x.dtype.kind in "OUS" else np.allclose(x, y, atol=1e-5))
        diff = "" if x.dtype.kind in "OUS" or x.shape != y.shape else f" max |diff| {np.abs(x - y).max():.2e}"
        print(f"{k:28s} {str(x.shape):16s} {'same' if same else 'DIFFERENT'}{diff}")
    sys.exit(0)

import json
from pathlib import Path

import torch

torch.set_num_threads(1)
from spatia_hf import SpatiaConfig, SpatiaModel, SpatiaProcessor
from spatia_hf.inference import embed_dataset

dataset, out = sys.argv[1], sys.argv[2]
kw = {"out_dir": sys.argv[3]} if len(sys.argv) > 3 else {}
genes = json.loads((Path(dataset) / "gene_panel.json").read_text())["genes"]
torch.manual_seed(0)
model = SpatiaModel(SpatiaConfig.from_preset("small", gene_vocab=genes, num_channels=2)).eval()
processor = SpatiaProcessor.from_config(model.config)
e = embed_dataset(model, processor, dataset, sample_ids=["synth_s03"], modalities=("fused", "image", "expression"),
                  progress=False, **kw)
arrays = {f"cells_{m}": v for m, v in e.cells.items()}
arrays.update(cell_ids=e.cell_ids.astype(str), cell_sample_ids=e.cell_sample_ids.astype(str),
              cells_in_niche=e.cells_in_niche, cell_niches=e.cell_niches, cell_niche_tokens=e.cell_niche_tokens,
              niches=e.niches, niche_ids=e.niche_ids, niche_positions_um=e.niche_positions_um, tissues=e.tissues)
np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})
print("saved", out, {k: np.asarray(v).shape for k, v in arrays.items()})
