"""Hub publishing: cards, repo-id/token checks, and push -> download -> offline load round trips
through the loopback Hub (``tests/hub_server.LoopbackHub``) for a model, the generation pipeline and
datasets. What was published is read back the way users and the Hub read it, through
``huggingface_hub`` itself (``HfApi`` listings and commits, ``hf_hub_download``, ``ModelCard`` /
``ModelCardData`` parsing, HTTP status codes), never through the stand-in server's own state or
messages. Every test keeps Hugging Face caches in its own temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

import spatia_hf
from spatia_hf import hub
from hub_server import LoopbackHub, isolated_hf_home

REPO_ROOT = Path(__file__).resolve().parents[1]
GENES = [f"GENE{i}" for i in range(12)]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture
def hf_home(tmp_path):
    with isolated_hf_home(tmp_path / "hf_home") as root:
        yield Path(root)


@pytest.fixture
def loopback(hf_home):
    with LoopbackHub() as server:
        yield server


def _tiny_cell_model():
    from spatia_hf import SpatiaCellConfig, SpatiaCellModel

    torch.manual_seed(0)
    config = SpatiaCellConfig.from_preset("tiny", gene_vocab=GENES, image_size=16)
    return SpatiaCellModel(config).eval()


def _cell_inputs(n: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((n, len(GENES)), 2.0), generator=g)
    return {"pixel_values": torch.rand(n, 2, 16, 16, generator=g),
            "gene_ids": torch.arange(4, 4 + len(GENES)).expand(n, -1).clone(),
            "gene_values": torch.log1p(counts),
            "gene_attention_mask": torch.ones(n, len(GENES), dtype=torch.long)}


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file: proof that a folder was not touched."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hub_files(server: LoopbackHub, repo_id: str, repo_type: str = "model", revision: str = "main"
               ) -> dict[str, bytes]:
    """The repo's files as huggingface_hub lists and downloads them (the client's view of the commit),
    through a throw-away cache so the test's own cache stays as the code under test left it."""
    import tempfile

    with server.client(), tempfile.TemporaryDirectory() as cache:
        paths = HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision)
        return {p: Path(hf_hub_download(repo_id, p, repo_type=repo_type, revision=revision,
                                        cache_dir=cache)).read_bytes() for p in paths}


def _commits(server: LoopbackHub, repo_id: str, repo_type: str = "model") -> list:
    with server.client():
        return HfApi().list_repo_commits(repo_id, repo_type=repo_type)


def _assert_uploaded_as_is(server: LoopbackHub, folder: Path, repo_id: str, repo_type: str = "model",
                           revision: str = "main") -> dict[str, bytes]:
    remote = _hub_files(server, repo_id, repo_type, revision)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for path, data in local.items():
        if path != "README.md":
            assert remote[path] == data, f"{path} differs after upload"
    assert set(remote) == set(local) | {".gitattributes", "README.md"}
    return remote


# ---------------------------------------------------------------------------------- checks before the network
@pytest.mark.parametrize("repo_id", ["lab/spatia-tiny", "Lab_2/spatia.v1", "u/x"])
def test_validate_repo_id_accepts_org_name(repo_id):
    assert hub.validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["spatia-tiny", "a/b/c", "lab/bad name", "lab/-x", "lab/a--b", "lab/x.git", ""])
def test_validate_repo_id_rejects_bad_forms(repo_id):
    with pytest.raises(ValueError, match="repo_id=") as err:
        hub.validate_repo_id(repo_id)
    assert "Fix" in str(err.value)


