"""Faults: a conversion and a pretraining run are SIGKILLed mid-way, then resumed.

The child processes are the real entry points (the ``spatia`` console script and
``examples/pretrain.py``); the test waits for a progress marker / checkpoint on disk, kills the
process with SIGKILL (no cleanup handler runs), resumes, and compares with an uninterrupted run:
Parquet shards byte for byte, final weights and final loss exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spatia_hf.cli import main
from spatia_hf.data.builder import PROGRESS_DIR, interrupted_builds
from spatia_hf.data.synthetic import build_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
SPATIA = Path(sys.executable).with_name("spatia")
SIZES = ["--crop-px", "32", "--niche-px", "32", "--thumb-px", "64", "--no-progress"]


def child_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false"}


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600.0) -> float:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; returns the time waited. Fails if the child
    exits on its own first (it would not have been interrupted)."""
    start = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"child exited with {proc.returncode} before the kill point:\n{out[-3000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return time.monotonic() - start


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- conversion
@pytest.mark.slow
def test_killed_conversion_resumes_to_byte_identical_shards(tmp_path):
    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--sections", "4", "--cells", "400", "--seed", "2",
                 "--no-progress"]) == 0
    convert = ["convert", "synthetic", str(synth), *SIZES]
    reference = tmp_path / "reference"
    assert main([*convert, "--out", str(reference)]) == 0

    out = tmp_path / "ds"
    proc = subprocess.Popen([str(SPATIA), *convert, "--out", str(out)], env=child_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(proc, lambda: any((p / PROGRESS_DIR / "synth_s00.json").exists()
                                for p in tmp_path.glob(".ds.*.spatia-build")))
    [tmp] = interrupted_builds(out)

    markers = sorted(p.name for p in (tmp / PROGRESS_DIR).glob("synth_s*.json"))
    assert not out.exists() and "synth_s00.json" in markers and len(markers) < 4, markers  # really mid-way
    assert main([*convert, "--out", str(out), "--resume"]) == 0
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")) == []

    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want)
    shards = [k for k in want if k.endswith(".parquet")]
    assert len(shards) == 12
    for name in want:  # every shard, the card and the side files
        assert got[name] == want[name], f"{name} differs after the resume"


# ----------------------------------------------------------------------------- pretraining
def pretrain_cmd(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "examples" / "pretrain.py"), "--dataset_dir", str(dataset), "--output_dir",
            str(out), "--preset", "tiny", "--max_steps", "24", "--per_device_train_batch_size", "2",
            "--max_cells_per_niche", "4", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
            "--use_cpu", "--report_to", "none", "--optim", "adamw_torch", "--disable_tqdm", "true", "--seed", "0",
            *extra]


def final_loss(out: Path) -> float:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h and h.get("step") == 24][0]


