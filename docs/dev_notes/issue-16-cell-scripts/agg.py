import json, glob, numpy as np, collections
rows = collections.defaultdict(list)
for f in sorted(glob.glob("/tmp/w16cell/f?.log")):
    tissue = None
    for l in open(f):
        if "PCA30" in l: tissue = l.split()[0]
        if l.startswith('{"variant"'):
            d = json.loads(l); rows[(tissue, d["variant"])].append(d)
for (t, v), ds in sorted(rows.items()):
    def ms(get):
        x = np.array([get(d) for d in ds]); return f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else float('nan'):.3f}"
    print(f"| {t} | {v} | {sorted(d['seed'] for d in ds)} | {ms(lambda d: d['fused']['typeF1'])} | {ms(lambda d: d['fused']['gene_rec'])} | "
          f"{ms(lambda d: d['expression']['gene_rec'])} | {ms(lambda d: d['fused']['area_r'])} | {ms(lambda d: d['contrastive_last20'])} | {ms(lambda d: d['s_per_step'])} |")
