"""The CLI as a user meets it: help written for users, expected failures as one line and exit code 1."""

from __future__ import annotations

import pytest

from spatia_hf.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_for_users(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "spatia_hf." not in text, text  # no developer docstrings
    assert "runs/demo/model " not in text  # `make demo` writes runs/demo/hub/model


def test_help_paths_under_runs_demo_are_ones_the_demo_writes():
    from spatia_hf.demo import run_demo

    parser = build_parser()
    text = " ".join(sub.format_help() for sub in parser._subparsers._group_actions[0].choices.values())
    written = ("runs/demo/synthetic", "runs/demo/dataset", "runs/demo/pretrained", "runs/demo/finetuned",
               "runs/demo/generator/pipeline", "runs/demo/report", "runs/demo/hub/model", "runs/demo/hub/pipeline")
    for token in text.split():
        if token.startswith("runs/demo/"):
            assert token.rstrip(".,;)") in written, token


def test_expected_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "a.h5ad").touch()
    (tmp_path / "i.tif").touch()
    argv = ["embed", "--model", str(tmp_path / "nope"), "--adata", str(tmp_path / "a.h5ad"), "--image",
            str(tmp_path / "i.tif"), "--out", str(tmp_path / "o.h5ad")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spatia embed: error: --model") and "no such folder" in err
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(argv + ["--debug"])  # the exception propagates: Python prints its traceback


def test_library_warnings_are_one_line_in_the_cli(capsys, monkeypatch):
    import argparse
    import warnings

    def noisy(args: argparse.Namespace) -> int:
        warnings.warn("first line\n   second line", UserWarning)
        return 0

    parser = build_parser(["synth"])
    monkeypatch.setattr("spatia_hf.cli.build_parser", lambda argv: parser)
    parser._subparsers._group_actions[0].choices["synth"].set_defaults(func=noisy)
    assert main(["synth", "--out", "x"]) == 0
    assert capsys.readouterr().err == "spatia: warning: first line second line\n"
