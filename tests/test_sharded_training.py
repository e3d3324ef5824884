"""A sharded strategy on the CPU: FSDP2 (``fully_shard``) over gloo with two processes (torchrun); the
Trainer route refuses FSDP on the CPU, where accelerate would silently fall back to DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.synthetic import make_synthetic_sections

PROBE = Path(__file__).with_name("fsdp_pretrain_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_pretraining_shards_the_model_over_two_cpu_processes(tmp_path):
    data = build_multiscale_dataset(make_synthetic_sections(2, 150, seed=4), tmp_path / "data", crop_px=16,
                                    niche_px=16, thumb_px=32, progress=False)
    probe = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(PROBE), str(data), str(probe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(Path(f"{probe}.rank{r}.json").read_text()) for r in range(2)]
    for r in records:
        assert r["world_size"] == 2
        assert r["n_dtensor"] == r["n_params"]  # every parameter is sharded, logit_scale included
        assert r["local_numel"] < 0.6 * r["total_numel"]  # each rank holds about half the model
        assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][1] < r["losses"][0]
    assert sum(r["local_numel"] for r in records) >= records[0]["total_numel"]


def test_fsdp_on_the_cpu_is_refused_not_silently_ddp(tmp_path):
    from transformers import TrainingArguments

    from spatia_hf.training.setup import prepare_training_args

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp="full_shard auto_wrap",
                             fsdp_config={"fsdp_version": 2, "min_num_params": 1000})
    with pytest.raises(ValueError, match="fsdp"):
        prepare_training_args(args, self_supervised=True)
