"""What a user sees of every command: --help gives each option's real default."""

from __future__ import annotations

import argparse

import pytest

from alexpipe import eval as eval_mod
from alexpipe import loader, neighbors, pca, prepare, sample, train
from alexpipe.util import Help

PARSERS = {"alexpipe-sample": sample.parser, "alexpipe-prepare": prepare.parser, "alexpipe-pca": pca.parser,
           "alexpipe-preview": loader.parser, "alexpipe-train": train.parser, "alexpipe-eval": eval_mod.parser,
           "alexpipe-predict": eval_mod.predict_parser, "alexpipe-neighbors": neighbors.parser}


@pytest.mark.parametrize("prog", PARSERS)
def test_every_option_shows_its_real_default(prog):
    """Each option's help ends in "(default: X)" with X what the command really uses: never
    "None" (defaults worked out at run time are said in words), booleans as --x/--no-x."""
    p = PARSERS[prog]()
    assert p.prog == prog and p.formatter_class is Help
    options = [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        text = Help(prog)._get_help_string(action) % {**vars(action), "prog": prog}
        if action.required:
            assert text.endswith("(required)"), (prog, action.option_strings, text)
            continue
        assert "(default: " in text and "(default: None)" not in text, (prog, action.option_strings, text)
        if isinstance(action.default, bool):
            assert isinstance(action, argparse.BooleanOptionalAction), (prog, action.option_strings)
    usage = p.format_help()
    if prog == "alexpipe-train":
        assert "--compile, --no-compile" in usage and "(default: True)" in usage
        for flag, default in (("--arch", "paper"), ("--epochs", "90"), ("--momentum", "0.9"),
                              ("--weight-decay", "0.0005"), ("--dropout", "0.5")):
            action = next(a for a in options if flag in a.option_strings)
            assert str(action.default) == default


def bars(text: str, name: str) -> list[str]:
    """The states a tqdm bar named `name` drew (each \\r-separated redraw)."""
    return [part for part in text.replace("\r", "\n").splitlines() if part.startswith(f"{name}:")]


def test_long_steps_show_one_finished_bar_with_rate_and_eta(shapes_run, shapes_out, tmp_path, capsys):
    """alexpipe-sample, alexpipe-pca and alexpipe-eval show a bar with a rate and an ETA,
    finished once; pca's summary gives the steady rate, not an overall rate above it."""
    assert sample.main([str(tmp_path / "s"), "--classes", "2", "--train-per-class", "6", "--val-per-class", "1"]) == 0
    drawn = bars(capsys.readouterr().err, "sample")
    assert drawn and sum("100%" in b for b in drawn) == 1 and "img/s]" in drawn[-1] and "<" in drawn[-1]
    assert pca.main([str(shapes_out), "--device", "cpu", "--output", str(tmp_path / "p.json")]) == 0
    captured = capsys.readouterr()
    drawn = bars(captured.err, "pca")
    assert sum("100%" in b for b in drawn) == 1 and "img/s]" in drawn[-1]
    line = next(x for x in captured.out.splitlines() if x.startswith("160 images"))
    assert "s start-up (pipelines, decoder, first batch), then" in line and line.count("images/s") == 1
    assert eval_mod.main([str(shapes_run / "checkpoint.pt"), str(shapes_out), "--device", "cpu", "--figures",
                          str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for name in ("center crop", "ten crop"):
        drawn = bars(err, name)
        assert drawn and ("batch/s]" in drawn[-1] or "s/batch]" in drawn[-1])
