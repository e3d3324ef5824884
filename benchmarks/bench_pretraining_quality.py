#!/usr/bin/env python
"""Does pretraining make useful cell embeddings? Probe and cluster them before and after a short run.

On a synthetic tissue built here (the last section held out), for the fused, expression-branch and
image-branch cell embeddings (``SpatiaCellModel`` outputs ``cell_embeds`` / ``expression_embeds`` /
``image_embeds``), at initialisation and after ``--steps`` pretraining steps:

- mean pairwise cosine (collapse shows as ~1.0),
- macro-F1 of a logistic-regression probe trained on the training sections, scored on the held-out one,
- ARI of clustering the held-out cells into as many groups as cell types (the evaluation's clustering),

next to the same probe / clustering on log1p expression (the baseline every embedding is held to), and
each objective's first and last logged loss. Seeds are fixed; the figures are the comparison, not time.

    python benchmarks/bench_pretraining_quality.py --preset tiny --steps 400 --lr 2e-3
    python benchmarks/bench_pretraining_quality.py --preset small --cells 1200 --sections 4 --steps 150 --batch-size 16 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _embeddings(model, processor, rows) -> dict[str, np.ndarray]:
    from spatia_hf.inference import encode_cells

    model.eval()
    out: dict[str, list] = {"fused": [], "expression": [], "image": []}
    n = len(rows["cell_id"])
    with torch.no_grad():
        for i in range(0, n, 128):
            o = model.spatia.cell(**encode_cells(processor, {k: v[i : i + 128] for k, v in rows.items()}, "fused"),
                                  return_dict=True)
            for key, t in (("fused", o.cell_embeds), ("expression", o.expression_embeds), ("image", o.image_embeds)):
                out[key].append(t.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _scores(x: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from spatia_hf.evaluation.tasks import cluster

    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sample = unit[:300]
    sim = sample @ sample.T
    cos = (sim.sum() - len(sample)) / (len(sample) * (len(sample) - 1))
    scaler = StandardScaler().fit(x[train])
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(x[train]), labels[train])
    f1 = f1_score(labels[~train], probe.predict(scaler.transform(x[~train])), average="macro")
    groups, _ = cluster(x[~train], len(set(labels)), seed=seed)
    return {"mean_cosine": round(float(cos), 4), "probe_macro_f1": round(float(f1), 3),
            "cluster_ari": round(float(adjusted_rand_score(labels[~train], groups)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8, help="niches per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sections", type=int, default=3)
    parser.add_argument("--cells", type=int, default=300, help="cells per section")
    parser.add_argument("--config-overrides", default=None, help="e.g. 'mim_weight=0.5,contrastive_weight=2'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="reuse/build the dataset here")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from spatia_hf.data import schema
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.models.modeling_heads import SpatiaForPretraining
    from spatia_hf.models.processing_spatia import SpatiaProcessor
    from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.pretrain import load_pretraining_model, run_pretraining
    from spatia_hf.training.setup import build_processor

    work = Path(args.data_root or tempfile.mkdtemp(prefix="spatia_quality_"))
    data = work / f"data_{args.sections}x{args.cells}"
    if not (data / "gene_panel.json").exists():
        build_tiny_dataset(data, n_sections=args.sections, n_cells=args.cells, seed=args.seed)
    ds = load_spatia_dataset(data, ["cells", "niches"])
    cells = ds["cells"]
    columns = [schema.CELL_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS]
    rows = cells.select_columns(columns).with_format("numpy")[:]
    sample_ids = np.asarray(cells[schema.SAMPLE_ID]).astype(str)
    labels = np.asarray(cells["cell_type"]).astype(str)
    held = sorted(set(sample_ids))[-1]
    train = sample_ids != held

    counts = np.zeros((len(labels), len(ds.genes)), np.float32)
    for r, (idx, cnt) in enumerate(zip(rows[schema.GENE_INDICES], rows[schema.GENE_COUNTS])):
        counts[r, idx] = cnt
    log1p = np.log1p(counts / counts.sum(1, keepdims=True).clip(1) * 1e4)
    result: dict = {"log1p": _scores(log1p, labels, train, args.seed), "held_out": held}

    model_args = ModelArguments(preset=args.preset, config_overrides=args.config_overrides)
    data_args = DataArguments(dataset_dir=str(data), eval_sections=held)
    model = load_pretraining_model(model_args, data_args, ds, args.seed)
    processor = build_processor(model_args, model.config, ds, args.seed)
    result["init"] = {k: _scores(v, labels, train, args.seed) for k, v in _embeddings(model, processor, rows).items()}

    out = work / f"pretrained_{args.preset}"
    training_args = SpatiaTrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, seed=args.seed, disable_tqdm=True, logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to="none", warmup_steps=max(0, min(20, args.steps // 10)), optim="adamw_torch",
        do_eval=False)
    run = run_pretraining(model_args, data_args, training_args, dataset=ds)
    trained = SpatiaForPretraining.from_pretrained(out)
    processor = SpatiaProcessor.from_pretrained(out)
    processor.map_dataset_panel(data)
    result["trained"] = {k: _scores(v, labels, train, args.seed)
                         for k, v in _embeddings(trained, processor, rows).items()}
    result["objectives_first_last"] = {k: [round(a, 3), round(b, 3)] for k, (a, b) in run.objective_first_last().items()}

    print(f"\npreset={args.preset} steps={args.steps} batch={args.batch_size} lr={args.lr} held-out={held}")
    print(f"{'embedding':<22} {'mean cos':>9} {'probe F1':>9} {'ARI':>7}")
    print(f"{'log1p (baseline)':<22} {'':>9} {result['log1p']['probe_macro_f1']:>9.3f} {result['log1p']['cluster_ari']:>7.3f}")
    for stage in ("init", "trained"):
        for k, s in result[stage].items():
            print(f"{stage + ' ' + k:<22} {s['mean_cosine']:>9.4f} {s['probe_macro_f1']:>9.3f} {s['cluster_ari']:>7.3f}")
    print("objectives (first -> last):", result["objectives_first_last"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
