"""Random-init image branch: does mean pooling over the whole crop dilute the centre cell? Type F1 / area r."""
import sys, json
sys.path.insert(0, "/tmp/w16cell")
import numpy as np, torch
from probe_lib import Probe
from spatia_hf.training.datasets import load_spatia_dataset, split_by_section
from spatia_hf.training.arguments import ModelArguments
from spatia_hf.training.setup import new_config, build_processor, seed_everything
from spatia_hf.modeling_heads import SpatiaForPretraining
torch.set_num_threads(1)
T = sys.argv[1]
ds = load_spatia_dataset(f"/tmp/w16cell/{T}-dataset", ("cells",)); probe = Probe(f"/tmp/w16cell/{T}/synth_s02.h5ad")
_, held = split_by_section(ds["cells"], ["synth_s02"])
ids = np.asarray(held["cell_id"]).astype(str); order = {c: i for i, c in enumerate(ids)}; perm = np.array([order[c] for c in probe.cell_ids])
seed_everything(0); m = SpatiaForPretraining(new_config(ModelArguments(preset="small"), ds)).eval(); proc = build_processor(ModelArguments(preset="small"), m.config, ds, 0)
imgs = proc.preprocess_images(np.asarray(held.with_format("numpy")["image"]))
g = m.spatia.cell.image_encoder.grid_size; yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij"); c = (g - 1) / 2
r2 = torch.tensor(((yy - c) ** 2 + (xx - c) ** 2).reshape(-1), dtype=torch.float32)
reps = {"mean": [], **{f"gauss{s}": [] for s in (1.0, 1.5, 2.5)}}
with torch.no_grad():
    for s in range(0, len(imgs), 100):
        tok, _ = m.spatia.cell.encode_image(imgs[s:s + 100]); tok = tok[:, 1:]
        reps["mean"].append(tok.mean(1))
        for sg in (1.0, 1.5, 2.5):
            w = torch.exp(-r2 / (2 * sg ** 2)); reps[f"gauss{sg}"].append((tok * (w / w.sum())[None, :, None]).sum(1))
print("grid", g, "crop px", imgs.shape)
for k, v in reps.items():
    print(k, json.dumps(probe.score(torch.cat(v).numpy()[perm])), flush=True)
P = imgs.numpy(); H = P.shape[-1]
print("pixels_all", json.dumps(probe.score(P.reshape(len(P), -1)[perm][:, ::4])))
q = H // 4; cen = P[:, :, H//2-q:H//2+q, H//2-q:H//2+q]
print("pixels_centre_half", json.dumps(probe.score(cen.reshape(len(P), -1)[perm])))
