"""spatia-hf: SPATIA multi-scale multimodal models for image-based spatial transcriptomics.

The import is lazy (PEP 562), so ``import spatia_hf``, ``spatia --help`` and ``spatia_hf.data`` do not
pay for torch, transformers' models, diffusers, datasets or scanpy: every public name below is
imported from its module on first access (``from spatia_hf import SpatiaModel`` works as before).

Importing the package still registers the SPATIA classes with transformers' Auto classes, so
``AutoConfig``/``AutoModel.from_pretrained(path)`` work without ``trust_remote_code``: the
registration runs as soon as transformers loads its Auto modules (see
``spatia_hf.models.auto_registration``), or at once with ``spatia_hf.register_auto_classes()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._compat import install_legacy_module_paths as _install_legacy_module_paths
from .models.auto_registration import install as _install_auto_registration
from .models.auto_registration import register_auto_classes
from .utils.progress import progress_bars
from .utils.version import __version__


# public name -> module (relative to the package) that defines it; a submodule maps to itself.
_LAZY: dict[str, str] = {
    # models (issue 3)
    "SpatiaCellConfig": "models.configuration_spatia",
    "SpatiaNicheConfig": "models.configuration_spatia",
    "SpatiaTissueConfig": "models.configuration_spatia",
    "SpatiaConfig": "models.configuration_spatia",
    "SpatiaCellModel": "models.modeling_cell",
    "SpatiaExpressionEncoder": "models.modeling_cell",
    "expression_encoder_state": "models.modeling_cell",
    "SpatiaNicheModel": "models.modeling_niche",
    "SpatiaTissueModel": "models.modeling_tissue",
    "SpatiaModel": "models.modeling_spatia",
    "SpatiaForPretraining": "models.modeling_heads",
    "SpatiaForCellClassification": "models.modeling_heads",
    "SpatiaForGeneImputation": "models.modeling_heads",
    "SpatiaForExpressionPrediction": "models.modeling_heads",
    "SpatiaForTissueClassification": "models.modeling_heads",
    "SpatiaProcessor": "models.processing_spatia",
    # generation (issue 4): the diffusers pipeline and its condition encoder
    "SpatiaConditionEncoder": "pipelines.condition_encoder",
    "SpatiaGenerationPipeline": "pipelines.pipeline_spatia",
    "SpatiaPipelineOutput": "pipelines.pipeline_spatia",
    # scanpy-style tools: spatia_hf.tl.embed(adata, image, model)
    "tl": "tl",
}

__all__ = ["__version__", "register_auto_classes", "progress_bars", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the value in the package namespace."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if module_name == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from . import tl
    from .pipelines.condition_encoder import SpatiaConditionEncoder
    from .models.configuration_spatia import SpatiaCellConfig, SpatiaConfig, SpatiaNicheConfig, SpatiaTissueConfig
    from .models.modeling_cell import SpatiaCellModel, SpatiaExpressionEncoder, expression_encoder_state
    from .models.modeling_heads import (
        SpatiaForCellClassification,
        SpatiaForExpressionPrediction,
        SpatiaForGeneImputation,
        SpatiaForPretraining,
        SpatiaForTissueClassification,
    )
    from .models.modeling_niche import SpatiaNicheModel
    from .models.modeling_spatia import SpatiaModel
    from .models.modeling_tissue import SpatiaTissueModel
    from .pipelines.pipeline_spatia import SpatiaGenerationPipeline, SpatiaPipelineOutput
    from .models.processing_spatia import SpatiaProcessor

_install_legacy_module_paths()
_install_auto_registration()
