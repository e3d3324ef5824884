"""Throughput of the multi-scale builder (cells/s) against baselines run in the same process.

A synthetic section is written as a tiled uint16 OME-TIFF (like an instrument's morphology
image) and opened lazily (tifffile + zarr), then:

- ``naive per-cell reads``: slicing each cell's crop window straight from the lazy image, one
  cell at a time, and nothing else (no resize, no normalisation, no writing);
- ``tile reads``: reading every tile the builder reads, once (the I/O floor);
- ``builder``: ``build_multiscale_dataset`` end to end (validation, gene mapping, per-slide
  normalisation, cell + niche crops, resize, Parquet shards, thumbnail, card).

The builder's peak RSS is measured in a fresh child process (``--rss``).

    python benchmarks/bench_builder.py --cells 10000 --pixel-size 0.2125
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _section(args, workdir: Path):
    from spatia_hf.data.readers.images import open_image
    from spatia_hf.data.synthetic import make_synthetic_tissue, write_ome_tiff

    s = make_synthetic_tissue(1, args.cells, args.seed, pixel_size_um=args.pixel_size)[0]
    path = workdir / "image.ome.tif"
    write_ome_tiff(s.image, path, s.pixel_size_um, s.channel_names)
    image, _ = open_image(path)
    return replace(s, image=image), path


class _Clock:
    """Wall time and process CPU time (user + system, all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _naive_reads(section, crop_um: float, limit: int) -> float:
    from spatia_hf.data.crops import window_px, window_starts

    size = window_px(crop_um, section.pixel_size_um)
    r0, c0 = window_starts(section.centroids_px(), size)
    n = min(limit, section.n_cells)
    start = time.perf_counter()
    for i in range(n):
        np.asarray(section.image[:, max(r0[i], 0) : r0[i] + size, max(c0[i], 0) : c0[i] + size])
    return n / (time.perf_counter() - start)


def _tile_reads(section, crop_um: float, niche_um: float, tile_px: int) -> float:
    from spatia_hf.data.crops import TileGrid, window_px

    margin = max(window_px(crop_um, section.pixel_size_um), window_px(niche_um, section.pixel_size_um)) // 2 + 2
    grid = TileGrid(section.image, tile_px, margin)
    tiles = np.unique(grid.tile_of(section.centroids_px()))
    start = time.perf_counter()
    for t in tiles:
        grid.read(int(t))
    return section.n_cells / (time.perf_counter() - start)


def _build(section, out: Path, args, clock: "_Clock | None" = None) -> float:
    from spatia_hf.data.builder import build_multiscale_dataset

    clock = clock or _Clock()
    with clock:
        build_multiscale_dataset([section], out, crop_um=args.crop_um, crop_px=args.crop_px, niche_um=args.niche_um,
                                 niche_px=args.niche_px, tile_px=args.tile_px, progress=False, overwrite=True)
    return section.n_cells / clock.wall


def _peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM (reset by exec, unlike ru_maxrss, which a spawned child
    inherits from its parent on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(path: str, args, out: str, queue) -> None:
    """Build from the TIFF in a fresh process; report its peak RSS (MB)."""
    from spatia_hf.data.readers.images import open_image
    from spatia_hf.data.synthetic import make_synthetic_tissue

    s = make_synthetic_tissue(1, args.cells, args.seed, pixel_size_um=args.pixel_size, render=False)[0]
    before = _peak_rss_mb()
    image, _ = open_image(path)
    rate = _build(replace(s, image=image), Path(out), args)
    queue.put((rate, before, _peak_rss_mb()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=10000)
    p.add_argument("--pixel-size", type=float, default=0.2125, help="µm/px of the image (Xenium: 0.2125)")
    p.add_argument("--crop-um", type=float, default=32.0)
    p.add_argument("--crop-px", type=int, default=64)
    p.add_argument("--niche-um", type=float, default=50.0)
    p.add_argument("--niche-px", type=int, default=64)
    p.add_argument("--tile-px", type=int, default=2048)
    p.add_argument("--naive-cells", type=int, default=2000, help="cells timed for the naive baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss", action="store_true", help="also measure peak RSS of a build in a child process")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="bench_builder_"))
    try:
        t0 = time.perf_counter()
        section, path = _section(args, work)
        c, h, w = section.image.shape
        print(f"section: {section.n_cells} cells, image {c}x{h}x{w} uint16 ({path.stat().st_size / 1e6:.0f} MB tiled "
              f"OME-TIFF, {args.pixel_size} µm/px), crop {args.crop_um} µm -> {args.crop_px} px "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        naive = _naive_reads(section, args.crop_um, args.naive_cells)
        tiles = _tile_reads(section, args.crop_um, args.niche_um, args.tile_px)
        clock = _Clock()
        build = _build(section, work / "ds", args, clock)
        print(f"naive per-cell reads (crop only):  {naive:9.0f} cells/s")
        print(f"tile reads (I/O floor):            {tiles:9.0f} cells/s")
        print(f"builder end to end:                {build:9.0f} cells/s")
        print(f"ratio builder / naive reads:       {build / naive:9.2f}x")
        print(f"ratio builder / tile reads:        {build / tiles:9.2f}x")
        per_k = 1000 * clock.cpu / section.n_cells
        print(f"builder CPU time: {per_k:.2f} s per 1000 cells (all threads) -> at most {2000 / per_k:.0f} cells/s "
              f"on 2 idle cores; load average now {os.getloadavg()[0]:.1f}")
        if args.rss:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            proc = ctx.Process(target=_child, args=(str(path), args, str(work / "ds_rss"), q))
            proc.start()
            rate, before, peak = q.get()
            proc.join()
            print(f"child build: {rate:.0f} cells/s, peak RSS {peak:.0f} MB "
                  f"(before the build: {before:.0f} MB, imports + counts)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
