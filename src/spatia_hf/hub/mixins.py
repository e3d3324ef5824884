"""Mixins that give the SPATIA model and pipeline classes the package's Hub behaviour: the SPATIA card
on ``save_pretrained`` / ``push_to_hub`` (one route for both), and pipeline loading from a Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import CommitInfo

from ..utils.io import staged_dir, weight_files
from .cards import write_model_card
from .push import push_model, push_pipeline, snapshot_pipeline

class SpatiaModelHubMixin:
    """Mix into a ``PreTrainedModel`` (before it in the bases): ``save_pretrained`` also writes the model
    card, and ``push_to_hub`` publishes weights + SPATIA card in one commit (transformers' own
    ``push_to_hub`` would replace the card with a generic one)."""

    def save_pretrained(self, save_directory, *args, model_card: bool = True, eval_results: Any = None, **kwargs):
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        token = kwargs.pop("token", None)
        if not kwargs.get("is_main_process", True):
            out = super().save_pretrained(save_directory, *args, **kwargs)
        else:  # staged, then moved in: never half-written, and the folder's other files are kept
            with staged_dir(save_directory, stale=weight_files("model")) as tmp:
                out = super().save_pretrained(tmp, *args, **kwargs)
                if model_card:
                    write_model_card(tmp, self, eval_results=eval_results, repo_id=repo_id)
        if push and kwargs.get("is_main_process", True):
            push_model(save_directory, repo_id or Path(save_directory).name, token=token, keep_card=True)
        return out

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, tags: Iterable[str] = (), max_shard_size: Any = None,
                    **card_kwargs) -> CommitInfo:
        """Publish this model with its card; ``card_kwargs`` (``eval_results``, ``dataset_id``,
        ``training_data``, ``license``) go to ``render_model_card``."""
        return push_model(self, repo_id, token=token, private=private, revision=revision,
                          commit_message=commit_message, commit_description=commit_description,
                          create_pr=create_pr, tags=tags, **card_kwargs)


class SpatiaPipelineHubMixin:
    """Mix into a ``DiffusionPipeline`` subclass (before it in the bases) so it loads from a Hub id and
    pushes with the SPATIA card.

    Why: ``save_pretrained`` records a component defined in this package by its module path
    (``["spatia_hf.pipelines.pipeline_spatia", "SpatiaDenoiser"]`` in ``model_index.json``). diffusers 0.42's
    ``DiffusionPipeline.download`` (run by ``from_pretrained`` for anything that is not a local folder)
    computes which files to fetch with ``_get_custom_components_and_folders``, which accepts a
    component library only if it is in ``LOADABLE_CLASSES`` (diffusers, transformers,
    onnxruntime.training), a ``diffusers.pipelines`` module, or a ``<component>/<module>.py`` file in the
    repo, and otherwise raises ``"... as defined in model_index.json does not exist in <repo>"``. Loading
    from a local folder never calls ``download`` and resolves the class from ``sys.modules`` (the
    package is imported), which works. So ``download`` is replaced by a plain ``snapshot_download`` of
    the repo (safetensors only; pickled weights are never fetched), after which ``from_pretrained``
    proceeds exactly as for a local folder. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) the
    cached snapshot is returned.
    """

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        return snapshot_pipeline(
            pretrained_model_name, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"), local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")))

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, revision: str | None = None,
                    safe_serialization: bool = True, **card_kwargs) -> CommitInfo:
        """Publish this pipeline with its card; ``card_kwargs`` go to ``render_pipeline_card``."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: spatia-hf publishes safetensors only. Fix: drop the argument")
        return push_pipeline(self, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, create_pr=create_pr, **card_kwargs)

