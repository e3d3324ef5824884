"""``SpatiaPreTrainedModel``: what every SPATIA model shares.

All weight initialisation (transformers 5 builds models on the meta device, so nothing may be
initialised in ``__init__``), the attention/checkpointing capabilities, the checkpoint-kind check
of ``from_pretrained`` and the growth of the gene vocabulary.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .configuration_spatia import SpatiaCellConfig, SpatiaConfig
from ..hub.mixins import SpatiaModelHubMixin  # the SPATIA card on save_pretrained / push_to_hub
from .modeling_layers import init_module_parameters

# which checkpoint kinds (config model_type) each model kind may be loaded from
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
_COMPATIBLE = {
    "spatia_cell": ("spatia_cell", "spatia"),
    "spatia_niche": ("spatia_niche", "spatia"),
    "spatia_tissue": ("spatia_tissue", "spatia"),
    "spatia": ("spatia",),
}
_KIND_NAMES = {
    "spatia_cell": "SpatiaCellModel",
    "spatia_niche": "SpatiaNicheModel",
    "spatia_tissue": "SpatiaTissueModel",
    "spatia": "SpatiaModel (or a SPATIA head)",
}


class GeneTable(nn.Embedding):
    """An embedding with one row per vocabulary id; grows with ``resize_gene_vocab``.

    ``new_rows`` says how added rows start: ``"normal"`` (gene identities) or ``"zeros"`` (per-gene
    biases and dispersions).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 new_rows: str = "normal"):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.new_rows = new_rows

    def _spatia_init(self, std: float) -> None:
        if self.new_rows == "zeros":
            init.zeros_(self.weight)


