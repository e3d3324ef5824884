"""Pretraining from streamed Parquet shards: niche grouping, held-out sections, per-rank streams, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spatia_hf.data import schema
from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.synthetic import make_synthetic_sections
from spatia_hf.data.datasets import load_spatia_dataset
from spatia_hf.training.pretrain import CELL_COLUMNS
from spatia_hf.training.streaming import (
    StreamingExamples,
    _first_row,
    niche_example,
    pretraining_stream,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    sections = make_synthetic_sections(2, 150, seed=3)
    out = tmp_path_factory.mktemp("stream") / "data"
    return build_multiscale_dataset(sections, out, crop_px=16, niche_px=16, thumb_px=32, progress=False)


def _section(dataset_dir, k: int) -> str:
    return sorted(set(load_spatia_dataset(dataset_dir, ("cells",))["cells"][schema.SAMPLE_ID]))[k]


def test_streamed_niches_are_the_niches_config(dataset_dir):
    """Each streamed niche example holds the members and relative positions of its niches row."""
    held = _section(dataset_dir, 1)
    stream = pretraining_stream(dataset_dir, schedule="niche", exclude_sections=[held], cell_columns=CELL_COLUMNS,
                                buffer_size=1)
    examples = [niche_example(_first_row(t), max_cells=10_000, seed=0) for t in stream]
    niches = load_spatia_dataset(dataset_dir, ("niches",))["niches"]
    expected = {n[schema.NICHE_ID]: n for n in niches if n[schema.SAMPLE_ID] != held}
    assert sorted(e["niche"][schema.NICHE_ID] for e in examples) == sorted(expected)
    for e in examples:
        row = expected[e["niche"][schema.NICHE_ID]]
        order = np.argsort(row[schema.CELL_IDS])
        got = np.argsort(e["niche"][schema.CELL_IDS])
        assert list(np.asarray(row[schema.CELL_IDS])[order]) == list(e["niche"][schema.CELL_IDS][got])
        np.testing.assert_allclose(np.asarray(row[schema.CELL_REL_X_UM])[order],
                                   e["niche"][schema.CELL_REL_X_UM][got], atol=1e-3)
        np.testing.assert_allclose(np.asarray(row[schema.CELL_REL_Y_UM])[order],
                                   e["niche"][schema.CELL_REL_Y_UM][got], atol=1e-3)
        assert e["cells"][schema.IMAGE].dtype == np.uint8 and e["cells"][schema.IMAGE].shape[1:] == (2, 16, 16)


def test_ranks_read_disjoint_streams_that_cover_the_training_cells(dataset_dir):
    held = _section(dataset_dir, 1)
    seen = []
    for rank in range(2):
        stream = pretraining_stream(dataset_dir, schedule="cell", exclude_sections=[held], cell_columns=CELL_COLUMNS,
                                    seed=1, buffer_size=16, rank=rank, world_size=2)
        seen.append([str(_first_row(t)[schema.CELL_ID]) for t in stream])
    cells = load_spatia_dataset(dataset_dir, ("cells",))["cells"]
    train = {c for c, s in zip(cells[schema.CELL_ID], cells[schema.SAMPLE_ID]) if s != held}
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == train


def test_resumed_stream_continues_where_the_checkpoint_was(dataset_dir):
    """The state after k batches, loaded into a fresh stream, yields what the uninterrupted stream yields next
    (no shuffle buffer: datasets refills a buffer on resume, so only its order would differ)."""

    def examples():
        stream = pretraining_stream(dataset_dir, schedule="cell", cell_columns=CELL_COLUMNS, buffer_size=1)
        return StreamingExamples(stream, lambda row: str(row[schema.CELL_ID]), batch_size=4)

    full = examples()
    it = iter(full)
    first = [next(it) for _ in range(12)]
    state = json.loads(json.dumps(full.state_at(3)))  # the checkpoint file is JSON
    rest = [next(it) for _ in range(8)]
    resumed = examples()
    resumed.load_state(state)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(8)] == rest
    assert resumed.batches_yielded == 5 and len(set(first + rest)) == 20


def test_stream_repeats_with_a_new_epoch(dataset_dir):
    stream = pretraining_stream(dataset_dir, schedule="niche", cell_columns=CELL_COLUMNS, buffer_size=8)
    epochs = []
    ex = StreamingExamples(stream, lambda row: row, batch_size=2, on_epoch=epochs.append)
    n = sum(1 for _ in stream)
    it = iter(ex)
    for _ in range(n + 3):
        next(it)
    assert epochs == [0, 1]


@pytest.mark.slow
def test_streaming_pretraining_resumes_from_its_checkpoint(dataset_dir, tmp_path):
    from spatia_hf.training.pretrain import pretrain

    out = tmp_path / "run"
    first = pretrain(dataset_dir, out, preset="tiny", max_steps=2, batch_size=2, streaming=True, save_strategy="steps",
                     save_steps=2, use_cpu=True, progress=False)
    state = json.loads((out / "checkpoint-2" / "stream_state_rank0.json").read_text())
    assert first.extra["streaming"] and state["batches"] == 2
    again = pretrain(dataset_dir, out, preset="tiny", max_steps=3, batch_size=2, streaming=True, save_strategy="steps",
                     save_steps=3, use_cpu=True, progress=False, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert again.global_step == 3
    assert json.loads((out / "checkpoint-3" / "stream_state_rank0.json").read_text())["batches"] == 3
