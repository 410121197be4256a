"""Reproductions of the papers' small-image tokenizer tables on the MNIST test set: the main table
(CVQ-VAE Tab. 1 / LooC Tab. 1: VQ, CVQ, LooC under identical settings), LooC Tab. 3 (d* at
K = 256) and CVQ-VAE Tab. 4c (anchor sampling, online and offline). Every row trains the same
small VQ-VAE with the official recipe (hidden 128, Adam 3e-4, loss MSE / variance of the [0, 1]
training pixels + quantizer loss, no GAN, no perceptual loss) with the same seed through
``tokenizer.experiments.compare.train``, validates once per epoch and is scored on the validation
part at the checkpoint with the lowest validation MSE (as the official code's best.pt); the
papers' numbers are printed beside ours."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..quantizers.looc import SEGMENT_LAYOUTS, STRAIGHT_THROUGH
from .compare import build_model, evaluate, latent_channels, train
from .mnist import load_mnist_idx

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HIDDEN, EMBED_DIM = 128, 128  # the papers' VQ-VAE: 128 hidden channels, LooC's d = 128

VQ = ("vq", dict(num_codes=1024, code_dim=128, distance="l2"))  # VQ-VAE: l2, no re-init


def _cvq(k: int = 1024, d: int = 128, anchor: str = "closest", online=True, contrastive=0.0):
    # cosine distance (the official default); the CVQ-VAE README's MNIST command: 512x64, closest
    options = dict(num_codes=k, code_dim=d, anchor=anchor, online=online)
    return ("cvq", {**options, "contrastive_weight": contrastive})


def _looc(k: int, d: int, layout="unshuffle", straight_through="interpolated", anchor="closest"):
    # beta = 2 (LooC Sec. 3.2), cosine; the official code: unshuffle + interpolated, closest
    options = dict(num_codes=k, code_dim=d, interp_scale=2, anchor=anchor)
    return ("looc", {**options, "segment_layout": layout, "straight_through": straight_through})


def _field(k: int, levels: list[int], bits: int, looc: bool) -> dict:
    """The field's quantizers at about K codes, each with its paper's defaults; d = 128 where the
    codebook is explicit (as VQ's), FSQ / LFQ at the d their codebooks take."""
    rows = {
        f"VQ {k}x128": ("vq", dict(num_codes=k, code_dim=128, distance="l2")),
        f"CVQ {k}x128 (closest)": _cvq(k, 128),
    }
    if looc:  # the default layout (channel, identity), which beat the official pair above
        rows["LooC 256x4 (channel, identity)"] = _looc(256, 4, "channel", "identity")
    return {
        **rows,
        f"FSQ {levels}": ("fsq", dict(levels=levels)),
        f"LFQ 2^{bits}": ("lfq", dict(code_dim=bits)),
        f"SimVQ {k}x128": ("simvq", dict(num_codes=k, code_dim=128)),
        f"IBQ {k}x128": ("ibq", dict(num_codes=k, code_dim=128)),
    }


FIELD_SMALL = _field(1024, [8, 5, 5, 5], 10, looc=True)
FIELD_LARGE = _field(16384, [8, 8, 8, 6, 5], 14, looc=False)
NO_UPDATE = "LooC 256x4 (unshuffle, interpolated, no CVQ update)"
# table → {row name → (kind, options)}
TABLES = {
    "main": {
        "VQ 1024x128": VQ,
        **{
            f"CVQ {k}x{d} ({label})": _cvq(k, d, anchor, contrastive=weight)
            for k, d in ((512, 64), (1024, 128))
            for label, anchor, weight in (
                ("closest", "closest", 0.0),
                ("probabilistic, contrastive 1", "probabilistic", 1.0),  # Tab. 3 E, weight 1
            )
        },
        **{
            f"LooC {k}x4 ({layout}, {st})": _looc(k, 4, layout, st)
            for k in (256, 32)
            for layout in SEGMENT_LAYOUTS
            for st in STRAIGHT_THROUGH
        },
        NO_UPDATE: _looc(256, 4, anchor="none"),  # LooC Tab. 7
    },
    "looc_dstar": {f"LooC 256x{d}": _looc(256, d) for d in (4, 8, 16, 32, 64)},
    "cvq_anchors": {
        f"CVQ {anchor} ({mode})": _cvq(anchor=anchor, online=mode == "online")
        for mode in ("online", "offline")
        for anchor in ("random", "unique", "closest", "probabilistic")
    },
    "field": {**FIELD_SMALL, **FIELD_LARGE},
}
# rows trained with the first of the seeds only (the ≈16k-code rows of the field: their cost)
FIRST_SEED_ONLY = set(FIELD_LARGE)
# The papers' own ImageNet 256² (f16) numbers for the field, as the issue collected them: other
# data, models and budgets; for orientation beside the field table, not comparable with it.
FIELD_PAPERS = [
    ("FSQ (Mentzer et al. 2023)", "[8,8,8,5,5,5] = 64,000", "~100%", "2.80 (128², SimVQ's table)"),
    ("LFQ (MAGVIT-v2; Open-MAGVIT2)", "2^18", "100%", "1.17"),
    ("SimVQ (Zhu et al. 2024)", "65,536 / 262,144", "100%", "2.24 / 1.99 (128²)"),
    ("IBQ (Shi et al. 2024)", "1,024 / 16,384 / 262,144", "99 / 96 / 84%", "2.24 / 1.37 / 1.00"),
    ("VQGAN-LC", "100,000", "99.9%", "2.62"),
    ("taming VQGAN", "16,384", "low", "4.9"),
]
TABLE_CHOICES = (*TABLES, "all")

# The papers' MNIST numbers (validation set): row name → (source, {metric: value}).
_VQ_PAPER = dict(l1=0.0207, lpips=0.0282, rfid=3.43, ssim=0.9777, psnr=26.48)
_CVQ_PAPER = dict(l1=0.0180, lpips=0.0222, rfid=1.80, ssim=0.9833, psnr=27.87)
_LOOC_TAB3 = {
    4: (0.0062, 0.0058, 1.31, 0.9976, 37.58),
    8: (0.0068, 0.0064, 1.40, 0.9972, 36.79),
    16: (0.0097, 0.0100, 1.88, 0.9949, 33.73),
    32: (0.0118, 0.0125, 2.19, 0.9928, 32.05),
    64: (0.0138, 0.0157, 2.51, 0.9903, 30.58),
}  # l1, LPIPS, rFID, SSIM, PSNR
_LOOC_32_PAPER = ("LooC Tab. 1", dict(l1=0.0082, lpips=0.0083, rfid=1.70, ssim=0.9961, psnr=35.15))
_ANCHOR_RFID = {
    "online": dict(random=2.27, unique=2.24, probabilistic=2.23, closest=2.59),
    "offline": dict(random=3.20, unique=2.84, probabilistic=2.78, closest=2.51),
}
_TAB3 = {  # Tab. 3 rows D (online) and C (offline): Tab. 4c's probabilistic rows (same rFID)
    "online": ("D", dict(ssim=0.9823, lpips=0.0236, rfid=2.23)),
    "offline": ("C", dict(ssim=0.9810, lpips=0.0253, rfid=2.78)),
}


def _looc_tab3(d: int) -> dict:
    return dict(zip(("l1", "lpips", "rfid", "ssim", "psnr"), _LOOC_TAB3[d]))


PAPERS = {
    "VQ 1024x128": ("CVQ-VAE Tab. 1 / LooC Tab. 1", _VQ_PAPER),
    "CVQ 1024x128 (closest)": ("CVQ-VAE Tab. 4c online", dict(rfid=2.59)),
    "CVQ 1024x128 (probabilistic, contrastive 1)": ("CVQ-VAE Tab. 1 / LooC Tab. 8", _CVQ_PAPER),
    **{
        f"LooC {k}x4 ({layout}, {st})": paper
        for k, paper in ((256, ("LooC Tab. 1 / Tab. 3", _looc_tab3(4))), (32, _LOOC_32_PAPER))
        for layout in SEGMENT_LAYOUTS
        for st in STRAIGHT_THROUGH
    },
    NO_UPDATE: ("LooC Tab. 7 (FFHQ, usage only)", dict(usage=1.0)),
    **{f"LooC 256x{d}": ("LooC Tab. 3", _looc_tab3(d)) for d in _LOOC_TAB3},
    **{
        f"CVQ {a} ({mode})": ("CVQ-VAE Tab. 4c", dict(rfid=v))
        for mode, by_anchor in _ANCHOR_RFID.items()
        for a, v in by_anchor.items()
    },
    **{
        f"CVQ probabilistic ({mode})": (f"CVQ-VAE Tab. 4c / Tab. 3 {row}", paper)
        for mode, (row, paper) in _TAB3.items()
    },
}

# The official code (the CVQ-VAE repository's small VQ-VAE, Adam 3e-4, MSE / variance of the
# [0, 1] training images) on the same 9,000 / 1,000 split, scored on the validation part.
OFFICIAL = [
    ("VQ (l2, no re-init) 1024x128", "1.1%", "7.8", "19.44", "0.8058", "0.0447", "21 s"),
    (
        "CVQ (cosine, closest anchors) 1024x128",
        "55.1%",
        "115.6",
        "22.23",
        "0.8937",
        "0.0304",
        "29 s",
    ),
    ("LooC 256x4, beta=2", "100.0%", "116.5", "24.98", "0.9351", "0.0218", "294 s"),
]
OFFICIAL_CPU = [
    ("VQ (l2, no re-init) 1024x128", "0.5%", "3.8", "17.31", "0.6642", "0.0660", "1,080 s"),
    (
        "CVQ (cosine, closest anchors) 1024x128",
        "19.5%",
        "11.6",
        "18.59",
        "0.7137",
        "0.0566",
        "1,323 s",
    ),
    (
        "LooC 256x4, beta=2 (cosine, closest anchors)",
        "100.0%",
        "52.6",
        "20.03",
        "0.7621",
        "0.0466",
        "2,459 s",
    ),
]
REFERENCES = [
    ("official code, H100, 1,800 steps × batch 1,024", OFFICIAL),
    ("official code, this 2-core CPU (one thread), 400 steps × batch 128", OFFICIAL_CPU),
]

COLUMNS = [
    ("usage", "usage"),
    ("dead_codes", "dead codes"),
    ("final_usage", "final usage"),
    ("perplexity", "perplexity"),
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("l1", "L1"),
    ("lpips", "LPIPS"),
    ("rfid", "rFID"),
    ("best_step", "best step"),
    ("seconds", "train time"),
]


@dataclass
class RunConfig:
    # the official recipe (CVQ-VAE main.py / README): 500 epochs of the 9,000 training images at
    # batch 1,024, 4.5 M images ≈ 4,400 full batches (its loader: 9 per epoch, the last of 808)
    steps: int = 4400
    batch_size: int = 1024
    lr: float = 3e-4
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    val_every: int = 0  # validate every n steps (0: once per epoch, as the official main.py)
    val_images: int = 0  # score only the first n validation images (0: all 1,000)

    def validation_interval(self, train_images: int) -> int:
        return self.val_every or max(1, math.ceil(train_images / self.batch_size))


@dataclass
class Row:
    table: str
    name: str
    kind: str
    options: dict
    metrics: dict[str, float | None]
    curve: list[tuple[int, float]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric → (min, max)


def select_tables(table: str) -> list[str]:
    if table not in TABLE_CHOICES:
        raise ValueError(f"unknown table {table!r}; choose one of {list(TABLE_CHOICES)}")
    return list(TABLES) if table == "all" else [table]


def load_mnist(directory: str | Path) -> dict[str, torch.Tensor]:
    """The MNIST test set: first 9,000 images train, last 1,000 validate."""
    directory = Path(directory)
    return load_mnist_idx(directory / MNIST_FILES[0], directory / MNIST_FILES[1], validation=1000)


def official_variance(images: torch.Tensor) -> torch.Tensor:
    """The divisor of the reconstruction MSE in the official code (CVQ-VAE main.py:
    ``np.var(train_dataset.data / 255.0)``): the variance of the training pixels on [0, 1],
    while the MSE is taken on the [-1, 1] tensors (``Normalize(0.5, 0.5)``) as here. So the term
    is 4 × MSE_[0,1] / var_[0,1]: 4× the weight of dividing by the variance of ``images``."""
    return ((images + 1) / 2).var(unbiased=False)


# --- optional metrics: each needs pretrained weights and is skipped without them ----------------
def _lpips_scorer(device: torch.device):
    from ..losses import build_lpips

    net = build_lpips(pretrained=True).to(device)

    @torch.no_grad()
    def score(recon: torch.Tensor, target: torch.Tensor) -> float:
        vals = [
            net(r.to(device).expand(-1, 3, -1, -1), t.to(device).expand(-1, 3, -1, -1))
            for r, t in zip(recon.split(250), target.split(250))
        ]
        return torch.cat([v.flatten() for v in vals]).mean().item()

    return score


def _rfid_scorer(device: torch.device):
    from engine.fid import frechet_distance, inception_features, load_inception

    net = load_inception(None, device)

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([inception_features(net, x)["2048"] for x in images.split(250)])

    return lambda recon, target: frechet_distance(features(target), features(recon))


def optional_metrics(device: torch.device, enabled: bool = True):
    """``({name: score(recon, target)}, {name: why skipped})`` for LPIPS and rFID."""
    scorers, skipped = {}, {}
    for name, make in (("lpips", _lpips_scorer), ("rfid", _rfid_scorer)):
        if not enabled:
            skipped[name] = "disabled (--no-lpips-fid)"
            continue
        try:
            scorers[name] = make(device)
        except FileNotFoundError as e:
            # the first clause names the file and where it goes; the rest is the loader's advice
            skipped[name] = f"weights missing: {str(e).split(' and ')[0]}"
        except ImportError as e:
            skipped[name] = f"package missing: {e}"
    return scorers, skipped


# --- running ------------------------------------------------------------------------------------
def run_row(
    table: str,
    name: str,
    data: dict[str, torch.Tensor],
    config: RunConfig,
    scorers: dict,
    seed: int = 0,
) -> Row:
    """Train one row from ``seed`` and validate at step 0, every ``config.val_every`` steps and
    at the end (each validation: evaluation mode, over the whole validation part). Reports the
    metrics of the checkpoint with the lowest validation MSE (the official main.py keeps it as
    best.pt and test.py scores it), at the step ``best_step``, and ``final_usage``, the usage of
    the last step's weights; the usage curve holds every validation."""
    kind, options = TABLES[table][name]
    device = torch.device(config.device)
    torch.manual_seed(seed)
    channels = latent_channels(kind, options, EMBED_DIM)
    model = build_model(kind, options, in_channels=1, hidden=HIDDEN, embed_dim=channels)
    model.to(device)
    target = data["val"][: config.val_images or None]
    train_images, val = data["train"].to(device), target.to(device)
    curve, best = [], {}

    def validate(step: int) -> dict:
        scores, recon = evaluate(model, val)
        curve.append((step, scores["usage"]))
        # step 0 (the untrained model) only counts when it is also the last one
        if (step or not config.steps) and ("mse" not in best or scores["mse"] < best["mse"]):
            best.update(scores, best_step=step, recon=recon)
        return scores

    validate(0)
    every = config.validation_interval(len(train_images))
    seconds = train(
        model,
        train_images,
        config.steps,
        config.batch_size,
        config.lr,
        every=every,
        callback=lambda step: step < config.steps and validate(step),
        variance=official_variance(data["train"]),
    )
    final = validate(config.steps) if config.steps else best
    recon = best.pop("recon")
    metrics = {**best, "final_usage": final["usage"], "seconds": seconds}
    for metric, score in scorers.items():
        metrics[metric] = score(recon, target.cpu())
    return Row(table, name, kind, options, metrics, curve, [seed])


def aggregate(rows: list[Row]) -> list[Row]:
    """One row per (table, name) over its seeds: the mean of each metric (None if any run lacks
    it), its (min, max) in ``spread`` and the mean usage curve. One seed: the rows as they are."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.table, r.name), []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        metrics, spread = {}, {}
        for metric in runs[0].metrics:
            values = [r.metrics.get(metric) for r in runs]
            if any(v is None for v in values):
                metrics[metric] = None
                continue
            metrics[metric] = sum(values) / len(values)
            spread[metric] = (min(values), max(values))
        curve = [
            (points[0][0], sum(u for _, u in points) / len(points))
            for points in zip(*(r.curve for r in runs))
        ]
        seeds = [s for r in runs for s in r.seeds]
        first = runs[0]
        out.append(
            Row(first.table, first.name, first.kind, first.options, metrics, curve, seeds, spread)
        )
    return out


def run_tables(
    tables: list[str],
    data,
    config: RunConfig,
    scorers: dict,
    log=print,
    rows: dict[str, list[str]] | None = None,
    done: list[Row] = (),
    saved=None,
) -> list[Row]:
    """Every row of ``tables`` (or only ``rows[table]`` when given), in order, once per seed of
    ``config.seeds`` (the first only for ``FIRST_SEED_ONLY``): one Row per run (see
    :func:`aggregate`). Runs in ``done`` (from an earlier, interrupted call: :func:`load_runs`)
    are kept, not run again; ``saved(results)`` is called after every new run, with the runs so
    far, the done ones that were not asked for at the end."""
    finished = {(r.table, r.name, r.seeds[0]): r for r in done}
    planned = [
        (table, name, seed)
        for table in tables
        for name in (rows or {}).get(table, TABLES[table])
        for seed in (config.seeds[:1] if name in FIRST_SEED_ONLY else config.seeds)
    ]
    others = [r for key, r in finished.items() if key not in set(planned)]
    results = []
    for table, name, seed in planned:
        if (table, name, seed) in finished:
            log(f"  [{table}] {name}, seed {seed}: done before, kept")
            results.append(finished[(table, name, seed)])
            continue
        row = run_row(table, name, data, config, scorers, seed)
        m = row.metrics
        log(
            f"  [{table}] {name}, seed {seed}: usage {100 * m['usage']:.1f}% "
            f"(final {100 * m['final_usage']:.1f}%), perplexity {m['perplexity']:.1f}, "
            f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, L1 {m['l1']:.4f} at step "
            f"{m['best_step']} ({m['seconds']:.0f} s)"
        )
        results.append(row)
        if saved is not None:
            saved(results + others)
    return results + others


def load_runs(path: str | Path, config: RunConfig) -> list[Row]:
    """The runs of an earlier ``results.json`` (none if there is no file), refused with the
    settings that differ when they were made with other settings than ``config`` (the seeds
    aside: adding seeds is how a table is completed)."""
    path = Path(path)
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    mine = {k: v for k, v in asdict(config).items() if k != "seeds"}
    theirs = {k: v for k, v in saved.get("config", {}).items() if k != "seeds"}
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    if differ:
        raise ValueError(
            f"{path} holds runs made with other settings ("
            + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in differ)
            + "); use another --out or the same settings"
        )
    runs = []
    for r in saved["rows"]:
        r["curve"] = [tuple(point) for point in r["curve"]]
        r["spread"] = {k: tuple(v) for k, v in r["spread"].items()}
        runs.append(Row(**r))
    return runs


# --- output -------------------------------------------------------------------------------------
def _value(metric: str, value) -> str:
    if metric in ("usage", "final_usage"):
        return f"{100 * value:.1f}%"
    if metric == "dead_codes":
        return f"{value:,.0f}"
    if metric == "seconds":
        return f"{value:.0f} s"
    if metric == "best_step":
        return f"{value:.0f}"
    return {"perplexity": f"{value:.1f}", "psnr": f"{value:.2f}", "rfid": f"{value:.2f}"}.get(
        metric, f"{value:.4f}"
    )


def _cell(metric: str, value, skipped: dict[str, str], spread=None) -> str:
    if value is None:
        return "skipped" if metric in skipped else "–"
    if spread is None:
        return _value(metric, value)
    return f"{_value(metric, value)} ({_value(metric, spread[0])}–{_value(metric, spread[1])})"


def format_tables(rows: list[Row], config: RunConfig, skipped: dict[str, str]) -> str:
    """Markdown: one table per reproduced table, each of our rows (the mean and min–max over
    the seeds when there are several) followed by the paper's row (where the paper has one),
    then the official-code reference blocks and the skip notes."""
    titles = {
        "main": "Main table (CVQ-VAE Tab. 1 / LooC Tab. 1, MNIST)",
        "looc_dstar": "LooC Tab. 3: d* at K = 256 (beta = 2)",
        "cvq_anchors": "CVQ-VAE Tab. 4c: anchor sampling (online / offline)",
        "field": "The field: every quantizer at about 1k and 16k codes (MNIST)",
    }
    head = "| row | source | " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    seeds = " ".join(map(str, config.seeds))
    out = [
        f"Setting: MNIST test set (first 9,000 train, last 1,000 validate), hidden {HIDDEN}, "
        f"Adam {config.lr:g}, batch {config.batch_size}, {config.steps} steps, loss MSE / "
        f"variance of the [0, 1] training pixels + quantizer loss (the official main.py), "
        + (f"seed {seeds}" if len(config.seeds) == 1 else f"seeds {seeds} (mean (min–max))")
        + f", device {config.device}. Validation every "
        + f"{config.validation_interval(9000)} steps"
        + ("" if config.val_every else " (one epoch)")
        + " on the "
        + (
            f"first {config.val_images} validation images (--quick)"
            if config.val_images
            else "1,000 validation images"
        )
        + ", in eval mode; every metric is that of the checkpoint with the lowest validation "
        "MSE (at 'best step'), usage counted over the whole validation part (the official "
        "test.py); 'final usage': the last step's weights. Cosine distance unless l2; CVQ / "
        "LooC: closest anchors unless stated, online; LooC: beta = 2, (segment layout, "
        "straight-through), the official code's pair 'unshuffle, interpolated'."
    ]
    for table in dict.fromkeys(r.table for r in rows):
        out += ["", f"### {titles[table]}", ""]
        if table == "field":
            out += [
                "FSQ, LFQ, SimVQ and IBQ with their papers' defaults (options tables in the "
                "README); CVQ with closest anchors, LooC in its default layout; the ≈16k-code "
                "rows with the first seed only.",
                "",
            ]
        out += [head, rule]
        for r in (r for r in aggregate(rows) if r.table == table):
            cells = [_cell(m, r.metrics.get(m), skipped, r.spread.get(m)) for m, _ in COLUMNS]
            out.append(f"| {r.name} | ours | " + " | ".join(cells) + " |")
            if r.name in PAPERS:
                source, paper = PAPERS[r.name]
                cells = [_cell(m, paper.get(m), {}) for m, _ in COLUMNS]
                out.append(f"| {r.name} | {source} | " + " | ".join(cells) + " |")
    if "field" in {r.table for r in rows}:
        out += [
            "",
            "### For orientation: the papers' own ImageNet 256² numbers (other data, models and "
            "budgets; not comparable with the table above)",
            "",
            "| method | codebook | usage | rFID |",
            "|---|---|---|---|",
        ]
        out += ["| " + " | ".join(r) + " |" for r in FIELD_PAPERS]
    for title, reference in REFERENCES:
        out += [
            "",
            f"### Reference: {title}, validation part",
            "",
            "| official quantizer | usage | perplexity | PSNR (dB) | SSIM | L1 | train time |",
            "|---|---|---|---|---|---|---|",
        ]
        out += ["| " + " | ".join(r) + " |" for r in reference]
    out += [
        "",
        "(Official code: the CVQ-VAE repository's small VQ-VAE, Adam 3e-4, MSE divided by the "
        "variance of the [0, 1] training images, on the same 9,000 / 1,000 split; usage over "
        "the 1,000 validation images, eval mode.)",
    ]
    for metric, why in skipped.items():
        out.append(f"\n{'LPIPS' if metric == 'lpips' else 'rFID'}: skipped ({why})")
    return "\n".join(out) + "\n"


def plot_usage(rows: list[Row], path: str | Path) -> None:
    """Validation codebook usage over training, one line per row (matplotlib if installed,
    else a plain PIL drawing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_usage_pil(rows, path)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, r in enumerate(rows):  # the colours repeat after ten rows: dashed from then on
        steps, usage = zip(*r.curve)
        style = "-" if i < 10 else "--"
        ax.plot(steps, [100 * u for u in usage], style, marker=".", label=r.name)
    ax.set(
        xlabel="training step",
        ylabel="codebook usage on validation (%)",
        ylim=(-2, 102),
        title="Codebook usage during training (MNIST)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_usage_pil(rows: list[Row], path: str | Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 400, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    last = max(max(s for s, _ in r.curve) for r in rows) or 1
    colors = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
    ]
    for i, r in enumerate(rows):
        color = colors[i % len(colors)]
        points = [(pad + (w - 2 * pad) * s / last, h - pad - (h - 2 * pad) * u) for s, u in r.curve]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((pad + 5, pad + 5 + 12 * i), r.name, fill=color)
    draw.text((pad, h - pad + 5), f"step 0 .. {last}; usage 0 .. 100%", fill="black")
    img.save(path)


def write_outputs(
    rows: list[Row], config: RunConfig, skipped: dict[str, str], out: str | Path
) -> str:
    """Write ``table.md``, ``results.json`` (every run and the per-row summary) and
    ``usage.png`` into ``out``; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_tables(rows, config, skipped)
    (out / "table.md").write_text(text)

    def clean(rows: list[Row]) -> list[dict]:
        finite = lambda v: v if v is None or math.isfinite(v) else None  # noqa: E731
        return [
            {**asdict(r), "metrics": {k: finite(v) for k, v in r.metrics.items()}} for r in rows
        ]

    summary = aggregate(rows)
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "skipped": skipped,
                "rows": clean(rows),  # one per run (row and seed)
                "summary": clean(summary),  # one per row: mean and (min, max) over the seeds
                "papers": {name: {"source": s, **p} for name, (s, p) in PAPERS.items()},
            },
            indent=1,
        )
    )
    plot_usage(summary, out / "usage.png")
    return text
