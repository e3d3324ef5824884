"""The demo's size presets reach the training and evaluation APIs as valid arguments (no training here:
the end-to-end demo is `make demo-quick`)."""

import inspect
from pathlib import Path

import pytest

from spatia_hf import demo


@pytest.mark.parametrize("size", [demo.QUICK, demo.FULL], ids=["quick", "full"])
def test_generator_arguments_are_valid_and_step_capped(size, monkeypatch, tmp_path):
    from spatia_hf.training import generator
    from spatia_hf.training.generator import GeneratorTrainingArguments

    seen = {}
    monkeypatch.setattr(generator, "train_generator", lambda dataset, out, **kw: seen.update(kw))
    demo._train_generator(tmp_path / "d", tmp_path / "p", tmp_path / "g", size, 0, "s2", True, False)
    args = GeneratorTrainingArguments(dataset_dir=str(tmp_path), out_dir=str(tmp_path / "g"), **seen)
    args.check()
    assert args.max_steps == size.generator_steps and args.image_size == size.generator_image_size
    assert 1 <= args.warmup_steps < args.max_steps  # the learning rate reaches its value within the budget


@pytest.mark.parametrize("size", [demo.QUICK, demo.FULL], ids=["quick", "full"])
def test_evaluation_arguments_exist(size, monkeypatch, tmp_path):
    import importlib

    from spatia_hf.evaluation.suite import prepare_suite

    E = importlib.import_module("spatia_hf.evaluation.evaluate")  # the package exports a function of that name

    accepted = set(inspect.signature(E.evaluate).parameters) | set(inspect.signature(prepare_suite).parameters)
    seen = {}
    monkeypatch.setattr(E, "evaluate", lambda *a, **kw: seen.update(kw))
    demo._evaluate({k: tmp_path / k for k in ("pretrained", "dataset", "report", "generator", "finetuned")}, size, 0,
                   "cpu", False)
    assert set(seen) <= accepted
    assert seen["cnn_epochs"] == size.cnn_epochs and seen["max_perturbation"] == size.max_perturbation
    assert seen["generation_variants"] is size.generation_variants
    assert isinstance(seen["pipeline"], Path)


def test_quick_is_smaller_than_full_everywhere():
    q, f = demo.QUICK, demo.FULL
    for name in ("sections", "cells", "pretrain_steps", "generator_steps", "generation_steps", "max_generation",
                 "max_perturbation", "cnn_epochs"):
        assert getattr(q, name) <= getattr(f, name), name
    assert not q.generation_variants  # the unmerged / unconditional variants only at full size
