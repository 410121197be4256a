"""The README and docs/ cannot go stale: every command of a ``bash`` block names a script that
exists and parses with that script's own parser, its ``--config`` is a shipped recipe that loads
with the command's overrides, every path it reads from the repository exists; every ``python``
block compiles and imports only names that exist; every relative link reaches a file and, with
``#anchor``, one of its headings. Nothing is trained here: the commands themselves run in the
recipe, script and pipeline tests. A block preceded by ``<!-- not run: why -->`` is skipped
(and must say why)."""

from __future__ import annotations

import ast
import importlib
import re
import runpy
import shlex
from pathlib import Path

import pytest

from engine.config import load_config
from tests.launch import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(<!-- not run: (?P<why>[^>]*)-->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S
)
LINK = re.compile(r"\]\((?!https?://|mailto:)(?P<path>[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")
# the first words of commands that are not ours: installers, the tests, tools
OTHERS = ("pip", "python -m", "tensorboard", "accelerate config", "huggingface-cli", "nice -n")


def blocks(page: Path) -> list[tuple[str, str]]:
    found = []
    for m in BLOCK.finditer(page.read_text()):
        if m["why"] is not None:
            assert m["why"].strip(), f"{page.name}: a block not run must say why"
        else:
            found.append((m["lang"], m["code"]))
    return found


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped,
    ``a && b`` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [
        part.strip()
        for line in lines
        if line and not line.startswith("#")
        for part in line.split("&&")
    ]


def script_call(command: str) -> tuple[Path, list[str]] | None:
    """(the script, its arguments) of a command that runs one of ours, else None."""
    words = shlex.split(command.removeprefix("nice -n 10 "))
    words = [w for w in words if "=" not in w or w.startswith(("-", "scripts/")) or words[0] != w]
    scripts = [i for i, w in enumerate(words) if w.startswith("scripts/")]
    if not scripts:
        return None
    i = scripts[0]
    return ROOT / words[i], words[i + 1 :]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)
            anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_parses_with_its_script(page):
    checked = 0
    for lang, code in blocks(page):
        if lang != "bash":
            continue
        for command in commands(code):
            call = script_call(command)
            if call is None:
                assert command.startswith(OTHERS) or command.startswith("ACCELERATE_USE_CPU"), (
                    f"{page.name}: {command!r} runs no script of ours and is not a known tool"
                )
                continue
            script, args = call
            assert script.is_file(), f"{page.name}: {script.relative_to(ROOT)} does not exist"
            checked += 1
            if script.suffix != ".py":
                continue
            names = runpy.run_path(str(script), run_name=script.stem)
            parser = names["build_parser"]()
            try:
                parsed = parser.parse_intermixed_args(args)
            except SystemExit:
                pytest.fail(f"{page.name}: {command!r} does not parse with {script.name}")
            config = getattr(parsed, "config", None)
            if config and script.name.startswith("train_"):
                assert (ROOT / config).is_file(), f"{page.name}: {config} does not exist"
                cls = _config_class(script.name)
                load_config(ROOT / config, parsed.overrides, cls)  # raises on a wrong key
    if page.name == "README.md":
        assert checked >= 4, "the README's start-to-finish commands were not found"


def _config_class(script: str):
    if script == "train_tokenizer.py":
        from tokenizer.train import TokenizerConfig

        return TokenizerConfig
    from diffusion.train import DiffusionConfig

    return DiffusionConfig


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_snippet_compiles_and_imports_what_exists(page):
    for lang, code in blocks(page):
        if lang != "python":
            continue
        tree = ast.parse(code, filename=page.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (
                        f"{page.name}: {node.module} has no {alias.name}"
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_reaches_a_file_and_heading(page):
    for m in LINK.finditer(page.read_text()):
        target = (page.parent / m["path"]).resolve() if m["path"] else page
        assert target.exists(), f"{page.name}: link to {m['path']} reaches nothing"
        if m["anchor"] and target.suffix == ".md":
            assert m["anchor"] in heading_anchors(target), (
                f"{page.name}: {target.name} has no heading #{m['anchor']}"
            )


def test_the_readme_opens_with_the_two_commands():
    first = blocks(ROOT / "README.md")[0][1].splitlines()
    assert "scripts/demo.sh" in first[0] and "python -m pytest" in first[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1].split("#")[0].strip() in ci, ".ci/run must run the README's test command"


# --- the README's journey, run at miniature size ------------------------------------------

MINIATURE = {  # overrides appended to each script's command (later overrides win)
    "train_tokenizer.py": [
        "model.ch=8",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.validation_steps=2",
        "train.validation_size=4",
        "train.image_every=2",
        "train.checkpointing_steps=2",
        "train.num_workers=0",
        "loss.disc_start=1",
        "loss.disc_channels=8",
    ],
    "train_diffusion.py": [
        "unet.block_out_channels=[32,32]",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.validation_steps=2",
        "train.validation_size=4",
        "train.sample_every=2",
        "train.sample_steps=2",
        "train.checkpointing_steps=2",
        "train.num_workers=0",
    ],
    "sample.py": ["--num-images", "4", "--steps", "2"],
    "eval_fid.py": ["--num-samples", "4", "--reference-images", "4", "--steps", "2"],
}


@pytest.mark.slow  # both stages, sampling and FID: a minute
def test_the_readmes_own_images_journey_runs(tmp_path, vgg_torch_home):
    """The README's "your own images" block, command by command as a user pastes it (fewer
    steps, images and samples), then its Python snippet on the pipeline it made."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tests.conftest import write_fake_inception

    for part, count in (("train", 24), ("validation", 6)):
        for i in range(count):
            folder = tmp_path / "my_images" / part / ("tench", "goldfish")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 256, (40, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    write_fake_inception(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(vgg_torch_home)}
    journey = [code for lang, code in blocks(ROOT / "README.md") if "my_images" in code]
    assert len(journey) == 1, "the README has one copy-paste block for one's own images"
    ran = []
    for command in commands(journey[0]):
        script, _ = script_call(command)
        assert shutil.which(shlex.split(command)[0]), command
        small = command + " " + shlex.join(MINIATURE[script.name])
        done = subprocess.run(
            small, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{small}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(script.name)
    assert ran == ["train_tokenizer.py", "train_diffusion.py", "sample.py", "eval_fid.py"]
    assert len(list((tmp_path / "runs" / "mine_samples").glob("*.png"))) >= 4
    fid = json.loads((tmp_path / "runs" / "mine_fid.json").read_text())["metrics"]["fid"]
    assert fid == fid and fid >= 0  # finite, not NaN
    for lang, code in blocks(ROOT / "README.md"):
        if lang == "python":
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    code.replace("num_inference_steps=50", "num_inference_steps=2"),
                ],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "mine_sample.png").is_file()
