"""Register the SPATIA classes with transformers' Auto classes without importing them at ``import spatia_hf``.

``AutoConfig``/``AutoModel.from_pretrained(path)`` must find the SPATIA classes after a plain
``import spatia_hf`` (no ``trust_remote_code``), but importing them costs seconds (torch,
``transformers.modeling_utils``) that ``spatia --help`` or ``spatia_hf.data`` should not pay.
transformers' Auto mappings only accept real classes, so registration waits until it is needed:
until transformers has loaded ``configuration_auto`` (for the configs) and ``modeling_auto`` (for the
models). A post-import hook retries after each watched module finishes; the SPATIA modules are
imported only when none of the modules they need is half-imported (``from transformers import
AutoModel`` runs inside ``transformers.modeling_layers``' own import, for instance), else the next
watched module to finish retries. ``register_auto_classes()`` registers at once and raises on failure.
"""

from __future__ import annotations

import sys
import threading

from ..utils.import_hooks import add_post_import_hook, initializing, remove_post_import_hook

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"
PACKAGE = "spatia_hf"
# transformers modules the SPATIA configs / models import; they must be complete before we import ours.
_CONFIG_DEPS = ("transformers.configuration_utils", CONFIG_AUTO, f"{PACKAGE}.models.configuration_spatia")
_MODEL_DEPS = ("transformers.configuration_utils", CONFIG_AUTO, "transformers.modeling_utils",
               "transformers.modeling_layers", MODEL_AUTO)

_lock = threading.RLock()
_done = {"configs": False, "models": False}


def _register_configs() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration_spatia import SpatiaCellConfig, SpatiaConfig, SpatiaNicheConfig, SpatiaTissueConfig

    for config_cls in (SpatiaCellConfig, SpatiaNicheConfig, SpatiaTissueConfig, SpatiaConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)  # exist_ok: reloads are harmless
    _done["configs"] = True


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForPreTraining

    from .configuration_spatia import SpatiaCellConfig, SpatiaConfig, SpatiaNicheConfig, SpatiaTissueConfig
    from .modeling_cell import SpatiaCellModel
    from .modeling_heads import SpatiaForPretraining
    from .modeling_niche import SpatiaNicheModel
    from .modeling_spatia import SpatiaModel
    from .modeling_tissue import SpatiaTissueModel

    for config_cls, model_cls in ((SpatiaCellConfig, SpatiaCellModel), (SpatiaNicheConfig, SpatiaNicheModel),
                                  (SpatiaTissueConfig, SpatiaTissueModel), (SpatiaConfig, SpatiaModel)):
        AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForPreTraining.register(SpatiaConfig, SpatiaForPretraining, exist_ok=True)
    _done["models"] = True


def is_registered() -> bool:
    """True once both the configs and the models are known to the Auto classes."""
    return _done["configs"] and _done["models"]


def register_auto_classes() -> None:
    """Register the SPATIA configs and models with ``AutoConfig``/``AutoModel``/``AutoModelForPreTraining``
    now (imports torch and the models). Idempotent; errors are raised, not warned."""
    with _lock:
        if not _done["configs"]:
            _register_configs()
        if not _done["models"]:
            _register_models()
        remove_post_import_hook(try_register)


def _half_imported(names: tuple[str, ...] | list[str], finished: str) -> bool:
    """Whether a module among ``names`` is mid-import; ``finished`` has just run to its end (its flag
    is cleared only after the hook returns)."""
    return any(initializing(n) for n in names if n != finished)


def _own_modules() -> list[str]:
    return [n for n in list(sys.modules) if n == PACKAGE or n.startswith(PACKAGE + ".")]


def try_register(finished: str = "") -> None:
    """Register what can be registered safely now (a post-import hook; also run by ``import spatia_hf``)."""
    with _lock:
        if not _done["configs"] and CONFIG_AUTO in sys.modules and not _half_imported(_CONFIG_DEPS, finished):
            _register_configs()
        if (_done["configs"] and not _done["models"] and MODEL_AUTO in sys.modules
                and not _half_imported(list(_MODEL_DEPS) + _own_modules(), finished)):
            _register_models()
        if is_registered():
            remove_post_import_hook(try_register)


def _watched(name: str) -> bool:
    return name in _MODEL_DEPS or name.startswith(PACKAGE + ".")


def install() -> None:
    """Called by ``import spatia_hf``: registers now if transformers' Auto modules are loaded, else when they are."""
    if not is_registered():
        add_post_import_hook(_watched, try_register)
        try_register(finished=PACKAGE)
