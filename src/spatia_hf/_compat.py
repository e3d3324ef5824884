"""Module paths of spatia-hf 0.1 (before the package was layered into ``models/``, ``pipelines/``, ...).

Pipelines saved by 0.1 name their condition encoder ``["spatia_hf.condition_encoder", ...]`` in
``model_index.json``, and user code may import ``spatia_hf.modeling_spatia``. Both keep working: an
import of an old path loads the module at its new path and registers the same module object under the
old name (one module, one set of classes, so ``isinstance`` and Auto registration are unaffected).
New code should import the new paths; nothing in the package itself uses the old ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module path -> new module path
LEGACY_MODULE_PATHS: dict[str, str] = {
    **{f"spatia_hf.{name}": f"spatia_hf.models.{name}" for name in (
        "configuration_spatia", "modeling_base", "modeling_layers", "modeling_losses", "modeling_outputs",
        "modeling_cell", "modeling_niche", "modeling_tissue", "modeling_spatia", "modeling_heads",
        "processing_spatia", "token_merging")},
    "spatia_hf.utils.auto_registration": "spatia_hf.models.auto_registration",
    "spatia_hf.pipeline_spatia": "spatia_hf.pipelines.pipeline_spatia",
    "spatia_hf.condition_encoder": "spatia_hf.pipelines.condition_encoder",
    "spatia_hf.denoiser_merging": "spatia_hf.pipelines.denoiser_merging",
    "spatia_hf.training.datasets": "spatia_hf.data.datasets",
    "spatia_hf.training.collators": "spatia_hf.data.collators",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)  # the module itself, not a copy

    def exec_module(self, module) -> None:  # already executed under its new name
        pass


class _LegacyPathFinder(importlib.abc.MetaPathFinder):
    """Finds only the old paths of :data:`LEGACY_MODULE_PATHS`; everything else is left to the others."""

    def find_spec(self, fullname: str, path=None, target=None):
        new = LEGACY_MODULE_PATHS.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


_finder = _LegacyPathFinder()


def install_legacy_module_paths() -> None:
    """Make the 0.1 module paths importable (idempotent; run by ``import spatia_hf``)."""
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