def test_push_without_token_fails_before_any_request(loopback, hf_home, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    model = _tiny_cell_model()
    model.save_pretrained(tmp_path / "ckpt")
    with loopback.client(), pytest.raises(ValueError, match="no Hugging Face token.*HF_TOKEN"):
        hub.push_model(tmp_path / "ckpt", "lab/spatia-tiny")
    with loopback.client(), pytest.raises(ValueError, match="ORG/NAME"):
        hub.push_model(tmp_path / "ckpt", "spatia-tiny", token=loopback.token)
    assert loopback.requests == []


def test_folder_files_refuses_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04")  # Trainer bookkeeping: skipped, not refused
    with pytest.raises(ValueError, match=r"pickled weights \['pytorch_model.bin'\].*safetensors"):
        hub.folder_files(tmp_path)


def test_templates_ship_in_the_package_and_match_model_cards():
    for kind, name in hub.cards.TEMPLATE_FILES.items():
        packaged = hub.template_path(kind)
        assert packaged.is_file(), packaged
        assert (REPO_ROOT / "model_cards" / name).read_text() == packaged.read_text()


# ---------------------------------------------------------------------------------- cards (offline)
def _train_tiny_classifier(steps: int):
    """A tiny SpatiaForCellClassification trained ``steps`` AdamW steps on cells whose type drives marker
    genes and image intensity, scored on held-out cells against a logistic-regression baseline in the
    evaluation package's ``results.json`` format (task 3, fine-tuned annotation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from spatia_hf import SpatiaConfig, SpatiaForCellClassification
    from spatia_hf.evaluation.report import results_to_json
    from spatia_hf.evaluation.tasks import TASKS, TaskResult

    def cells(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (n,), generator=g)
        rate = 1.0 + 6.0 * torch.nn.functional.one_hot(y * 4, len(GENES)).float()
        counts = torch.poisson(rate, generator=g)
        inputs = {"pixel_values": torch.rand(n, 2, 16, 16, generator=g) + 0.5 * y[:, None, None, None],
                  "gene_ids": torch.arange(4, 4 + len(GENES)).expand(n, -1).clone(),
                  "gene_values": torch.log1p(counts),
                  "gene_attention_mask": torch.ones(n, len(GENES), dtype=torch.long)}
        return inputs, y

    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=GENES, image_size=16, num_labels=3,
                                      id2label={0: "T_cell", 1: "macrophage", 2: "tumor"})
    model = SpatiaForCellClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        inputs, y = cells(12, seed=step)
        model(**inputs, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    test_inputs, y_test = cells(48, seed=1000)
    with torch.no_grad():
        pred = model(**test_inputs).logits.argmax(-1)
    train_inputs, y_train = cells(48, seed=999)
    base = LogisticRegression(max_iter=200).fit(train_inputs["gene_values"].numpy(), y_train.numpy())
    base_pred = base.predict(test_inputs["gene_values"].numpy())
    spec = TASKS[3]
    scores = {name: {"macro_f1": f1_score(y_test, p, average="macro"), "accuracy": accuracy_score(y_test, p)}
              for name, p in (("SPATIA", pred), ("log1p logistic regression", base_pred))}
    task = TaskResult(spec.number, spec.key, spec.title, list(spec.metrics), spec.primary, scores,
                      {"SPATIA": "spatia", "log1p logistic regression": "baseline"},
                      {"kind": "cell", "n_train": 12 * steps, "n_test": 48})
    return model, results_to_json([task], meta={"dataset": "toy marker cells"})


def test_model_card_of_trained_tiny_model_lists_metrics(tmp_path):
    write_docs = os.environ.get("SPATIA_WRITE_DOCS") == "1"  # regenerate docs/example_model_card.md
    steps = 60 if write_docs else 3
    model, results = _train_tiny_classifier(steps)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    card = hub.render_model_card(model, repo_id="lab/spatia-tiny-annotation", eval_results=results_file,
                                 dataset_id="lab/toy-cells",
                                 training_data=f"{steps} AdamW steps (batch 12) on synthetic toy cells.")
    text = str(card)
    meta = ModelCard(text).data.to_dict()  # what the Hub reads back
    parsed = ModelCard(text).data.eval_results  # huggingface_hub's own model-index parser
    assert {(r.task_type, r.metric_type): r.metric_value for r in parsed} == pytest.approx(
        {("finetuned_annotation", k): v for k, v in results["tasks"][0]["scores"]["SPATIA"].items()}, abs=1e-6)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "spatia-hf"
    assert {"spatia", "spatial-transcriptomics", "transformers"} <= set(meta["tags"])
    assert meta["datasets"] == ["lab/toy-cells"]
    index = meta["model-index"][0]
    assert index["name"] == "lab/spatia-tiny-annotation"
    result = index["results"][0]
    scores = results["tasks"][0]["scores"]
    spatia, baseline = scores["SPATIA"], scores["log1p logistic regression"]
    assert {m["name"]: m["value"] for m in result["metrics"]} == pytest.approx(spatia, abs=1e-6)
    assert result["task"] == {"type": "finetuned_annotation", "name": "Cell-type annotation, fine-tuned head"}
    assert result["dataset"]["name"] == "toy marker cells" and result["dataset"]["split"] == "test"
    assert f"log1p logistic regression {baseline['macro_f1']:.4g}" in text
    assert f"{model.num_parameters():,}" in text and "12 genes (`GENE0`" in text
    assert "3 (`T_cell`, `macrophage`, `tumor`)" in text
    assert "| `cell_config.hidden_size` | 32 |" in text and "dropout" not in text
    assert 'SpatiaForCellClassification.from_pretrained("lab/spatia-tiny-annotation")' in text
    for section in ("## Intended use", "## Training data", "## Limitations", "## How to load", "## Citation"):
        assert section in text
    assert "arXiv:2507.04704" in text and f"{steps} AdamW steps" in text and "synthetic tissue" in text
    if write_docs:
        (REPO_ROOT / "docs").mkdir(exist_ok=True)
        (REPO_ROOT / "docs" / "example_model_card.md").write_text(text)


def test_eval_results_reject_non_finite_and_shapeless_input():
    with pytest.raises(ValueError, match="metric 'f1' of task 'annotation' is nan"):
        hub.load_eval_results({"annotation": {"f1": float("nan")}})
    with pytest.raises(ValueError, match="no 'metrics' mapping"):
        hub.load_eval_results({"tasks": [{"task": "annotation", "f1": 0.5}]})
    results, _ = hub.load_eval_results({"annotation": {"macro F1": 0.5}}, dataset_name="d")
    assert results[0].metric_type == "macro_f1" and results[0].metric_value == 0.5


def test_write_model_card_beside_weights_counts_parameters_from_safetensors(tmp_path):
    model = _tiny_cell_model()
    model.save_pretrained(tmp_path)
    path = hub.write_model_card(tmp_path, repo_id="lab/cell")  # from the folder: config.json + safetensors headers
    assert path == tmp_path / "README.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    text = path.read_text()
    assert f"{model.num_parameters():,}" in text and "SpatiaCellModel" in text
    assert ModelCard(text).data.library_name == "spatia-hf"


# ---------------------------------------------------------------------------------- round trips
def test_model_round_trip_through_loopback_hub(loopback, tmp_path):
    from transformers import AutoModel

    model = _tiny_cell_model()
    inputs = _cell_inputs()
    expected = _outputs(model, inputs)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    with loopback.client():
        info = hub.push_model(folder, "lab/spatia-cell-tiny", token=loopback.token)
        remote = _assert_uploaded_as_is(loopback, folder, "lab/spatia-cell-tiny")
        assert info.oid == _commits(loopback, "lab/spatia-cell-tiny")[0].commit_id
        weights = HfApi().get_paths_info("lab/spatia-cell-tiny", ["model.safetensors"])[0]
        assert weights.lfs is not None and weights.lfs.size == (folder / "model.safetensors").stat().st_size
        assert 'SpatiaCellModel.from_pretrained("lab/spatia-cell-tiny")' in remote["README.md"].decode()
        online = AutoModel.from_pretrained("lab/spatia-cell-tiny")
    for a, b in zip(expected, _outputs(online, inputs)):
        assert torch.equal(a, b)
    n_requests = len(loopback.requests)
    loopback.stop()  # from here on nothing can be fetched: HF_HUB_OFFLINE=1 and the cache only
    assert constants.HF_HUB_OFFLINE
    offline = spatia_hf.SpatiaCellModel.from_pretrained("lab/spatia-cell-tiny")
    for a, b in zip(expected, _outputs(offline, inputs)):
        assert torch.equal(a, b)
    assert len(loopback.requests) == n_requests


def test_model_push_to_hub_method_publishes_the_spatia_card(loopback):
    model = _tiny_cell_model()
    with loopback.client():
        model.push_to_hub("lab/cell-from-object", token=loopback.token)
    files = _hub_files(loopback, "lab/cell-from-object")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    with loopback.client():
        card = ModelCard.load("lab/cell-from-object")
    assert card.data.library_name == "spatia-hf" and "arXiv:2507.04704" in card.text


def test_pipeline_round_trip_through_loopback_hub(loopback, tmp_path):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(0)
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny")
    expression = np.random.default_rng(0).poisson(2.0, size=(2, len(GENES))).astype(np.float32)

    def generate(p):
        return p(expression, num_inference_steps=1, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    expected = generate(pipe)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    with loopback.client():
        hub.push_pipeline(folder, "lab/spatia-gen-tiny", token=loopback.token)
        remote = _assert_uploaded_as_is(loopback, folder, "lab/spatia-gen-tiny")
        index = json.loads(remote["model_index.json"])
        assert index["condition_encoder"][0].startswith("spatia_hf.")  # named by package module path
        card = ModelCard(remote["README.md"].decode())
        assert "SpatiaGenerationPipeline.from_pretrained(\"lab/spatia-gen-tiny\")" in card.text
        assert "`condition_encoder`" in card.text and card.data.library_name == "spatia-hf"
        online = SpatiaGenerationPipeline.from_pretrained("lab/spatia-gen-tiny")
    assert torch.equal(expected, generate(online))
    loopback.stop()
    offline = SpatiaGenerationPipeline.from_pretrained("lab/spatia-gen-tiny")
    assert torch.equal(expected, generate(offline))


def test_pipeline_save_pretrained_push_to_hub_publishes_the_spatia_card(loopback, tmp_path):
    """One push route: ``save_pretrained(push_to_hub=True)`` commits the folder with the SPATIA card, as
    ``push_to_hub`` and ``spatia push`` do (diffusers' own upload would publish no card)."""
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny")
    with loopback.client():
        pipe.save_pretrained(tmp_path / "gen", push_to_hub=True, repo_id="lab/gen-saved", token=loopback.token)
    files = loopback.files("lab/gen-saved")
    assert {"model_index.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "spatia-hf" and "`condition_encoder`" in card.text
    assert not (tmp_path / "gen" / "README.md").exists()  # the local folder is left as saved


def test_pipeline_mixin_loads_package_components_that_diffusers_download_rejects(loopback):
    from diffusers import DiffusionPipeline

    from toy_pipeline import ToyPipeline, tiny_toy_pipeline

    pipe = tiny_toy_pipeline()
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    expected = pipe(cond, generator=torch.Generator().manual_seed(0))
    with loopback.client():
        pipe.push_to_hub("lab/toy-gen", token=loopback.token)  # the mixin's push: one commit with our card
        files = _hub_files(loopback, "lab/toy-gen")
        assert json.loads(files["model_index.json"])["denoiser"] == ["toy_pipeline", "ToyDenoiser"]
        assert "ToyPipeline.from_pretrained(\"lab/toy-gen\")" in files["README.md"].decode()
        # what the mixin works around: diffusers 0.42's own Hub download refuses the module path
        with pytest.raises(ValueError, match="does not exist in lab/toy-gen"):
            DiffusionPipeline.download("lab/toy-gen")
        online = ToyPipeline.from_pretrained("lab/toy-gen")
    assert torch.equal(expected, online(cond, generator=torch.Generator().manual_seed(0)))
    loopback.stop()
    offline = ToyPipeline.from_pretrained("lab/toy-gen")
    assert torch.equal(expected, offline(cond, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def tiny_dataset_dir(tmp_path_factory):
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", n_sections=1, n_cells=40)


def test_dataset_folder_round_trip_through_loopback_hub(loopback, tiny_dataset_dir):
    import datasets

    from spatia_hf.data.datasets import load_spatia_dataset, resolve_dataset_dir
    from spatia_hf.data.gene_panel import read_gene_panel
    from spatia_hf.data.schema import CELL_ID, CONFIGS, GENE_PANEL_FILE

    before = _snapshot(tiny_dataset_dir)
    local = {c: datasets.load_dataset(os.fspath(tiny_dataset_dir), c, split="train") for c in CONFIGS}
    with loopback.client():
        hub.push_dataset(tiny_dataset_dir, "lab/spatia-tiny-data", token=loopback.token)
        remote = _assert_uploaded_as_is(loopback, tiny_dataset_dir, "lab/spatia-tiny-data", "dataset")
        card = DatasetCard(remote["README.md"].decode())
        assert [c["config_name"] for c in card.data.configs] == list(CONFIGS)
        assert card.data.license == "apache-2.0"
        assert 'load_dataset("lab/spatia-tiny-data", "cells", split="train")' in card.text
        online = datasets.load_dataset("lab/spatia-tiny-data", "cells", split="train")
        panel = read_gene_panel("lab/spatia-tiny-data")
        with pytest.raises(FileNotFoundError, match="incomplete.*niches"):  # only cells was fetched so far
            resolve_dataset_dir("lab/spatia-tiny-data", local_files_only=True)
        folder = resolve_dataset_dir("lab/spatia-tiny-data")  # the whole dataset, once
    assert online.to_dict() == local["cells"].to_dict()
    assert panel == json.loads((tiny_dataset_dir / GENE_PANEL_FILE).read_text())
    assert _snapshot(tiny_dataset_dir) == before
    loopback.stop()
    assert datasets.load_dataset("lab/spatia-tiny-data", "cells", split="train")[CELL_ID] == local["cells"][CELL_ID]
    assert read_gene_panel("lab/spatia-tiny-data") == panel
    assert resolve_dataset_dir("lab/spatia-tiny-data") == folder
    for config in CONFIGS:  # the whole folder, offline, through the package's own loader
        assert load_spatia_dataset("lab/spatia-tiny-data", (config,))[config].to_dict() == local[config].to_dict()


def test_dataset_dict_push_to_hub_with_gene_panel(loopback):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"cell_id": ["a", "b", "c"], "x_um": [1.5, 2.5, 3.5]}),
        "test": datasets.Dataset.from_dict({"cell_id": ["d"], "x_um": [4.5]}),
    })
    panel = {"genes": GENES}
    with loopback.client():
        hub.push_dataset(dd, "lab/dd", token=loopback.token, gene_panel=panel)
        assert json.loads(_hub_files(loopback, "lab/dd", "dataset")["gene_panel.json"]) == panel
        online = datasets.load_dataset("lab/dd")
    assert online["train"].to_dict() == dd["train"].to_dict() and online["test"].to_dict() == dd["test"].to_dict()
    loopback.stop()
    assert datasets.load_dataset("lab/dd", split="test").to_dict() == dd["test"].to_dict()


def test_failed_commit_leaves_checkpoint_untouched_and_retry_succeeds(loopback, tmp_path):
    model = _tiny_cell_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    before = _snapshot(folder)
    with loopback.client():
        loopback.fail_next("commit", status=500)
        with pytest.raises(HfHubHTTPError) as err:
            hub.push_model(folder, "lab/flaky", token=loopback.token)
        assert err.value.response.status_code == 500
        assert _snapshot(folder) == before
        assert set(_hub_files(loopback, "lab/flaky")) == {".gitattributes"}  # nothing half-committed
        assert len(_commits(loopback, "lab/flaky")) == 1
        hub.push_model(folder, "lab/flaky", token=loopback.token)
    assert {"config.json", "model.safetensors", "README.md"} <= set(_hub_files(loopback, "lab/flaky"))
    assert _snapshot(folder) == before


def test_repush_replaces_weights_and_deletes_stale_ones(loopback, tmp_path):
    model = _tiny_cell_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    extra = folder / "extra.safetensors"
    extra.write_bytes((folder / "model.safetensors").read_bytes())
    with loopback.client():
        hub.push_model(folder, "lab/repush", token=loopback.token)
        assert "extra.safetensors" in HfApi().list_repo_files("lab/repush")
        extra.unlink()
        hub.push_model(folder, "lab/repush", token=loopback.token)
        assert "extra.safetensors" not in HfApi().list_repo_files("lab/repush")
    assert len(_commits(loopback, "lab/repush")) == 3


def test_read_only_token_is_refused_with_the_hub_message(loopback, tmp_path):
    model = _tiny_cell_model()
    model.save_pretrained(tmp_path)
    with loopback.client(), pytest.raises(HfHubHTTPError) as err:
        hub.push_model(tmp_path, "lab/readonly", token=loopback.read_token)
    assert err.value.response.status_code == 403  # what the Hub answers a read-only token


def test_card_with_invalid_model_index_is_refused_before_upload(loopback, tmp_path):
    model = _tiny_cell_model()
    model.save_pretrained(tmp_path)
    text = "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n# x\n"
    (tmp_path / "README.md").write_text(text)
    with pytest.raises(ValueError, match="Invalid `model_index`"):  # huggingface_hub's own parser refuses it
        ModelCard(text)
    with loopback.client(), pytest.raises(ValueError):
        hub.push_model(tmp_path, "lab/bad-card", token=loopback.token, keep_card=True)
    assert set(_hub_files(loopback, "lab/bad-card")) == {".gitattributes"}  # nothing was committed


def test_private_repo_is_invisible_without_a_token(loopback, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    model = _tiny_cell_model()
    model.save_pretrained(tmp_path)
    with loopback.client():
        hub.push_model(tmp_path, "lab/private", token=loopback.token, private=True)
        assert HfApi().model_info("lab/private", token=loopback.read_token).private
        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info("lab/private", token=False)


def test_cli_push_model_to_a_branch_with_eval_results(loopback, tmp_path, capsys):
    from spatia_hf.cli import main

    model = _tiny_cell_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cell-type annotation": {"macro_f1": 0.5, "accuracy": 0.75}}))
    with loopback.client():
        code = main(["push", "model", os.fspath(folder), "--repo-id", "lab/cli-model", "--token", loopback.token,
                     "--revision", "dev", "--eval-results", os.fspath(results), "--dataset-id", "lab/cells"])
        assert code == 0
        assert "lab/cli-model (dev)" in capsys.readouterr().out
        assert set(_hub_files(loopback, "lab/cli-model", revision="main")) == {".gitattributes"}
        assert "dev" in [b.name for b in HfApi().list_repo_refs("lab/cli-model").branches]
        card = ModelCard.load(hf_hub_download("lab/cli-model", "README.md", revision="dev"))
        metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert metrics == {"macro_f1": 0.5, "accuracy": 0.75}
        assert main(["push", "model", os.fspath(folder), "--repo-id", "no-namespace", "--token", "x"]) == 1
        assert "ORG/NAME" in capsys.readouterr().err
        loopback.fail_next("commit")
        assert main(["push", "model", os.fspath(folder), "--repo-id", "lab/cli-model", "--token", loopback.token]) == 1
        assert "local files are unchanged" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch + transformers + diffusers: ~10-30 s on a shared CPU
def test_cli_push_in_a_subprocess_reads_hf_endpoint_from_the_environment(loopback, hf_home, tmp_path):
    """The user's path: HF_ENDPOINT set before the process starts, `spatia push` as a command."""
    model = _tiny_cell_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    env = loopback.env(hf_home)
    env["HF_TOKEN"] = loopback.token
    proc = subprocess.run([sys.executable, "-m", "spatia_hf.cli", "push", "model", os.fspath(folder),
                           "--repo-id", "lab/from-env"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_uploaded_as_is(loopback, folder, "lab/from-env")
