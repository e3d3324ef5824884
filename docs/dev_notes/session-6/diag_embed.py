"""Where does embedding memory grow? RssAnon, VmHWM and Arrow's allocated bytes after each stage of embed_dataset
(its body, stage by stage). Usage: python diag_embed.py N_CELLS"""
import json, sys, numpy as np, pyarrow as pa, torch
from pathlib import Path
torch.set_num_threads(1)
if len(sys.argv) > 2 and sys.argv[2] == "bound":
    from spatia_hf.utils.allocator import bound_heap_growth
    print("bound_heap_growth", bound_heap_growth())
def st(tag):
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            d[k] = int(v.split()[0]) / 1e6
    print(f"{tag:28s} anon {d['RssAnon']:.2f} GB file {d['RssFile']:.2f} GB hwm {d['VmHWM']:.2f} GB arrow {pa.total_allocated_bytes()/1e9:.3f} GB", flush=True)
n = int(sys.argv[1]); work = Path(f"/tmp/mem/diag{n}")
from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.synthetic import make_synthetic_sections
if not (work / "sections.json").exists():
    build_multiscale_dataset(make_synthetic_sections(1, n, 0), work, crop_px=64, niche_px=64, thumb_px=256, overwrite=True, progress=False)
from spatia_hf import SpatiaConfig, SpatiaModel, SpatiaProcessor
from spatia_hf.data import schema
from spatia_hf.data.datasets import load_spatia_dataset
import spatia_hf.inference as inf
genes = json.loads((work / "gene_panel.json").read_text())["genes"]
torch.manual_seed(0)
model = SpatiaModel(SpatiaConfig.from_preset("small", gene_vocab=genes, num_channels=2)).eval()
processor = SpatiaProcessor.from_config(model.config)
st("model")
data = load_spatia_dataset(work, configs=("cells", "niches"))
processor.map_dataset_panel(work)
cells = data.configs["cells"]
st("dataset loaded")
fused = inf.embed_cells_config(model, processor, cells, batch_size=64, progress=False)
st("cells embedded")
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
st("after malloc_trim(0)")
profiles = inf.expression_profiles_config(model, processor, cells) if model.config.niche_config.use_expression_profiles else None
st("profiles")
xy = np.stack([np.asarray(cells[schema.X_UM], np.float64), np.asarray(cells[schema.Y_UM], np.float64)], 1)
sids = np.asarray(cells[schema.SAMPLE_ID]).astype(str)
ids = np.asarray(cells[schema.CELL_ID]).astype(str)
st("columns")
inf.embed_cell_niches(model, fused, xy, sids, cell_profiles=profiles, batch_size=64, progress=False)
st("cell niches")
niches = data.configs["niches"]
emb, _ = inf.embed_niches_config(model, niches, ids, fused, cell_sample_ids=sids, cell_profiles=profiles, batch_size=16, progress=False)
st("grid niches")
pos = np.stack([np.asarray(niches[schema.X_UM], np.float32), np.asarray(niches[schema.Y_UM], np.float32)], 1)
inf.embed_sections(model, emb, pos, np.asarray(niches[schema.SAMPLE_ID]).astype(str))
st("tissue")
