# Background brightness of real vs generated held-out crops (DAPI / boundary percentiles), at 12 / 25 / 50 steps, guidance 2.
# usage: python docs/dev_notes/session-11/background_probe.py PIPELINE  (demo dataset at /tmp/demo7/dataset)
import sys, numpy as np, torch
from spatia_hf import SpatiaGenerationPipeline
from spatia_hf.data.datasets import load_spatia_dataset, split_by_section
from spatia_hf.data import schema
from spatia_hf.training.loop import dense_counts
from spatia_hf.evaluation.generation import generate_images, at_resolution
pipe = SpatiaGenerationPipeline.from_pretrained(sys.argv[1]); pipe.set_progress_bar_config(disable=True)
data = load_spatia_dataset("/tmp/demo7/dataset", ["cells"]); genes = list(data.genes)
train, held = split_by_section(data["cells"], ["synth_s03"])
h = held.with_format("numpy", columns=[schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS])[:120]
real = at_resolution(np.asarray(h[schema.IMAGE]).astype(np.uint8), 32)
counts = dense_counts(h[schema.GENE_INDICES], h[schema.GENE_COUNTS], len(genes)).numpy()
def stats(x, name):
    x = x.astype(np.float64) / 255
    for c in range(2):
        pl = x[:, c].reshape(len(x), -1)
        print(name, "ch", c, "p10 %.4f p50 %.4f p90 %.4f mean %.4f" % tuple(np.percentile(pl, [10, 50, 90], axis=1).mean(1).tolist() + [pl.mean()]),
              "corner %.4f" % x[:, c, :6, :6].mean())
stats(real, "real")
for steps in (12, 25, 50):
    for g in (2.0,):
        gen, _ = generate_images(pipe, counts, genes, num_inference_steps=steps, guidance_scale=g, seed=0, out_px=64)
        stats(gen, f"gen s{steps} g{g}")
