"""``progress_bars(False)`` / ``--no-progress`` hide every library's bars for a block and restore them."""

from __future__ import annotations

import os
import subprocess
import sys

import datasets
import huggingface_hub.utils as hub_utils
import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from spatia_hf.utils.progress import progress_bars, respects_progress


def states() -> dict[str, bool]:
    """Whether each library would draw its bars now."""
    return {
        "hub": not hub_utils.are_progress_bars_disabled(),
        "transformers": transformers_logging.is_progress_bar_enabled(),
        "datasets": datasets.is_progress_bar_enabled(),
        "diffusers": diffusers_logging.is_progress_bar_enabled(),
    }


@pytest.fixture(autouse=True)
def _bars_on():
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # these tests switch the bars in code
    before = states()
    yield
    assert states() == before  # no test leaves a global switch changed


def test_block_hides_every_library_and_restores():
    assert all(states().values())
    with progress_bars(False):
        assert not any(states().values())
    assert all(states().values())


def test_switches_come_back_after_an_exception():
    with pytest.raises(RuntimeError), progress_bars(False):
        raise RuntimeError("boom")
    assert all(states().values())


def test_a_switch_the_user_turned_off_stays_off():
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars("huggingface_hub.lfs_upload")  # a per-group switch
    hub_states = sys.modules["huggingface_hub.utils.tqdm"].progress_bar_states
    before = dict(hub_states)  # transformers' switch also turned the Hub's global switch off
    try:
        with progress_bars(False):
            pass
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled("huggingface_hub.lfs_upload")
        assert hub_states == before
        with progress_bars(True):
            assert transformers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()


def test_nested_blocks_restore_the_outer_state():
    with progress_bars(False):
        with progress_bars(True):
            assert all(states().values())
        assert not any(states().values())


def test_pipeline_denoising_bar_is_hidden_then_restored():
    from toy_pipeline import tiny_toy_pipeline

    pipe = tiny_toy_pipeline()
    pipe.set_progress_bar_config(desc="denoise")
    with progress_bars(False, pipelines=[pipe]):
        bar = pipe.progress_bar(total=3)
        assert bar.disable
        bar.close()
    assert pipe._progress_bar_config == {"desc": "denoise"}


def test_library_first_imported_inside_the_block_is_hidden_then_back_to_default():
    code = (
        "import sys\nfrom spatia_hf.utils.progress import progress_bars\n"
        "assert 'datasets' not in sys.modules\n"
        "with progress_bars(False):\n"
        "    import datasets\n"
        "    inside = datasets.is_progress_bar_enabled()\n"
        "print(inside, datasets.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "True"]


def test_respects_progress_decorator_scopes_the_switch_to_the_call():
    @respects_progress
    def work(n: int, progress: bool = True) -> dict[str, bool]:
        return states()

    assert not any(work(1, progress=False).values())
    assert not any(work(1, False).values())
    assert all(work(1).values())
    assert all(states().values())


def test_cli_no_progress_hides_library_bars_during_the_command(monkeypatch):
    import spatia_hf.commands.synth as synth
    from spatia_hf.cli import main

    seen = {}

    def fake_run(args):
        seen.update(states())
        return 0

    monkeypatch.setattr(synth, "run", fake_run)
    assert main(["synth", "--out", "unused", "--no-progress"]) == 0
    assert seen and not any(seen.values())
    seen.clear()
    assert main(["synth", "--out", "unused"]) == 0
    assert all(seen.values())
