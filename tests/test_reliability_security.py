"""Security: no load path unpickles, and loading a checkpoint never runs code from it.

1. An AST scan of every module of the package: no ``torch.load`` without ``weights_only=True``, no
   ``pickle`` / ``dill`` / ``joblib`` / ``marshal`` / ``shelve`` loads, no ``pandas.read_pickle``, no
   ``numpy.load(allow_pickle=True)``, no ``eval``/``exec``, no ``trust_remote_code=True`` (aliases
   such as ``from torch import load as L`` are resolved). The scanner is itself tested on bad code.
2. Booby-trapped checkpoints: a ``pytorch_model.bin`` whose unpickling writes a marker file, placed
   beside (or instead of) the safetensors of a model and of a pipeline component, and a config whose
   ``auto_map`` points at a code file in the checkpoint. Loading must never create the marker.
"""

from __future__ import annotations

import ast
import json
import pathlib
from pathlib import Path

import pytest
import torch

import spatia_hf
from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.models.modeling_spatia import SpatiaModel

PACKAGE = Path(spatia_hf.__file__).parent

# qualified call name -> why it is refused
FORBIDDEN_CALLS = {
    **{f"pickle.{f}": "unpickles" for f in ("load", "loads", "Unpickler")},
    **{f"_pickle.{f}": "unpickles" for f in ("load", "loads", "Unpickler")},
    **{f"cPickle.{f}": "unpickles" for f in ("load", "loads")},
    **{f"dill.{f}": "unpickles" for f in ("load", "loads")},
    **{f"cloudpickle.{f}": "unpickles" for f in ("load", "loads")},
    "joblib.load": "unpickles",
    "marshal.load": "loads code objects",
    "marshal.loads": "loads code objects",
    "shelve.open": "unpickles",
    "pandas.read_pickle": "unpickles",
    "builtins.eval": "runs code",
    "builtins.exec": "runs code",
}


def _qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name for every import of a module (``np`` -> ``numpy``)."""
    names = {"eval": "builtins.eval", "exec": "builtins.exec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Every unsafe load in ``source`` as ``file:line: call (why)``."""
    tree = ast.parse(source, filename)
    names = _qualified_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted is None:
            continue
        root, _, rest = dotted.partition(".")
        qualified = names.get(root, root) + (f".{rest}" if rest else "")
        qualified = qualified.replace("numpy.", "np.", 1) if qualified.startswith("numpy.") else qualified
        why = None
        if qualified == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            why = "torch.load without weights_only=True"
        elif qualified in ("np.load", "np.lib.npyio.load") and _keyword(node, "allow_pickle") is not None and \
                not (isinstance(_keyword(node, "allow_pickle"), ast.Constant)
                     and _keyword(node, "allow_pickle").value is False):
            why = "numpy.load with allow_pickle"
        elif qualified in FORBIDDEN_CALLS:
            why = FORBIDDEN_CALLS[qualified]
        elif _is_true(_keyword(node, "trust_remote_code")):
            why = "trust_remote_code=True"
        if why:
            found.append(f"{filename}:{node.lineno}: {dotted}(...) ({why})")
    return found


def test_scanner_flags_every_unsafe_pattern():
    bad = """
import torch, pickle, numpy as np, joblib
import pandas as pd
from torch import load as tl
from pickle import loads
import torch as T
torch.load(f)
torch.load(f, weights_only=False)
tl(f)
T.load(f, map_location="cpu")
pickle.load(f)
loads(b)
np.load(f, allow_pickle=True)
joblib.load(f)
pd.read_pickle(f)
eval(text)
exec(text)
AutoModel.from_pretrained(p, trust_remote_code=True)
"""
    found = unsafe_calls(bad)
    assert len(found) == 12, "\n".join(found)
    good = """
import torch, numpy as np
from safetensors.torch import load_file
torch.load(f, weights_only=True)
np.load(f, allow_pickle=False)
np.load(f)
load_file(f)
json.loads(s)
model.eval()
"""
    assert unsafe_calls(good) == []


