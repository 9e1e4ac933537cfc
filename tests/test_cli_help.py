"""`progan VERB --help` explains every option and says its default."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.cli import build_parser, main
from tests.conftest import REPO_ROOT


def verbs() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_verb_has_help_and_shows_its_default():
    missing, silent = [], []
    for verb, parser in verbs().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = f"{verb} {'/'.join(action.option_strings) or action.dest}"
            help_text = action.help or ""
            if not help_text:
                missing.append(name)
            quiet = (None, False, argparse.SUPPRESS)  # a flag (e.g. -v) shows no default
            has_default = action.default not in quiet and action.option_strings
            said = f"default: {action.default}" in text or "default" in help_text.lower()
            if has_default and not said:
                silent.append(name)
    assert not missing, f"options without help: {missing}"
    assert not silent, f"defaults not shown: {silent}"


def test_prepare_help_as_a_user_types_it():
    exe = Path(sys.executable).parent / "progan"
    done = subprocess.run([str(exe), "prepare", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for shown in ("--margin MARGIN context around the face (default: 0.25)", "(default: 256)"):
        assert shown in text


def test_progan_config_prints_resolved_values_with_defaults_and_descriptions(capsys):
    demo = str(REPO_ROOT / "conf" / "demo.yaml")
    assert main(["config", demo, "model.resolution=16"]) == 0
    printed = capsys.readouterr().out.splitlines()
    [line] = [ln for ln in printed if " model.resolution " in ln]
    assert line.startswith("* ") and "= 16 (default 1024)" in line
    assert "final (largest) resolution" in line  # the field's description
    [mirror] = [ln for ln in printed if " train.mirror " in ln]
    assert mirror.startswith("  ") and "default" not in mirror  # unchanged: no mark
    assert main(["config", demo, "--changed"]) == 0
    changed = capsys.readouterr().out
    assert "train.mirror" not in changed and "model.resolution" in changed
    assert main(["config", demo, "train.bogus=1"]) == 2
    assert capsys.readouterr().out.startswith("config error: train.bogus: unknown key")
