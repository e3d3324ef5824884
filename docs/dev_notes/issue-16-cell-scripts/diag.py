"""Quick expression-branch diagnosis: train SpatiaForPretraining on cell batches (no images) for a few
steps with a variant objective, then probe the held-out section's embeddings."""
import sys, time, json, argparse
sys.path.insert(0, "/tmp/w16cell")
import numpy as np, torch
from probe_lib import Probe
from spatia_hf.training.datasets import load_spatia_dataset, split_by_section
from spatia_hf.training.arguments import ModelArguments
from spatia_hf.training.setup import new_config, build_processor, seed_everything
from spatia_hf.training.pretrain import init_value_biases
from spatia_hf.training.collators import CellCollator
from spatia_hf.modeling_heads import SpatiaForPretraining
from spatia_hf.modeling_losses import masked_mse
from spatia_hf.inference import embed_cells_config

ap = argparse.ArgumentParser(); ap.add_argument("--tissue", default="synA"); ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--variants", default="base,recon"); ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--overrides", default=None); ap.add_argument("--seeds", default="0"); ap.add_argument("--images", action="store_true")
args = ap.parse_args()
torch.set_num_threads(1)
T = args.tissue
ds = load_spatia_dataset(f"/tmp/w16cell/{T}-dataset", ("cells",))
probe = Probe(f"/tmp/w16cell/{T}/synth_s02.h5ad")
cells = ds["cells"]
train, held = split_by_section(cells, ["synth_s02"])
held_ids = np.asarray(held["cell_id"]).astype(str); order = {c: i for i, c in enumerate(held_ids)}
perm = np.array([order[c] for c in probe.cell_ids])
print(T, "PCA30", probe.score(probe.pca), flush=True)

def run(variant, seed=0):
    seed_everything(seed)
    ov = {"masked": "cell_reconstruction=masked", "all": "cell_reconstruction=all", "all3": "cell_reconstruction=all,cell_reconstruction_weight=3",
          "old": "cell_reconstruction=masked,cell_config.image_pool_sigma=0", "new": ""}[variant]
    margs = ModelArguments(preset="small", config_overrides=",".join(x for x in (args.overrides, ov) if x))
    model = SpatiaForPretraining(new_config(margs, ds))
    proc = build_processor(margs, model.config, ds, seed)
    init_value_biases(model, proc, ds, ["synth_s02"], seed)
    coll = CellCollator(proc, seed=seed, use_images=args.images, gene_mask_ratio=model.config.mgm_mask_ratio,
                        image_mask_ratio=model.config.mim_mask_ratio if args.images else None,
                        num_patches=model.spatia.cell.num_patches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    closs = []; rng = np.random.default_rng(seed); n = len(train); t0 = time.perf_counter(); logs = []
    view = train.with_format("numpy")
    for step in range(args.steps):
        lr = 1e-3 * min(1.0, (step + 1) / 20) * (1 - step / args.steps); [g.__setitem__("lr", lr) for g in opt.param_groups]
        rows = view[np.sort(rng.choice(n, args.batch, replace=False))]
        batch = coll([{k: rows[k][i] for k in rows} for i in range(args.batch)])
        batch.pop("gene_counts", None); batch.pop("size_factors", None)
        model.train(); out = model(**batch)
        loss = out.loss
        if False:
            table = model.spatia.cell.expression_encoder.gene_embeddings
            pred = model.cell_decoder(out.cell_embeds, batch["gene_ids"], table)
            rec = masked_mse(pred, batch["gene_values"], batch["gene_attention_mask"].bool())
            loss = loss + rec
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            logs.append((step, round(float(out.mgm_loss), 3), None if out.mim_loss is None else round(float(out.mim_loss), 3),
                         None if out.contrastive_loss is None else round(float(out.contrastive_loss), 3)))
        if out.contrastive_loss is not None:
            closs.append(float(out.contrastive_loss))
    dt = (time.perf_counter() - t0) / args.steps
    res_c = {"contrastive_last20": round(float(np.mean(closs[-20:])), 3), "chance": round(float(np.log(args.batch)), 3)} if closs else {}
    model.eval()
    res = {}
    for m in (["expression", "fused"] if args.images else ["expression"]):
        E = embed_cells_config(model.spatia, proc, held, modality=m, progress=False)[perm]
        res[m] = probe.score(E)
    print(json.dumps({"variant": variant, "seed": seed, "s_per_step": round(dt, 3), "log": logs, **res_c, **res}), flush=True)
    return model

for sd in map(int, args.seeds.split(",")):
    for v in args.variants.split(","):
        run(v, sd)
