"""The model card (README.md) of a saved pipeline folder, written with huggingface_hub's model-card
helpers: Hub metadata (library, pipeline tag, tags, dataset, and every FID in ``model-index``),
how to load and sample it, the training configs of both stages, and every evaluation run on it,
so a shared pipeline carries its own provenance and scores.

Evaluations live between two HTML comments as a table and the full JSON reports (and as
``EvalResult`` entries in the metadata); an evaluation with the same reference and sampling
settings replaces the earlier one. The loading snippet lives between two other comments, so that
``set_repo_id`` can point it at the Hub repository the folder is pushed to."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .class_conditional import ClassConditionalLatentDiffusionPipeline
from .common import MODEL_CARD, TRAINING_CONFIG, module_name
from .sampling import training_config
from .unconditional import LatentDiffusionPipeline

START, END = "<!-- evaluations:start -->", "<!-- evaluations:end -->"
USAGE_START, USAGE_END = "<!-- usage:start -->", "<!-- usage:end -->"
TAGS = ["latent-diffusion", "vq-tokenizer", "nevercollapse"]
_REPORTS = re.compile(r"```json\n(.*?)\n```", re.S)
_PIPELINES = {
    cls.__name__: cls for cls in (LatentDiffusionPipeline, ClassConditionalLatentDiffusionPipeline)
}


def pipeline_tag(conditional: bool) -> str:
    return "image-generation" if conditional else "unconditional-image-generation"


def dataset_name(source: str | None) -> str | None:
    """How a ``data.source`` is named on a card: a local folder or file by its name (a path on
    the training machine means nothing elsewhere), anything else (a Hub dataset id, "digits")
    as it is."""
    if not source:
        return None
    prefix = "lsun:" if source.startswith("lsun:") else ""
    path = source.removeprefix(prefix)
    local = path.startswith(("/", ".", "~")) or path.endswith((".parquet", ".arrow"))
    return prefix + Path(path).name if local or os.path.exists(path) else source


def _hub_dataset(source: str | None) -> str | None:
    """``source`` if it names a Hub dataset (what the card's ``datasets`` links to): not a local
    path, an LSUN database or the built-in digits."""
    if not source or source == "digits" or source.startswith("lsun:"):
        return None
    return source if dataset_name(source) == source else None


def usage(pipeline_class: str, conditional: bool, name: str) -> str:
    """The loading snippet: diffusers with the code the folder carries (no package of ours
    needed), or the installed class (no code from the folder runs)."""
    call = (
        "pipe([0, 1, 2, 3], guidance_scale=1.5, num_inference_steps=50)"
        if conditional
        else "pipe(batch_size=4, num_inference_steps=50)"
    )
    return (
        f"{USAGE_START}\n"
        "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)\n'
        '# pipe.to("cuda", torch.bfloat16)  # half precision (the codebook stays float32)\n'
        f"images = {call}.images  # PIL images\n```\n\n"
        "With nevercollapse installed, its class loads the same files and runs none of their "
        "code:\n\n"
        f"```python\nfrom pipelines import {pipeline_class}\n\n"
        f'pipe = {pipeline_class}.from_pretrained("{name}")\n```\n'
        f"{USAGE_END}"
    )


def write_model_card(
    folder: str | Path,
    pipeline_class: str,
    configs: dict[str, dict | None],
    conditional: bool,
    repo_id: str | None = None,
) -> Path:
    """Write ``folder/README.md`` with the given training configs (name → config dict); the
    loading snippet names ``repo_id`` (else the folder)."""
    folder = Path(folder)
    name = repo_id or folder.name
    source = ((configs.get("diffusion") or {}).get("data") or {}).get("source")
    hub_dataset = _hub_dataset(source)
    meta = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag(conditional),
        tags=TAGS,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=name,
    )
    module = module_name(_PIPELINES[pipeline_class]) if pipeline_class in _PIPELINES else None
    code = f"`{module}.py`, `common.py`" if module else "the `.py` files at its root"
    kind = "Class-conditional (classifier-free guidance)" if conditional else "Unconditional"
    sections = [
        f"# {pipeline_class} (nevercollapse)\n",
        f"{kind} latent diffusion on the latents of a VQ tokenizer, trained with nevercollapse"
        f"{f' on `{dataset_name(source)}`' if source else ''}. The folder carries its code: the "
        f"pipeline ({code}) and the tokenizer with its quantizers (`vqvae/model.py`), which "
        "diffusers runs when given `trust_remote_code=True`: read them first.\n",
        usage(pipeline_class, conditional, name) + "\n",
        "Score it: `python scripts/eval_fid.py --pipeline <this folder>` (nevercollapse).\n",
        f"## Evaluation\n\n{START}\nNot evaluated yet.\n{END}\n",
        "## Training configs\n",
    ]
    for config_name, config in configs.items():
        if config:
            dumped = yaml.safe_dump(config, sort_keys=False).rstrip()
            sections.append(f"### {config_name}\n\n```yaml\n{dumped}\n```\n")
    path = folder / MODEL_CARD
    ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(sections)).save(path)
    return path


def _pipeline_of(folder: Path) -> tuple[str, bool]:
    """The pipeline class named in the folder's model_index.json, and whether it is
    class-conditional."""
    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    name = name[-1] if isinstance(name, list) else name
    return name, name == ClassConditionalLatentDiffusionPipeline.__name__


def set_repo_id(folder: str | Path, repo_id: str) -> Path:
    """Point the folder's card at the Hub repository ``repo_id`` (its loading snippet and
    model name); write the card from the folder's training configs if there is none."""
    folder = Path(folder)
    pipeline_class, conditional = _pipeline_of(folder)
    path = folder / MODEL_CARD
    if not path.is_file():
        configs = {}
        if (folder / TRAINING_CONFIG).is_file():
            configs = yaml.safe_load((folder / TRAINING_CONFIG).read_text()) or {}
        return write_model_card(folder, pipeline_class, configs, conditional, repo_id)
    card = ModelCard.load(path)
    card.data.model_name = repo_id
    if USAGE_START in card.text and USAGE_END in card.text:
        head, rest = card.text.split(USAGE_START, 1)
        card.text = head + usage(pipeline_class, conditional, repo_id) + rest.split(USAGE_END, 1)[1]
    card.save(path)
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


