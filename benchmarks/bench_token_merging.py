"""Benchmark spatially guided token merging: (1) in a small diffusers UNet against no merging and
tomesd, (2) the matching step alone at growing token counts against a dense (tomesd-style) matching.

Ratios, not seconds, are the result: every variant runs in this process on the same inputs,
round-robin, and each is timed by its fastest repeat (the least disturbed by other work on a
shared machine), in wall time and in this process's CPU time. On a busy machine use
``--threads 1``: then CPU time is pure work (no OpenMP spin-waiting) and its ratios are stable.
Output change is the relative L2 distance to the unmerged UNet's output. Peak memory of the
matching is measured in a fresh process (Linux: VmHWM reset through /proc/self/clear_refs).

    python benchmarks/bench_token_merging.py                 # both parts, batch 8, 64 px
    python benchmarks/bench_token_merging.py --threads 1     # stable ratios on a shared CPU
    python benchmarks/bench_token_merging.py --part matching --sizes 1000 4000 16000 64000
    python benchmarks/bench_token_merging.py --json out.json

Part 1 needs ``tomesd`` (``pip install tomesd==0.1.3``, in the dev extra); without it that column
is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable

import torch

from spatia_hf.pipelines.denoiser_merging import apply_token_merging
from spatia_hf.models.token_merging import spatial_bipartite_matching


def build_unet(size: int, cross_dim: int, heads: int, seed: int):
    """The benchmark denoiser: 3 levels (32/64/128 channels), attention at the two finest levels,
    ``heads`` attention heads per block (diffusers' ``attention_head_dim``, default 8)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    channels = (32, 64, 128)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,  # diffusers' name; it is the number of heads
        norm_num_groups=8,
    ).eval()


def _rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def bench_denoiser(args) -> dict:
    unet = build_unet(args.size, args.cross_dim, args.heads, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    sample = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    timestep = torch.full((args.batch,), 500, dtype=torch.long)
    cond = torch.randn(args.batch, 8, args.cross_dim, generator=g)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return unet(sample, timestep, encoder_hidden_states=cond).sample

    def plain():
        return None

    def ours(**kw) -> Callable[[], Callable[[], None]]:
        def setup():
            handle = apply_token_merging(unet, args.ratio, **kw)
            return handle.remove

        return setup

    variants: dict[str, Callable] = {
        "none": plain,
        "spatia": ours(),
        "spatia_kv_only": ours(merge_queries=False),
        "spatia_ds2": ours(max_downsample=2),
    }
    try:
        import tomesd

        def tome_setup():
            torch.manual_seed(args.seed)  # tomesd draws its random dst choice from the global RNG
            tomesd.apply_patch(unet, ratio=args.ratio)
            return lambda: tomesd.remove_patch(unet)

        variants["tomesd"] = tome_setup
    except ImportError:
        print("tomesd not installed: skipping its column", file=sys.stderr)

    outputs: dict[str, torch.Tensor] = {}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.repeats + 1):  # first round warms up (and caches neighbour lists)
        for name, setup in variants.items():
            undo = setup()
            start, start_cpu = time.perf_counter(), time.process_time()
            y = forward()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if undo is not None:
                undo()
            if rep == 0:
                outputs[name] = y
            else:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    result = {}
    for name in variants:
        result[name] = {
            "best_wall_s": round(min(wall[name]), 4),
            "best_cpu_s": round(min(cpu[name]), 4),
            # CPU time of this process is less disturbed than wall time by other work on the machine
            "speedup_wall": round(min(wall["none"]) / min(wall[name]), 3),
            "speedup_cpu": round(min(cpu["none"]) / min(cpu[name]), 3),
            "rel_l2_change": round(_rel_l2(outputs[name], outputs["none"]), 5),
        }
    # determinism: our merged output is identical when run again
    with apply_token_merging(unet, args.ratio):
        again = forward()
    result["spatia"]["deterministic"] = bool(torch.equal(again, outputs["spatia"]))
    return result


def _dense_matching(metric: torch.Tensor, r: int) -> torch.Tensor:
    """tomesd/ToMe-style matching: every source against every destination (quadratic)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    return node_max.argsort(dim=-1, descending=True)[:, :r]


def _matching_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    side = math.sqrt(n) * 15.0  # ~15 µm between neighbouring niches
    pos = torch.rand(1, n, 2, generator=g) * side
    metric = torch.randn(1, n, 64, generator=g)
    return pos, metric, n // 2 - 1


def _matching_fn(name: str, n: int, seed: int) -> Callable[[], object]:
    pos, metric, r = _matching_inputs(n, seed)
    if name == "spatia":
        return lambda: spatial_bipartite_matching(metric, pos, r, k=8)
    return lambda: _dense_matching(metric, r)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak_in_child(name: str, n: int, seed: int) -> None:
    """Child-process entry: print the peak resident-memory growth (bytes) while one matching runs.

    Linux only: the peak (VmHWM) is reset to the current RSS just before the call."""
    small = _matching_fn(name, 1000, seed)
    small()  # first-call set-up (thread pools, kernels) is not part of the measurement
    fn = _matching_fn(name, n, seed)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _vm_kib("VmRSS")
    fn()
    print(max(0, _vm_kib("VmHWM") - before) * 1024)


def _peak_bytes(name: str, n: int, seed: int) -> int:
    """Peak extra resident memory of one matching, measured in a fresh process (so earlier runs
    and the allocator's cache cannot hide it)."""
    import subprocess

    code = (
        "import sys; sys.argv = sys.argv[:1]; import runpy; "
        f"mod = runpy.run_path({os.path.abspath(__file__)!r}); "
        f"mod['_measure_peak_in_child']({name!r}, {n}, {seed})"
    )
    # a fixed mmap threshold makes glibc return every large freed block to the OS at once, so the
    # peak RSS follows the peak of live tensors instead of what the allocator keeps cached
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def bench_matching(args) -> list[dict]:
    rows = []
    for n in args.sizes:
        row = {"tokens": n}
        for name, limit in (("spatia", None), ("dense", args.dense_max)):
            if limit is not None and n > limit:
                row[f"{name}_s"] = None
                row[f"{name}_score_matrix_mb"] = round((n // 2) * (n - n // 2) * 4 / 2**20, 1)
                continue
            fn = _matching_fn(name, n, args.seed)
            fn()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            row[f"{name}_s"] = round(min(times), 4)
            row[f"{name}_peak_mb"] = round(_peak_bytes(name, n, args.seed) / 2**20, 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "denoiser", "matching"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--cross-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=8, help="attention heads per block (diffusers' default 8)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    p.add_argument("--dense-max", type=int, default=16000, help="largest N for the dense matching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    result_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": result_load,
        "args": vars(args),
    }
    if args.part in ("all", "denoiser"):
        result["denoiser"] = bench_denoiser(args)
        print(f"denoiser: batch {args.batch}, {args.size} px, ratio {args.ratio}")
        for name, row in result["denoiser"].items():
            print(
                f"  {name:15s} wall {row['best_wall_s']:7.3f} s ({row['speedup_wall']:4.2f}x)  "
                f"cpu {row['best_cpu_s']:7.3f} s ({row['speedup_cpu']:4.2f}x)  change {100 * row['rel_l2_change']:.2f}%"
            )
    if args.part in ("all", "matching"):
        result["matching"] = bench_matching(args)
        print("matching (k = 8, r = N/2 - 1, 64-d metric):")
        for row in result["matching"]:
            print(f"  {row}")
    if args.json:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
