"""The Hugging Face Hub side of spatia-hf: cards, pushing, and the mixins that give the model and
pipeline classes both (imports nothing of the package above ``utils``).

- ``cards``: ``render_model_card`` / ``render_pipeline_card`` / ``render_dataset_card`` / ``write_model_card``
  (offline; evaluation results come in as plain data);
- ``push``: ``push_model`` / ``push_pipeline`` / ``push_dataset`` in one commit each, repo-id and token checks;
- ``mixins``: ``SpatiaModelHubMixin`` / ``SpatiaPipelineHubMixin``.

Datasets load by Hub id with ``spatia_hf.data.datasets.resolve_dataset_dir`` / ``load_spatia_dataset``.
"""

from .cards import (
    SPATIA_ARXIV_ID,
    SPATIA_CITATION,
    config_rows,
    load_eval_results,
    render_dataset_card,
    render_model_card,
    render_pipeline_card,
    report_eval_results,
    template_path,
    write_model_card,
)
from .mixins import SpatiaModelHubMixin, SpatiaPipelineHubMixin
from .push import folder_files, push_dataset, push_model, push_pipeline, resolve_token, snapshot_pipeline, validate_repo_id

__all__ = [
    "SPATIA_ARXIV_ID",
    "SPATIA_CITATION",
    "validate_repo_id",
    "resolve_token",
    "load_eval_results",
    "report_eval_results",
    "config_rows",
    "template_path",
    "render_model_card",
    "render_pipeline_card",
    "render_dataset_card",
    "write_model_card",
    "folder_files",
    "push_model",
    "push_pipeline",
    "push_dataset",
    "SpatiaModelHubMixin",
    "SpatiaPipelineHubMixin",
    "snapshot_pipeline",
]
