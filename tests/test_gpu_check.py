"""benchmarks/gpu_check.sh --dry-run: the GPU check's code paths (dataset, pretraining step, generation with and
without token merging, the DDP decision) on the CPU at a tiny size, as the script runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    by_check = {}
    for r in rows:
        by_check.setdefault(r["check"], []).append(r)
    (pre,) = by_check["pretraining"]
    assert pre["cells_per_s"] > 0 and pre["finite"] and pre["attn"] == "sdpa"
    gen = by_check["generation"]
    assert [g["token_merging_ratio"] for g in gen] == [0.0, 0.5] and all(g["images_per_s"] > 0 for g in gen)
    assert by_check["ddp"][0]["skipped"] and by_check["fsdp"][0]["skipped"]
