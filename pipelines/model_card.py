"""The model card (README.md) of a saved pipeline folder: how to load and sample it, the training
configs of both stages, and every evaluation run on it, so a shared pipeline carries its own
provenance and scores.

Evaluations live between two HTML comments as a table and the full JSON reports; an evaluation
with the same reference and sampling settings replaces the earlier one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from huggingface_hub import ModelCardData

CARD = "README.md"
START, END = "<!-- evaluations:start -->", "<!-- evaluations:end -->"
_REPORTS = re.compile(r"```json\n(.*?)\n```", re.S)


def write_model_card(
    folder: str | Path, pipeline_class: str, configs: dict[str, dict | None], conditional: bool
) -> Path:
    """Write ``folder/README.md`` with the given training configs (name → config dict)."""
    folder = Path(folder)
    tag = "image-generation" if conditional else "unconditional-image-generation"
    meta = ModelCardData(
        library_name="diffusers",
        pipeline_tag=tag,
        tags=["latent-diffusion", "vq-tokenizer", "nevercollapse"],
    ).to_yaml()
    call = (
        "pipe([0, 1, 2, 3], guidance_scale=1.5, num_inference_steps=50)"
        if conditional
        else "pipe(batch_size=4, num_inference_steps=50)"
    )
    sections = [
        f"---\n{meta}\n---\n",
        f"# {pipeline_class} (nevercollapse)\n",
        "Latent diffusion on the latents of a VQ tokenizer, trained with nevercollapse "
        "(its `pipelines` package must be installed).\n",
        f"```python\nfrom pipelines import {pipeline_class}\n\n"
        f'pipe = {pipeline_class}.from_pretrained("{folder.name}")\n'
        f"images = {call}.images\n```\n",
        "Score it: `python scripts/eval_fid.py --pipeline <this folder>`.\n",
        f"## Evaluation\n\n{START}\nNot evaluated yet.\n{END}\n",
        "## Training configs\n",
    ]
    for name, config in configs.items():
        if config:
            sections.append(
                f"### {name}\n\n```yaml\n{yaml.safe_dump(config, sort_keys=False).rstrip()}\n```\n"
            )
    path = folder / CARD
    path.write_text("\n".join(sections))
    return path


def _same_protocol(a: dict, b: dict) -> bool:
    return (a["reference"]["key"], a["sampling"]) == (b["reference"]["key"], b["sampling"])


def _table(reports: list[dict]) -> str:
    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        "| FID | KID | IS | precision / recall | class-avg FID | samples | steps | η | "
        "guidance | reference | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        s, m = r["sampling"], r["metrics"]
        pr = f"{m['precision']:.3f} / {m['recall']:.3f}" if "precision" in m else "-"
        rows.append(
            f"| {num(m['fid'])} | {num(m.get('kernel_inception_distance_mean'), 4)} | "
            f"{num(m.get('inception_score_mean'))} | {pr} | {num(m.get('class_averaged_fid'))} "
            f"| {s['num_samples']} | {s['steps']} | {s['eta']} | {s['guidance_scale'] or '-'} | "
            f"`{r['reference']['key']}` ({r['reference']['images']} images) | {r['date']} |"
        )
    return "\n".join(rows)


def record_evaluation(folder: str | Path, report: dict) -> Path:
    """Add ``report`` (from ``scripts/eval_fid.py``) to the folder's model card."""
    path = Path(folder) / CARD
    text = path.read_text() if path.is_file() else f"# {Path(folder).name}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Evaluation\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    block, tail = rest.split(END, 1)
    reports = [json.loads(m) for m in _REPORTS.findall(block)]
    reports = [r for r in reports if not _same_protocol(r, report)] + [report]
    details = "\n".join(f"```json\n{json.dumps(r, sort_keys=True)}\n```" for r in reports)
    block = (
        f"\n{_table(reports)}\n\n<details><summary>Full reports (settings, seeds, "
        f"hashes)</summary>\n\n{details}\n\n</details>\n"
    )
    path.write_text(head + START + block + END + tail)
    return path