class SpatiaPreTrainedModel(SpatiaModelHubMixin, PreTrainedModel):
    """Base class of the SPATIA models (cell, niche, tissue, composite, heads)."""

    config_class = PretrainedConfig
    base_model_prefix = "spatia"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _no_split_modules = ["SpatiaBlock", "SpatiaFusionLayer", "SpatiaTissueLayer"]
    # parameters once saved as 0-d scalars and now shaped (1,) (FSDP2 refuses scalars): from_pretrained and
    # load_state_dict reshape them when a checkpoint holds the old shape
    _legacy_scalar_parameters: tuple[str, ...] = ()
    # pretraining-only heads: a pretraining checkpoint loaded into SpatiaModel or a task head leaves
    # them out by design, so they are not reported as unexpected (the demo printed ~140 such lines)
    _keys_to_ignore_on_load_unexpected = [
        r"^(mgm_head|mae_decoder|image_projection|expression_projection|logit_scale|niche_decoder|cell_decoder"
        r"|niche_profile_decoder|tissue_decoder|tissue_mask_embedding)(\.|$)"
    ]

    def get_input_embeddings(self) -> None:
        """None: SPATIA has no single token table for transformers to resize or tie (its tokens are genes and
        image patches; grow the genes with :meth:`resize_gene_vocab`). It also keeps accelerate's FSDP2
        preparation from making the gene table its own unit: the pretraining decoders read that table's weight
        directly, outside its forward, so it must stay in the root unit."""
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.Module.load_state_dict (Trainer's resume path) with a checkpoint of the 0-d era
        reshape_legacy_scalars(state_dict, self._legacy_scalar_parameters, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Transformers' defaults for Linear/Conv/Embedding/LayerNorm, then SPATIA's own parameters."""
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02)
        init_module_parameters(module, std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` with a clear error when the checkpoint is another kind
        of SPATIA model (e.g. a cell checkpoint loaded as a tissue model)."""
        path = pretrained_model_name_or_path  # kept for the messages: a legacy load passes None on
        if kwargs.get("config") is None and path is not None:
            _check_checkpoint_kind(cls, path, kwargs)
        if cls._legacy_scalar_parameters and kwargs.get("state_dict") is None and path:
            legacy = legacy_scalar_state_dict(path, cls._legacy_scalar_parameters, kwargs)
            if legacy is not None:  # transformers takes a state dict only without a path: give the config instead
                if kwargs.get("config") is None:
                    kwargs["config"] = cls.config_class.from_pretrained(path, **_hub_kwargs(kwargs))
                kwargs["state_dict"] = legacy
                pretrained_model_name_or_path = None
        # SPATIA ships no Hub kernels; with the `kernels` package installed, transformers >= 5.2x would otherwise
        # fetch 'kernels-community/activation' for the GELUs when a device_map puts the model on a GPU, which fails
        # offline (seen on an H200 with HF_HUB_OFFLINE=1). Pass use_kernels=True to opt in.
        kwargs.setdefault("use_kernels", False)
        kwargs.setdefault("use_safetensors", True)  # never unpickle weights: a pytorch_model.bin is code run on load
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as err:  # a truncated or overwritten weight file: say which checkpoint
            raise ValueError(
                f"checkpoint {os.fspath(path)!r}: its safetensors weights cannot be read "
                f"({err}); the file is corrupt or truncated. Fix: re-download or re-save the checkpoint"
            ) from err
        except RuntimeError as err:
            if "mismatched" not in str(err):
                raise
            diff = _config_differences(path, kwargs)
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not fit {cls.__name__}: weight shapes "
                f"differ. Config fields that differ (checkpoint -> requested): {diff or 'see the load report'}. "
                "Fix: load without overriding the config, or pass ignore_mismatched_sizes=True to re-initialise "
                "the mismatched weights (e.g. after growing the vocabulary use model.resize_gene_vocab instead)"
            ) from err

    # ---------------------------------------------------------------- gene vocabulary
    @property
    def cell_config(self) -> SpatiaCellConfig:
        return self.config if isinstance(self.config, SpatiaCellConfig) else self.config.cell_config

    def resize_gene_vocab(self, new_genes: list[str], new_ensembl_ids: list[str | None] | None = None) -> list[str]:
        """Append the genes of ``new_genes`` not yet in the vocabulary; old rows are kept unchanged.

        Every per-gene table (gene embeddings, per-gene biases, NB dispersions) grows; new identity
        rows start normal(0, initializer_range), new bias rows at zero. Returns the added genes.
        """
        cfg = self.cell_config
        known = set(cfg.gene_vocab)
        added, added_ids = [], []
        for i, g in enumerate(new_genes):
            g = str(g)
            if g not in known:
                known.add(g)
                added.append(g)
                added_ids.append(None if new_ensembl_ids is None else new_ensembl_ids[i])
        if not added:
            return []
        old_size = cfg.vocab_size
        new_size = old_size + len(added)
        std = cfg.initializer_range
        for module in self.modules():
            if isinstance(module, GeneTable) and module.num_embeddings == old_size:
                _grow_table(module, new_size, std)
        if cfg.gene_ensembl_ids is not None or new_ensembl_ids is not None:
            old_ids = cfg.gene_ensembl_ids or [None] * len(cfg.gene_vocab)
            cfg.gene_ensembl_ids = list(old_ids) + added_ids
        cfg.gene_vocab = list(cfg.gene_vocab) + added
        if isinstance(self.config, SpatiaConfig):
            self.config.cell_config = cfg
        return added


@torch.no_grad()
def _grow_table(table: GeneTable, new_size: int, std: float) -> None:
    old = table.weight.data
    weight = torch.empty(new_size, old.shape[1], dtype=old.dtype, device=old.device)
    weight[: old.shape[0]] = old
    if table.new_rows == "zeros":
        weight[old.shape[0] :].zero_()
    else:
        weight[old.shape[0] :].normal_(0.0, std)
    table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
    table.num_embeddings = new_size


_IGNORED_FIELDS = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label",
                   "label2id", "return_dict", "output_hidden_states", "output_attentions"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k in _IGNORED_FIELDS:
            continue
        if isinstance(v, dict) and k.endswith("_config") and k != "vision_backbone_config":
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and len(v) > 8:
            out[f"{prefix}{k} (length)"] = len(v)
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hub_kwargs(kwargs: dict) -> dict:
    """The download arguments of a from_pretrained call (for reading other files of the same checkpoint)."""
    return {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}


def _config_differences(path, kwargs: dict) -> str:
    requested = kwargs.get("config")
    if requested is None or not hasattr(requested, "to_dict"):
        return ""
    hub_kwargs = _hub_kwargs(kwargs)
    try:
        saved, _ = PretrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError:
        return ""
    try:
        saved = type(requested).from_dict(saved).to_dict()
    except Exception:  # a checkpoint of another kind: compare what was written
        pass
    a, b = _flatten(saved), _flatten(requested.to_dict())
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")


def _check_checkpoint_kind(cls, path, kwargs: dict) -> None:
    expected = getattr(cls.config_class, "model_type", "")
    if expected not in _COMPATIBLE:
        return
    hub_kwargs = _hub_kwargs(kwargs)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError:
        return  # let transformers raise its own "not found" error
    found = config_dict.get("model_type")
    architectures = config_dict.get("architectures") or []
    if found == "spatia" and expected != "spatia" and any(a != "SpatiaModel" for a in architectures):
        # a head checkpoint stores the scales under "spatia.<scale>.": only SpatiaModel strips that prefix
        scale = expected.removeprefix("spatia_")
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} holds {architectures[0]} (a SPATIA head); its weights would not load "
            f"into {cls.__name__}. Fix: SpatiaModel.from_pretrained(path).{scale}"
        )
    if found is None or found in _COMPATIBLE[expected]:
        return
    what = _KIND_NAMES.get(found, f"a {found!r} model")
    raise ValueError(
        f"checkpoint {os.fspath(path)!r} holds model_type={found!r} ({what}), which cannot be loaded as "
        f"{cls.__name__} (model_type={expected!r}). Fix: load it with the matching class, "
        "e.g. transformers.AutoModel.from_pretrained(path) after `import spatia_hf`"
    )