def _eval_result(report: dict, task: str, dataset: str) -> EvalResult:
    """One report's FID as a model-index entry; its protocol (samples, steps, η, guidance,
    reference) in ``metric_config``, so that results of different protocols stay apart."""
    s, reference = report["sampling"], report["reference"]
    protocol = f"{s['num_samples']} samples, {s['steps']} steps, eta {s['eta']}"
    if s.get("guidance_scale") is not None:
        protocol += f", guidance {s['guidance_scale']}"
    return EvalResult(
        task_type=task,
        dataset_type=dataset,
        dataset_name=dataset,
        dataset_split=reference.get("part"),
        metric_type="fid",
        metric_name="FID",
        metric_value=round(float(report["metrics"]["fid"]), 4),
        metric_config=f"{protocol}, reference {reference['key']}",
    )


def record_evaluation(folder: str | Path, report: dict) -> Path:
    """Add ``report`` (from ``scripts/eval_fid.py``) to the folder's model card: a row of the
    evaluations table, the full report, and its FID in the metadata's ``model-index`` (on the
    dataset the report's reference images come from, else the training config's
    ``data.source``)."""
    folder = Path(folder)
    path = folder / MODEL_CARD
    card = ModelCard(path.read_text() if path.is_file() else f"# {folder.name}\n")
    text = card.text
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
    card.text = head + START + block + END + tail

    trained = (training_config(folder).get("data") or {}).get("source")
    task = card.data.pipeline_tag
    if task is None and (folder / "model_index.json").is_file():
        task = pipeline_tag(_pipeline_of(folder)[1])
    card.data.model_name = card.data.model_name or folder.name
    card.data.eval_results = [
        _eval_result(
            r,
            task or pipeline_tag(False),
            dataset_name(r["reference"].get("source") or trained) or "unknown",
        )
        for r in reports
    ]
    card.save(path)
    return path
