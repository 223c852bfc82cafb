"""The README, checked against the package: it names every command, says what the code does
about the learning rate, speaks a user's words, and stays a first page."""

from __future__ import annotations

import re
from pathlib import Path

from alexpipe import train

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_names_every_command_and_links_the_docs():
    scripts = re.findall(r"^(alexpipe-[a-z]+) = ", (REPO / "pyproject.toml").read_text(), re.M)
    assert len(scripts) >= 8
    for name in scripts:
        assert f"`{name}" in README, name
    for doc in ("docs/benchmarks.md", "docs/design.md"):
        assert f"]({doc})" in README and (REPO / doc).is_file()


def test_readme_states_the_lr_rule_the_code_follows():
    """The lr is scaled for any global batch, not only above 128 (the demo's batch 32 runs at
    a quarter of its --lr)."""
    cfg = train.parse_args(["out", "--batch-size", "32", "--lr", "0.1", "--device", "cpu"])
    assert train.make_schedule(cfg, steps_per_epoch=5).peak_lr == 0.1 * 32 / 128
    assert "scaled linearly with the batch" in README
    assert not re.search(r"batch[^.]*> ?128[^.]*scales", README)


def test_readme_is_a_users_first_page():
    assert len(README.encode()) <= 16 * 1024
    for words in ("../shared", "dev box", "device machine", "most of it torch.compile"):
        assert words not in README, words