def _safetensors_files(path, kwargs: dict) -> list[str]:
    """The checkpoint's safetensors weight files (one, or the shards of an index); [] when none is found."""
    import json

    from transformers.utils import cached_file

    hub_kwargs = _hub_kwargs(kwargs)

    def find(name: str) -> str | None:
        try:
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except OSError:
            return None

    single = find("model.safetensors")
    if single is not None:
        return [single]
    index = find("model.safetensors.index.json")
    if index is None:
        return []
    with open(index, encoding="utf-8") as fh:
        shards = sorted(set(json.load(fh)["weight_map"].values()))
    found = [find(shard) for shard in shards]
    return [f for f in found if f is not None]


def legacy_scalar_state_dict(path, names: tuple[str, ...], kwargs: dict) -> dict[str, torch.Tensor] | None:
    """The checkpoint's state dict with the 0-d parameters ``names`` reshaped to ``(1,)``, or None when it
    holds none (read from the safetensors headers only, so a current checkpoint costs nothing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = _safetensors_files(path, kwargs)
    scalar = False
    for file in files:
        with safe_open(file, framework="pt") as fh:
            scalar |= any(name in fh.keys() and fh.get_slice(name).get_shape() == [] for name in names)
    if not scalar:
        return None
    state = {}
    for file in files:
        state.update(load_file(file))
    return reshape_legacy_scalars(state, names)


def reshape_legacy_scalars(state: dict, names: tuple[str, ...], prefix: str = "") -> dict:
    """``state`` with every 0-d ``prefix + name`` of ``names`` reshaped to ``(1,)`` in place (and returned)."""
    for name in names:
        key = prefix + name
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    return state


__all__ = ["SpatiaPreTrainedModel", "GeneTable", "legacy_scalar_state_dict"]
