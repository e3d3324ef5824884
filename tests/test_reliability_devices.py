"""Devices: everything runs on a CPU-only machine, ``--device`` / ``device_map`` pick a GPU when one
is present, and no code outside the device-resolution helpers names ``cuda`` itself.

The GPU tests at the end run only where CUDA is available (skipped on the CPU CI machine).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import spatia_hf
from spatia_hf.utils.devices import resolve_device
from spatia_hf.commands._training import apply_device
from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.models.modeling_spatia import SpatiaModel

PACKAGE = Path(spatia_hf.__file__).parent
# (module, function) allowed to spell out device names: the only places that resolve --device
DEVICE_HELPERS = {("utils/devices.py", "resolve_device"), ("commands/_training.py", "apply_device")}
HAS_CUDA = torch.cuda.is_available()


def cuda_mentions(source: str, filename: str = "<string>") -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) for every ``"cuda"`` / ``"cuda:N"`` string literal and every
    ``.cuda()`` call in ``source`` (docstrings and help texts that merely mention CUDA do not count)."""
    tree = ast.parse(source, filename)
    found = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip().lower()
            if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit() or text == "cuda:"):
                found.append((func, node.lineno, repr(node.value)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            found.append((func, node.lineno, ".cuda()"))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_scanner_finds_hard_coded_cuda():
    bad = textwrap.dedent("""
        import torch
        x = torch.zeros(1).to("cuda")
        y = torch.zeros(1).cuda()
        def f(device="cuda:0"):
            return torch.device("CUDA")
    """)
    assert [w for _, _, w in cuda_mentions(bad)] == ["'cuda'", ".cuda()", "'cuda:0'", "'CUDA'"]
    ok = 'import torch\n"""Runs on CUDA when present."""\nif torch.cuda.is_available(): pass\nh = "cpu, cuda or mps"\n'
    assert cuda_mentions(ok) == []


def test_no_cuda_literal_outside_the_device_helpers():
    offending = []
    for module in sorted(PACKAGE.rglob("*.py")):
        rel = str(module.relative_to(PACKAGE))
        for func, line, what in cuda_mentions(module.read_text(), rel):
            if (rel, func) not in DEVICE_HELPERS:
                offending.append(f"{rel}:{line} in {func}: {what}")
    assert offending == [], "hard-coded CUDA:\n" + "\n".join(offending)


# ----------------------------------------------------------------------------- CPU-only machine
@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_device_resolution_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available here.*Fix: use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="--device 'gpu': not a device"):
        resolve_device("gpu")
    assert apply_device("cpu") == {"use_cpu": True}
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        apply_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda, cuda:N or mps"):
        apply_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_cli_asking_for_cuda_without_one_is_a_clear_error(tmp_path, capsys):
    from spatia_hf.cli import main

    rc = main(["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spatia pretrain: error: --device 'cuda': no CUDA GPU is available here. Fix: use --device cpu or "
                   "auto"]
    assert not (tmp_path / "run").exists()


def test_auto_picks_the_gpu_when_present(monkeypatch):
    """With CUDA reported present, 'auto' and explicit indices resolve to it (no GPU needed to check)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 GPU"):
        resolve_device("cuda:2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert apply_device("cuda:1") == {} and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert apply_device("auto") == {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("devices") / "model"
    SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(20)])).save_pretrained(path)
    return path


def _inputs(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 2, 32, 32, generator=g),
            "gene_ids": torch.randint(4, 24, (n, 6), generator=g),
            "gene_values": torch.rand(n, 6, generator=g)}


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_loads_where_asked(checkpoint, device_map):
    plain = SpatiaModel.from_pretrained(checkpoint).eval()
    mapped = SpatiaModel.from_pretrained(checkpoint, device_map=device_map).eval()
    expected = "cuda" if (device_map == "auto" and HAS_CUDA) else "cpu"
    assert {p.device.type for p in mapped.parameters()} == {expected}
    got = mapped.embed_cells(**_inputs())  # inputs on the CPU are moved to the model's device
    np.testing.assert_allclose(got, plain.embed_cells(**_inputs()), atol=1e-4 if expected == "cuda" else 0)


def test_cpu_run_with_cuda_hidden(tmp_path, checkpoint):
    """A fresh process that cannot see any GPU resolves 'auto' to the CPU and runs a model and the
    generation pipeline end to end."""
    script = textwrap.dedent(f"""
        import torch
        from spatia_hf.utils.devices import resolve_device
        from spatia_hf import SpatiaModel
        from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline
        device = resolve_device("auto")
        assert device.type == "cpu" and not torch.cuda.is_available(), device
        model = SpatiaModel.from_pretrained({str(checkpoint)!r}).to(device)
        emb = model.embed_cells(gene_ids=torch.tensor([[4, 5, 6]]), gene_values=torch.ones(1, 3))
        pipe = SpatiaGenerationPipeline.from_genes(["A", "B", "C"], image_size=16, size="tiny").to(device)
        pipe.set_progress_bar_config(disable=True)
        out = pipe([1.0, 2.0, 0.0], num_inference_steps=1, output_type="np")
        print("OK", device, emb.shape, out.images.shape)
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK cpu (1, 32) (1, 16, 16, 2)" in proc.stdout


# ----------------------------------------------------------------------------- with a GPU
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_embeddings_match_cpu(tmp_path, checkpoint):
    import json

    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.inference import embed_dataset
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    ds = build_tiny_dataset(tmp_path / "ds", n_sections=2, n_cells=50)
    genes = json.loads((ds / "gene_panel.json").read_text())["genes"]
    torch.manual_seed(0)
    model = SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=genes, num_channels=2)).eval()
    processor = SpatiaProcessor.from_config(model.config)
    cpu = embed_dataset(model, processor, ds, progress=False)
    gpu = embed_dataset(model.to(resolve_device("auto")), processor, ds, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    for a, b in ((cpu.cells["fused"], gpu.cells["fused"]), (cpu.niches, gpu.niches), (cpu.tissues, gpu.tissues)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_pipeline_generates_on_the_gpu():
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    pipe = SpatiaGenerationPipeline.from_genes(["A", "B", "C"], image_size=16, size="tiny").to(resolve_device("cuda"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1.0, 2.0, 0.0], num_inference_steps=2, output_type="pt",
               generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.images.shape == (1, 2, 16, 16) and torch.isfinite(out.images).all()