@pytest.mark.slow
def test_killed_pretraining_resumes_to_identical_weights_and_loss(tmp_path):
    from safetensors.torch import load_file

    dataset = build_tiny_dataset(tmp_path / "ds", n_sections=2, n_cells=80, seed=1)
    env = child_env(tmp_path)
    reference = tmp_path / "reference"
    done = subprocess.run(pretrain_cmd(dataset, reference), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "run"
    checkpoint = out / "checkpoint-8"
    proc = subprocess.Popen(pretrain_cmd(dataset, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    kill_when(proc, (checkpoint / "trainer_state.json").exists)  # the Trainer writes it last
    assert not (out / "model.safetensors").exists()  # killed before the end
    early = out / "checkpoint-4" / "trainer_state.json"
    written = early.stat().st_mtime_ns

    resumed = subprocess.run(pretrain_cmd(dataset, out, "--resume_from_checkpoint", str(checkpoint)), env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 25))
    # it continued from step 8 rather than starting over (which would rewrite checkpoint-4)
    assert early.stat().st_mtime_ns == written

    assert final_loss(out) == final_loss(reference)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{k} differs after the resume")


# ----------------------------------------------------------------------------- reduced variants (default suite)
# One child process each (the cost is mostly its imports); the resume runs in this process. They check what the
# slow variants check at a smaller size, next to folders of the user's at every name a temporary ever had.
def plant_user_folders(target: Path) -> dict[Path, str]:
    placed = {}
    for suffix in (".tmp", ".tmp-build", ".old-build", ".tmp-save", ".old-save"):
        folder = target.with_name(target.name + suffix)
        folder.mkdir(parents=True)
        placed[folder / "mine.txt"] = suffix
    placed[target.with_name(f".{target.name}.tmp")] = "hidden"
    for path, text in placed.items():
        path.write_text(text)
    return placed


def assert_kept(placed: dict[Path, str]) -> None:
    for path, text in placed.items():
        assert path.read_text() == text, f"{path} changed"


def test_killed_conversion_resumes_quick(tmp_path):
    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--sections", "3", "--cells", "150", "--seed", "2",
                 "--no-progress"]) == 0
    convert = ["convert", "synthetic", str(synth), *SIZES]
    reference = tmp_path / "reference"
    assert main([*convert, "--out", str(reference)]) == 0

    out = tmp_path / "ds"
    placed = plant_user_folders(out)
    proc = subprocess.Popen([str(SPATIA), *convert, "--out", str(out)], env=child_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(proc, lambda: any((p / PROGRESS_DIR / "synth_s00.json").exists()
                                for p in tmp_path.glob(".ds.*.spatia-build")))
    [tmp] = interrupted_builds(out)
    assert not out.exists() and len(list((tmp / PROGRESS_DIR).glob("synth_s*.json"))) < 3  # really mid-way
    assert main([*convert, "--out", str(out), "--resume"]) == 0
    assert not tmp.exists() and interrupted_builds(out) == []
    assert files(out) == files(reference)
    assert_kept(placed)


def test_killed_pretraining_resumes_quick(tmp_path, monkeypatch):
    import runpy

    dataset = build_tiny_dataset(tmp_path / "ds", n_sections=2, n_cells=40, seed=1, crop_px=16, niche_px=16,
                                 thumb_px=32)
    out = tmp_path / "run"
    placed = plant_user_folders(out)

    cmd_ = pretrain_cmd(dataset, out)
    cmd_[cmd_.index("--max_steps") + 1], cmd_[cmd_.index("--save_steps") + 1] = "6", "2"
    proc = subprocess.Popen(cmd_, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    checkpoint = out / "checkpoint-2"
    kill_when(proc, (checkpoint / "trainer_state.json").exists)
    assert not (out / "model.safetensors").exists()
    written = (checkpoint / "trainer_state.json").stat().st_mtime_ns

    monkeypatch.setattr(sys, "argv", [*cmd_[1:], "--resume_from_checkpoint", str(checkpoint)])
    runpy.run_path(cmd_[1], run_name="__main__")  # the same script, resumed in this process
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 7))
    assert (checkpoint / "trainer_state.json").stat().st_mtime_ns == written  # continued, not started over
    assert_kept(placed)


def test_killed_generator_training_resumes_to_the_same_losses(tmp_path):
    from spatia_hf.training.generator import train_generator

    dataset = build_tiny_dataset(tmp_path / "ds", n_sections=2, n_cells=40, seed=1, crop_px=16, niche_px=16,
                                 thumb_px=32)
    common = dict(size="tiny", batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, progress=False, seed=3,
                  max_steps=8)
    torch.set_num_threads(1)
    full = train_generator(dataset, tmp_path / "full", **common)

    out = tmp_path / "gen"
    placed = plant_user_folders(out)
    (out / "checkpoints").mkdir(parents=True)
    placed.update(plant_user_folders(out / "checkpoints" / "checkpoint-2"))
    argv = [sys.executable, str(REPO / "examples" / "train_generator.py"), "--dataset_dir", str(dataset),
            "--out_dir", str(out)] + [x for k, v in common.items() for x in (f"--{k}", str(v).lower()
                                                                              if isinstance(v, bool) else str(v))]
    proc = subprocess.Popen(argv, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    kill_when(proc, (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists)
    assert not (out / "pipeline").exists()  # killed before the end
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                  if (p / "trainer_state.json").is_file())
    resumed = train_generator(dataset, out, resume_from_checkpoint="latest", **common)
    assert resumed.global_step == 8
    np.testing.assert_allclose(resumed.losses, full.losses[done[-1]:], rtol=1e-5)
    assert (out / "pipeline" / "model_index.json").is_file()
    assert_kept(placed)