def test_package_has_no_unsafe_load_path():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40  # the scan really covers the package
    found = [hit for m in modules for hit in unsafe_calls(m.read_text(), str(m.relative_to(PACKAGE.parent)))]
    assert found == [], "unsafe load paths:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- booby-trapped checkpoints
class _Trap:
    """Unpickling this writes ``path``: proof that code from a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(str(self.path)), "code from the checkpoint ran"))


def _plant_bin(path: Path, marker: Path) -> None:
    torch.save({"weight": _Trap(marker)}, path)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=["A", "B", "C"])).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_the_trap_works(tmp_path):
    """Sanity: an unsafe ``torch.load`` of the planted file does run its code (so the tests below can fail)."""
    marker = tmp_path / "PWNED"
    _plant_bin(tmp_path / "trap.bin", marker)
    torch.load(tmp_path / "trap.bin", weights_only=False)
    assert marker.exists()


def test_pickled_weights_beside_safetensors_are_ignored(checkpoint, tmp_path):
    from transformers import AutoModel

    marker = tmp_path / "PWNED"
    _plant_bin(checkpoint / "pytorch_model.bin", marker)
    want = SpatiaModel.from_pretrained(checkpoint).state_dict()
    got = AutoModel.from_pretrained(checkpoint).state_dict()
    assert not marker.exists()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_pickled_weights_alone_are_refused(checkpoint, tmp_path):
    from transformers import AutoModel

    marker = tmp_path / "PWNED"
    (checkpoint / "model.safetensors").unlink()
    _plant_bin(checkpoint / "pytorch_model.bin", marker)
    for load in (SpatiaModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match="model.safetensors"):
            load(checkpoint)
    assert not marker.exists()


def test_auto_map_code_in_a_checkpoint_never_runs(checkpoint, tmp_path):
    """``import spatia_hf`` registers the classes, so no ``trust_remote_code`` is needed, and a
    config's ``auto_map`` pointing at a code file shipped with the checkpoint is not executed."""
    from transformers import AutoConfig, AutoModel

    marker = tmp_path / "PWNED"
    (checkpoint / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from spatia_hf import SpatiaModel as EvilModel\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert type(AutoConfig.from_pretrained(checkpoint)).__name__ == "SpatiaConfig"
    assert type(AutoModel.from_pretrained(checkpoint)) is SpatiaModel
    assert not marker.exists()


def test_pipeline_ignores_pickled_component_weights(tmp_path):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    marker = tmp_path / "PWNED"
    torch.manual_seed(0)
    SpatiaGenerationPipeline.from_genes(["A", "B", "C", "D"], image_size=16, size="tiny").save_pretrained(
        tmp_path / "pipe")
    unet = tmp_path / "pipe" / "unet"
    _plant_bin(unet / "diffusion_pytorch_model.bin", marker)
    SpatiaGenerationPipeline.from_pretrained(tmp_path / "pipe")  # safetensors beside it: the pickle is ignored
    assert not marker.exists()
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError):  # pickle alone: refused or unreadable by the weights-only loader
        SpatiaGenerationPipeline.from_pretrained(tmp_path / "pipe")
    assert not marker.exists()


def test_saved_artifacts_hold_no_pickles(checkpoint, tmp_path):
    """What the package writes (model, processor, pipeline) is safetensors + JSON only."""
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    SpatiaProcessor.from_config(SpatiaConfig.from_pretrained(checkpoint)).save_pretrained(checkpoint)
    SpatiaGenerationPipeline.from_genes(["A", "B"], image_size=16, size="tiny").save_pretrained(tmp_path / "pipe")
    for root in (checkpoint, tmp_path / "pipe"):
        suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
        assert suffixes <= {".json", ".safetensors", ".md"}, (root, suffixes)
    with pytest.raises(ValueError, match="safetensors only"):
        SpatiaGenerationPipeline.from_genes(["A", "B"], image_size=16, size="tiny").save_pretrained(
            tmp_path / "pipe2", safe_serialization=False)
