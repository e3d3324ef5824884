"""spatia-hf: SPATIA multi-scale multimodal models for image-based spatial transcriptomics.

Importing the package registers the SPATIA classes with transformers' Auto classes, so
``AutoModel.from_pretrained(path)`` works without ``trust_remote_code``.
"""

__version__ = "0.1.0"

# --- models (issue 3): exports and Auto-class registration -------------------------------
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining  # noqa: E402

from .configuration_spatia import (  # noqa: E402
    SpatiaCellConfig,
    SpatiaConfig,
    SpatiaNicheConfig,
    SpatiaTissueConfig,
)
from .modeling_cell import SpatiaCellModel, SpatiaExpressionEncoder, expression_encoder_state  # noqa: E402
from .modeling_heads import (  # noqa: E402
    SpatiaForCellClassification,
    SpatiaForExpressionPrediction,
    SpatiaForGeneImputation,
    SpatiaForPretraining,
    SpatiaForTissueClassification,
)
from .modeling_niche import SpatiaNicheModel  # noqa: E402
from .modeling_spatia import SpatiaModel  # noqa: E402
from .modeling_tissue import SpatiaTissueModel  # noqa: E402
from .processing_spatia import SpatiaProcessor  # noqa: E402


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel``/``AutoModelForPreTraining`` know the SPATIA model types.

    ``exist_ok=True`` keeps re-imports (and reloads in notebooks) harmless.
    """
    for config_cls, model_cls in (
        (SpatiaCellConfig, SpatiaCellModel),
        (SpatiaNicheConfig, SpatiaNicheModel),
        (SpatiaTissueConfig, SpatiaTissueModel),
        (SpatiaConfig, SpatiaModel),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForPreTraining.register(SpatiaConfig, SpatiaForPretraining, exist_ok=True)


_register_auto_classes()

# --- generation (issue 4): the diffusers pipeline and its condition encoder -------------------
from .condition_encoder import SpatiaConditionEncoder  # noqa: E402
from .pipeline_spatia import SpatiaGenerationPipeline, SpatiaPipelineOutput  # noqa: E402

# --- scanpy-style tools: spatia_hf.tl.embed(adata, image, model) --------------------------------
from . import tl  # noqa: E402

__all__ = [
    "tl",
    "SpatiaGenerationPipeline",
    "SpatiaPipelineOutput",
    "SpatiaConditionEncoder",
    "__version__",
    "SpatiaCellConfig",
    "SpatiaNicheConfig",
    "SpatiaTissueConfig",
    "SpatiaConfig",
    "SpatiaCellModel",
    "SpatiaExpressionEncoder",
    "SpatiaNicheModel",
    "SpatiaTissueModel",
    "SpatiaModel",
    "SpatiaForPretraining",
    "SpatiaForCellClassification",
    "SpatiaForGeneImputation",
    "SpatiaForExpressionPrediction",
    "SpatiaForTissueClassification",
    "SpatiaProcessor",
    "expression_encoder_state",
]
