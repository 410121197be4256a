"""Every script's ``--help`` answers before torch is imported and describes every option with its
default (issue 23, item 7).

The help runs in a fresh process whose import path starts with fake ``torch``, ``accelerate``,
``diffusers``, ``torchvision``, ``PIL`` and ``tqdm`` packages that raise on import: a script that
imports any of them (or a module of ours that does) before parsing fails here. The options come
from each script's ``build_parser()``; the values a script copies from a heavy module for its
help (``check_copies()``) must be the library's."""

import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
HEAVY = ("torch", "accelerate", "diffusers", "torchvision", "PIL", "tqdm")


@pytest.fixture(scope="module")
def heavy_fails(tmp_path_factory) -> Path:
    """A folder of packages named like the heavy ones whose import raises."""
    folder = tmp_path_factory.mktemp("heavy_fails")
    for name in HEAVY:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text('raise ImportError("imported before --help")\n')
    return folder


def build_parser(script: Path) -> argparse.ArgumentParser:
    return runpy.run_path(str(script), run_name=script.stem)["build_parser"]()


def shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]


def test_every_script_is_covered():
    assert {s.name for s in SCRIPTS} >= {
        "train_tokenizer.py",
        "train_diffusion.py",
        "sample.py",
        "eval_fid.py",
        "eval_tokenizer.py",
        "push_to_hub.py",
        "reproduce_tables.py",
        "compare_quantizers.py",
        "benchmark.py",
        "benchmark_search.py",
        "count_waits.py",
    }


def test_the_fake_packages_catch_an_import(heavy_fails):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(heavy_fails), str(ROOT)])}
    for name in HEAVY:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True
        )
        assert done.returncode != 0 and "imported before --help" in done.stderr, name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_help_answers_before_torch_and_names_every_option(script, heavy_fails):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(heavy_fails), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    for action in shown(build_parser(script)):
        for name in action.option_strings or [action.metavar or action.dest]:
            assert name in done.stdout, f"{script.name}: {name} missing from --help"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_every_option_says_what_it_is_and_its_default(script):
    for action in shown(build_parser(script)):
        name = (action.option_strings or [action.dest])[0]
        assert action.help, f"{script.name}: {name} has no help"
        # flags are off unless given; a required option has no default
        if action.nargs != 0 and not action.required:
            assert "default" in action.help, f"{script.name}: {name}'s help gives no default"


@pytest.mark.parametrize(
    "script", [s for s in SCRIPTS if "def check_copies" in s.read_text()], ids=lambda s: s.name
)
def test_values_copied_for_help_are_the_librarys(script):
    runpy.run_path(str(script), run_name=script.stem)["check_copies"]()
