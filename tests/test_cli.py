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
