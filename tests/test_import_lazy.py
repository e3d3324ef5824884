"""``import spatia_hf`` and ``spatia --help`` stay light; every public name still imports; the Auto
classes still know SPATIA after a plain import, whatever the import order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import spatia_hf

HEAVY = ("torch", "transformers", "diffusers", "datasets", "evaluate", "scanpy", "anndata", "pandas", "scipy")


def run_python(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (imports are process-wide) and return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def loaded_heavy(code: str) -> list[str]:
    out = run_python(code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    return json.loads(out.strip().splitlines()[-1])


def test_import_spatia_hf_loads_no_heavy_library():
    assert loaded_heavy("import spatia_hf") == []


def test_data_and_evaluation_packages_are_light():
    assert loaded_heavy("import spatia_hf.data, spatia_hf.evaluation, spatia_hf.data.defaults") == []


def test_cli_help_lists_every_command_without_heavy_imports():
    code = ("import contextlib, io\nfrom spatia_hf.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "import sys\nprint(buf.getvalue(), file=sys.stderr)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code + f"\nprint([m for m in {HEAVY!r} if m in sys.modules])"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"
    from spatia_hf.cli import COMMANDS

    for name in COMMANDS:
        assert f"\n    {name} " in res.stderr, name


def test_cli_builds_only_the_chosen_command():
    from spatia_hf.cli import build_parser

    parser = build_parser(["demo", "--help"])
    demo = parser._subparsers._group_actions[0].choices["demo"]
    assert "--no-progress" in demo._option_string_actions
    assert "--device" in demo._option_string_actions
    other = parser._subparsers._group_actions[0].choices["convert"]
    assert "--out" not in other._option_string_actions  # convert (readers, pandas) was not built


def test_every_command_accepts_no_progress():
    from spatia_hf.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser([name])
        sub = parser._subparsers._group_actions[0].choices[name]
        if sub._subparsers is None:
            assert "--no-progress" in sub._option_string_actions, name
        else:  # convert: each reader's parser
            for reader in sub._subparsers._group_actions[0].choices.values():
                assert "--no-progress" in reader._option_string_actions, name


def test_every_public_name_resolves_to_its_defining_module():
    import importlib

    for name in spatia_hf.__all__:
        value = getattr(spatia_hf, name)
        module = spatia_hf._LAZY.get(name)
        if module == name:
            assert value is importlib.import_module(f"spatia_hf.{name}")
        elif module is not None:
            assert value is getattr(importlib.import_module(f"spatia_hf.{module}"), name)
    from spatia_hf import SpatiaGenerationPipeline, SpatiaModel, tl  # noqa: F401

    assert set(spatia_hf.__all__) <= set(dir(spatia_hf))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NotAThing'"):
        spatia_hf.NotAThing  # noqa: B018
    with pytest.raises(ImportError):
        from spatia_hf import NotAThing  # noqa: F401


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny full model and its cell scale, saved (no auto_map: loading relies on registration)."""
    import torch

    from spatia_hf import SpatiaConfig, SpatiaModel

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(12)]))
    model.save_pretrained(root / "full")
    model.cell.save_pretrained(root / "cell")
    assert "auto_map" not in json.loads((root / "full" / "config.json").read_text())
    return root


def _auto_load(root) -> str:
    return (
        "\nfrom transformers import AutoModel, AutoModelForPreTraining\n"
        f"m = AutoModel.from_pretrained({str(root / 'full')!r})\n"
        f"c = AutoModel.from_pretrained({str(root / 'cell')!r})\n"
        f"p = AutoModelForPreTraining.from_pretrained({str(root / 'full')!r})\n"
        "print(type(m).__name__, type(c).__name__, type(p).__name__)\n"
    )


@pytest.mark.parametrize("first", [
    "from transformers import AutoModel\nimport spatia_hf",  # transformers' Auto modules already loaded
    "import spatia_hf.modeling_cell",  # a SPATIA module that imports AutoModel while half-imported
    "import spatia_hf\nfrom transformers import ViTModel",  # AutoModel imported inside transformers.modeling_layers
])
def test_auto_classes_know_spatia_whatever_the_import_order(first, checkpoints):
    out = run_python(first + _auto_load(checkpoints))
    assert out.split()[-3:] == ["SpatiaModel", "SpatiaCellModel", "SpatiaForPretraining"]


@pytest.mark.slow
@pytest.mark.parametrize("first", [
    "import spatia_hf\nfrom spatia_hf.modeling_spatia import SpatiaModel",
    "import spatia_hf.tl",
    "from spatia_hf.pipeline_spatia import SpatiaGenerationPipeline",
    "import spatia_hf\nfrom transformers import Trainer",
    "from transformers import ViTModel\nimport spatia_hf.configuration_spatia",
])
def test_auto_classes_know_spatia_more_import_orders(first, checkpoints):
    out = run_python(first + _auto_load(checkpoints))
    assert out.split()[-3:] == ["SpatiaModel", "SpatiaCellModel", "SpatiaForPretraining"]


def test_auto_config_alone_does_not_import_the_models(checkpoints):
    out = run_python(
        "import sys, spatia_hf\nfrom transformers import AutoConfig\n"
        f"c = AutoConfig.from_pretrained({str(checkpoints / 'full')!r})\n"
        "print(type(c).__name__, 'spatia_hf.modeling_spatia' in sys.modules)")
    assert out.split() == ["SpatiaConfig", "False"]


def test_register_auto_classes_registers_at_once():
    from transformers import AutoConfig, AutoModel

    from spatia_hf import SpatiaConfig, SpatiaModel, register_auto_classes
    from spatia_hf.models.auto_registration import is_registered

    register_auto_classes()
    assert is_registered()
    assert type(AutoConfig.for_model("spatia")) is SpatiaConfig
    assert AutoModel._model_mapping[SpatiaConfig] is SpatiaModel
