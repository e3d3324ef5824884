"""Issue 16's Show lines from the six `bench_user_path.py` JSONs of session 9 (mean +- sd over 3 pretraining seeds).

    python docs/dev_notes/session-9/bench_table.py docs/dev_notes/session-9/bench_*.json
"""
import json
import math
import sys
from pathlib import Path

ROWS = [("obs.spatia_domain_ARI", "spatia_domain ARI (refined Leiden)"),
        ("X_spatia_niche.domain_ARI_kmeans", "X_spatia_niche, k-means ARI"),
        ("PCA30_smoothed30nn.domain_ARI_kmeans", "PCA-30 smoothed 30 nn, k-means ARI"),
        ("X_spatia.type_macroF1", "X_spatia type macro-F1"),
        ("X_spatia.gene_recovery", "X_spatia gene recovery"),
        ("PCA30.gene_recovery", "PCA-30 gene recovery"),
        ("X_spatia_niche.NBR_log_pearson", "NBR programme from X_spatia_niche"),
        ("X_spatia.NBR_log_pearson", "NBR programme from X_spatia"),
        ("PCA30_smoothed30nn.NBR_log_pearson", "NBR programme from smoothed PCA"),
        ("pretrain.loss_contrastive.first", "contrastive loss, first logged"),
        ("pretrain.loss_contrastive.last", "contrastive loss, last logged"),
        ("pretrain.seconds_per_step", "seconds per pretraining step")]
data = {Path(p).stem.removeprefix("bench_"): json.loads(Path(p).read_text()) for p in sys.argv[1:]}
print("| figure | " + " | ".join(data) + " |")
print("|---|" + "---|" * len(data))
for key, label in ROWS:
    cells = []
    for d in data.values():
        v = d["mean_sd"].get(key)
        cells.append("-" if v is None or math.isnan(v["mean"]) else f"{v['mean']:.3f} +- {v['sd']:.3f}")
    print(f"| {label} | " + " | ".join(cells) + " |")
