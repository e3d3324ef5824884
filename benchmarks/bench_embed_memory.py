"""Memory of embedding whole sections: does it stream (bounded) and does the tissue model stay sub-quadratic?

Part ``embed``: one synthetic section of N cells is built into a dataset (``crop_px=64``, the small
preset's geometry), then a fresh child process loads a ``small`` SPATIA model and runs
``spatia_hf.inference.embed_dataset`` (cells -> niches -> tissue). Reported per N:

- ``baseline``: RSS of the child once the model is built (the same process, before embedding);
- ``peak``: the child's peak RSS during embedding (``VmHWM`` after ``/proc/self/clear_refs``), and the
  peak of its anonymous memory (``RssAnon``, sampled every 20 ms; file pages of the memory-mapped
  Arrow shards are reclaimable and excluded);
- with ``--out-dir``, ``embed_dataset(out_dir=...)`` writes the per-cell outputs into ``.npy`` files as
  they are made (memory-mapped) instead of holding them in memory;
- ``peak / baseline`` and the slope of the peak in MB per 1k cells between the sizes run, and the
  peak extrapolated linearly to 100k cells (the goal: < 4 GB on CPU at the small preset).

Part ``tissue``: the small preset's tissue model on 1k / 4k / 16k random niche tokens (positions on
a 50 µm grid), with its token merging and without (``merge_ratio=0``, same weights), each in a fresh
child process; reported: peak RSS increase of the forward over the process baseline, tokens per
layer, time, and the growth factor of memory per 4x tokens (quadratic would be 16x).

    python benchmarks/bench_embed_memory.py embed --cells 10000 30000 --work /tmp/bench_embed
    python benchmarks/bench_embed_memory.py embed --cells 10000 100000 --out-dir   # outputs to .npy files
    python benchmarks/bench_embed_memory.py tissue --tokens 1000 4000 16000 [--unmerged-max 4000]
    python benchmarks/bench_embed_memory.py all --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 2**30


# ----------------------------------------------------------------------------- /proc helpers (Linux)
def proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory fields in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset ``VmHWM`` (peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonPeak:
    """Samples ``RssAnon`` on a thread: the peak of non-file-backed resident memory (and, in
    ``file_peak``, of ``RssFile``: mapped file pages, which the kernel can drop and re-read)."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak, self.file_peak, self._stop = every_s, 0, 0, threading.Event()

    def _sample(self) -> None:
        st = proc_status()
        self.peak = max(self.peak, st.get("RssAnon", 0))
        self.file_peak = max(self.file_peak, st.get("RssFile", 0))

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def run_child(mode: str, payload: dict, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run this script in a fresh interpreter (clean heap) and return its JSON report."""
    cmd = [sys.executable, __file__, "_child", mode, json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} {payload} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


# ----------------------------------------------------------------------------- part 1: embedding a section
def build_dataset(n_cells: int, work: Path, seed: int = 0) -> Path:
    """A one-section synthetic dataset of ``n_cells`` (reused when already built)."""
    out = work / f"section_{n_cells}"
    if (out / "gene_panel.json").is_file():
        return out
    from spatia_hf.data.builder import build_multiscale_dataset
    from spatia_hf.data.synthetic import make_synthetic_sections

    sections = make_synthetic_sections(1, n_cells, seed)
    return build_multiscale_dataset(sections, out, crop_px=64, niche_px=64, thumb_px=256, overwrite=True,
                                    progress=False)


def child_embed(payload: dict) -> dict:
    import torch

    torch.set_num_threads(int(payload["threads"]))
    from spatia_hf.utils.allocator import bound_heap_growth

    bound_heap_growth()  # as `spatia embed` (every `spatia` command) does: measure what a user's run holds
    from spatia_hf import SpatiaConfig, SpatiaModel, SpatiaProcessor
    from spatia_hf.inference import embed_dataset

    genes = json.loads((Path(payload["dataset"]) / "gene_panel.json").read_text())["genes"]
    torch.manual_seed(0)
    model = SpatiaModel(SpatiaConfig.from_preset(payload["preset"], gene_vocab=genes, num_channels=2)).eval()
    processor = SpatiaProcessor.from_config(model.config)
    base = proc_status()
    reset_peak()
    start = time.perf_counter()
    with AnonPeak() as anon:
        emb = embed_dataset(model, processor, payload["dataset"], batch_size=int(payload["batch_size"]),
                            progress=False, out_dir=payload.get("out_dir"))
    took = time.perf_counter() - start
    st = proc_status()
    return {"n_cells": len(emb.cell_ids), "n_niches": int(emb.niches.shape[0]), "seconds": took,
            "cells_per_s": len(emb.cell_ids) / took, "baseline_rss_gb": base["VmRSS"] / GB,
            "baseline_anon_gb": base.get("RssAnon", 0) / GB, "peak_rss_gb": st["VmHWM"] / GB,
            "peak_anon_gb": anon.peak / GB, "peak_file_gb": anon.file_peak / GB,
            "tissue_finite": bool(torch.isfinite(torch.as_tensor(emb.tissues)).all())}


def bench_embed(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {"HF_DATASETS_CACHE": str(work / "hf_datasets_cache"), "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for n in args.cells:
        t = time.perf_counter()
        dataset = build_dataset(n, work)
        build_s = time.perf_counter() - t
        out_dir = str(work / f"outputs_{n}") if args.out_dir else None
        r = run_child("embed", {"dataset": str(dataset), "preset": args.preset, "batch_size": args.batch_size,
                                "threads": args.threads, "out_dir": out_dir}, env=env)
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
        r["build_s"] = build_s
        r["peak_over_baseline"] = r["peak_rss_gb"] / r["baseline_rss_gb"]
        rows.append(r)
        print(f"embed {n:>7} cells ({r['n_niches']} niches): peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(anon {r['peak_anon_gb']:.2f} GB, file {r['peak_file_gb']:.2f} GB), baseline {r['baseline_rss_gb']:.2f} GB, "
              f"peak/baseline {r['peak_over_baseline']:.2f}x, {r['seconds']:.0f} s ({r['cells_per_s']:.1f} cells/s)",
              flush=True)
        if not args.keep:
            shutil.rmtree(dataset, ignore_errors=True)
            shutil.rmtree(work / "hf_datasets_cache", ignore_errors=True)
    result = {"preset": args.preset, "threads": args.threads, "batch_size": args.batch_size,
              "out_dir": bool(args.out_dir), "command": " ".join(sys.argv), "rows": rows}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        dn = (b["n_cells"] - a["n_cells"]) / 1000
        for key in ("peak_rss_gb", "peak_anon_gb"):
            slope = (b[key] - a[key]) / dn  # GB per 1k cells
            result[f"{key}_slope_mb_per_1k_cells"] = slope * 1024
            result[f"{key}_extrapolated_100k"] = b[key] + slope * (100 - b["n_cells"] / 1000)
        result["seconds_extrapolated_100k"] = b["seconds"] * 100_000 / b["n_cells"]
        print(f"slope: {result['peak_rss_gb_slope_mb_per_1k_cells']:.1f} MB RSS / 1k cells "
              f"({result['peak_anon_gb_slope_mb_per_1k_cells']:.1f} MB anon); extrapolated to 100k cells: "
              f"peak RSS {result['peak_rss_gb_extrapolated_100k']:.2f} GB, anon "
              f"{result['peak_anon_gb_extrapolated_100k']:.2f} GB (goal < 4 GB), "
              f"~{result['seconds_extrapolated_100k'] / 60:.0f} min here", flush=True)
    return result


# ----------------------------------------------------------------------------- part 2: tissue model
def child_tissue(payload: dict) -> dict:
    import torch

    torch.set_num_threads(int(payload["threads"]))
    from spatia_hf.models.configuration_spatia import SpatiaConfig
    from spatia_hf.models.modeling_tissue import SpatiaTissueModel

    torch.manual_seed(0)
    config = SpatiaConfig.from_preset(payload["preset"], gene_vocab=["G0"]).tissue_config
    model = SpatiaTissueModel(config).eval()
    n = int(payload["tokens"])
    side = int(n**0.5) + 1
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    positions = (grid[:n].float() * 50.0)[None]  # a 50 µm niche grid
    emb = torch.randn(1, n, config.niche_embed_dim)
    merge = None if payload["merging"] else 0.0
    base = proc_status()
    reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(emb, positions, merge_ratio=merge)
    took = time.perf_counter() - start
    st = proc_status()
    return {"tokens": n, "merging": bool(payload["merging"]), "seconds": took,
            "peak_increase_mb": (st["VmHWM"] - base["VmRSS"]) / 2**20, "baseline_rss_mb": base["VmRSS"] / 2**20,
            "tokens_per_layer": list(out.num_tokens), "finite": bool(torch.isfinite(out.tissue_embeds).all())}


def bench_tissue(args) -> dict:
    rows = []
    for merging in (True, False):
        for n in args.tokens:
            if not merging and n > args.unmerged_max:
                continue
            r = run_child("tissue", {"tokens": n, "merging": merging, "preset": args.preset, "threads": args.threads},
                          env={"OMP_NUM_THREADS": str(args.threads)})
            rows.append(r)
            print(f"tissue {n:>6} tokens, merging {'on ' if merging else 'off'}: +{r['peak_increase_mb']:.0f} MB peak "
                  f"over baseline, {r['seconds']:.2f} s, tokens per layer {r['tokens_per_layer']}", flush=True)
    merged = [r for r in rows if r["merging"]]
    growth = [b["peak_increase_mb"] / max(a["peak_increase_mb"], 1e-9) for a, b in zip(merged, merged[1:])]
    token_growth = [b["tokens"] / a["tokens"] for a, b in zip(merged, merged[1:])]
    result = {"preset": args.preset, "rows": rows, "merged_memory_growth": growth, "token_growth": token_growth}
    for g, t in zip(growth, token_growth):
        print(f"merging on: memory x{g:.2f} for tokens x{t:.0f} (quadratic would be x{t * t:.0f})", flush=True)
    unmerged = {r["tokens"]: r for r in rows if not r["merging"]}
    for r in merged:
        if r["tokens"] in unmerged:
            u = unmerged[r["tokens"]]
            print(f"{r['tokens']} tokens: merging uses {r['peak_increase_mb'] / max(u['peak_increase_mb'], 1e-9):.2f}x "
                  f"the memory and {r['seconds'] / max(u['seconds'], 1e-9):.2f}x the time of the unmerged model",
                  flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        report = {"embed": child_embed, "tissue": child_tissue}[sys.argv[2]](json.loads(sys.argv[3]))
        print("REPORT " + json.dumps(report), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("embed", "tissue", "all"))
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 30_000], help="section sizes to embed")
    p.add_argument("--tokens", type=int, nargs="+", default=[1000, 4000, 16000], help="niche tokens (tissue)")
    p.add_argument("--unmerged-max", type=int, default=16000,
                   help="largest token count also run without merging (the unmerged baseline)")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--work", default="/tmp/bench_embed_memory", help="datasets are built here")
    p.add_argument("--keep", action="store_true", help="keep the built datasets")
    p.add_argument("--out-dir", action="store_true",
                   help="embed_dataset(out_dir=...): per-cell outputs written to .npy files as they are made")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = {}
    if args.part in ("tissue", "all"):
        results["tissue"] = bench_tissue(args)
    if args.part in ("embed", "all"):
        results["embed"] = bench_embed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
