"""Reproductions of the papers' small-image tokenizer tables on the MNIST test set: the main table
(CVQ-VAE Tab. 1 / LooC Tab. 1: VQ, CVQ, LooC under identical settings), LooC Tab. 3 (d* at
K = 256) and CVQ-VAE Tab. 4c (anchor sampling, online and offline). Every row trains the same
small VQ-VAE (hidden 128, Adam 3e-4, loss MSE / data variance + quantizer loss, no GAN, no
perceptual loss) with the same seed through ``tokenizer.experiments.compare.train``, and is
scored on the validation part; the papers' numbers are printed beside ours."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compare import build_model, evaluate, train
from .mnist import load_mnist_idx

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HIDDEN, EMBED_DIM = 128, 128  # the papers' VQ-VAE: 128 hidden channels, codes of dimension 128

VQ = ("vq", dict(num_codes=1024, code_dim=128, distance="l2"))  # VQ-VAE: l2, no re-init


def _cvq(anchor: str = "closest", online: bool = True):
    # cosine distance, no contrastive loss: CVQ-VAE Tab. 3 rows D (online) and C (offline)
    return ("cvq", dict(num_codes=1024, code_dim=128, anchor=anchor, online=online))


def _looc(k: int, d: int):
    return ("looc", dict(num_codes=k, code_dim=d, interp_scale=2))  # beta = 2 (LooC Sec. 3.2)


# table → {row name → (kind, options)}
TABLES = {
    "main": {
        "VQ 1024x128": VQ,
        "CVQ 1024x128 (online)": _cvq(),
        "CVQ 1024x128 (offline)": _cvq(online=False),
        "LooC 256x4": _looc(256, 4),
        "LooC 32x4": _looc(32, 4),
    },
    "looc_dstar": {f"LooC 256x{d}": _looc(256, d) for d in (4, 8, 16, 32, 64)},
    "cvq_anchors": {
        f"CVQ {anchor} ({mode})": _cvq(anchor, mode == "online")
        for mode in ("online", "offline")
        for anchor in ("random", "unique", "closest", "probabilistic")
    },
}
TABLE_CHOICES = (*TABLES, "all")

# The papers' MNIST numbers (validation set): row name → (source, {metric: value}).
_VQ_PAPER = dict(l1=0.0207, lpips=0.0282, rfid=3.43, ssim=0.9777, psnr=26.48)
_LOOC_TAB3 = {
    4: (0.0062, 0.0058, 1.31, 0.9976, 37.58),
    8: (0.0068, 0.0064, 1.40, 0.9972, 36.79),
    16: (0.0097, 0.0100, 1.88, 0.9949, 33.73),
    32: (0.0118, 0.0125, 2.19, 0.9928, 32.05),
    64: (0.0138, 0.0157, 2.51, 0.9903, 30.58),
}  # l1, LPIPS, rFID, SSIM, PSNR
_ANCHOR_RFID = {
    "online": dict(random=2.27, unique=2.24, probabilistic=2.23, closest=2.59),
    "offline": dict(random=3.20, unique=2.84, probabilistic=2.78, closest=2.51),
}
PAPERS = {
    "VQ 1024x128": ("CVQ-VAE Tab. 1 / LooC Tab. 1", _VQ_PAPER),
    "CVQ 1024x128 (online)": ("CVQ-VAE Tab. 3 D", dict(ssim=0.9823, lpips=0.0236, rfid=2.23)),
    "CVQ 1024x128 (offline)": ("CVQ-VAE Tab. 3 C", dict(ssim=0.9810, lpips=0.0253, rfid=2.78)),
    "LooC 256x4": (
        "LooC Tab. 1 / Tab. 3",
        dict(zip(("l1", "lpips", "rfid", "ssim", "psnr"), _LOOC_TAB3[4])),
    ),
    "LooC 32x4": ("LooC Tab. 1", dict(l1=0.0082, lpips=0.0083, rfid=1.70, ssim=0.9961, psnr=35.15)),
    **{
        f"LooC 256x{d}": ("LooC Tab. 3", dict(zip(("l1", "lpips", "rfid", "ssim", "psnr"), v)))
        for d, v in _LOOC_TAB3.items()
        if d != 4
    },
    **{
        f"CVQ {a} ({mode})": ("CVQ-VAE Tab. 4c", dict(rfid=v))
        for mode, by_anchor in _ANCHOR_RFID.items()
        for a, v in by_anchor.items()
    },
}

# The official code on an H100, same setting, 1,800 steps, scored on the same validation part.
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

COLUMNS = [
    ("usage", "usage"),
    ("perplexity", "perplexity"),
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("l1", "L1"),
    ("lpips", "LPIPS"),
    ("rfid", "rFID"),
    ("seconds", "train time"),
]


@dataclass
class RunConfig:
    steps: int = 1800
    batch_size: int = 1024
    lr: float = 3e-4
    seed: int = 0
    device: str = "cpu"
    curve_points: int = 20
    val_images: int = 0  # score only the first n validation images (0: all 1,000)


@dataclass
class Row:
    table: str
    name: str
    kind: str
    options: dict
    metrics: dict[str, float | None]
    curve: list[tuple[int, float]] = field(default_factory=list)


def select_tables(table: str) -> list[str]:
    if table not in TABLE_CHOICES:
        raise ValueError(f"unknown table {table!r}; choose one of {list(TABLE_CHOICES)}")
    return list(TABLES) if table == "all" else [table]


def load_mnist(directory: str | Path) -> dict[str, torch.Tensor]:
    """The MNIST test set: first 9,000 images train, last 1,000 validate."""
    directory = Path(directory)
    return load_mnist_idx(directory / MNIST_FILES[0], directory / MNIST_FILES[1], validation=1000)


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
    table: str, name: str, data: dict[str, torch.Tensor], config: RunConfig, scorers: dict
) -> Row:
    """Train one row from the same seed and score it on the validation part; the usage curve
    holds the validation usage at ``curve_points`` evenly spaced steps (and step 0)."""
    kind, options = TABLES[table][name]
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(kind, options, in_channels=1, hidden=HIDDEN, embed_dim=EMBED_DIM)
    model.to(device)
    target = data["val"][: config.val_images or None]
    train_images, val = data["train"].to(device), target.to(device)
    curve = []

    def record(step: int) -> None:
        if step < config.steps:  # the last point is the final evaluation below
            curve.append((step, evaluate(model, val)[0]["usage"]))

    record(0)
    every = max(1, config.steps // max(1, config.curve_points))
    seconds = train(
        model,
        train_images,
        config.steps,
        config.batch_size,
        config.lr,
        every=every,
        callback=record,
    )
    metrics, recon = evaluate(model, val)
    curve.append((config.steps, metrics["usage"]))
    for metric, score in scorers.items():
        metrics[metric] = score(recon, target.cpu())
    metrics["seconds"] = seconds
    return Row(table, name, kind, options, metrics, curve)


def run_tables(
    tables: list[str],
    data,
    config: RunConfig,
    scorers: dict,
    log=print,
    rows: dict[str, list[str]] | None = None,
) -> list[Row]:
    """Every row of ``tables`` (or only ``rows[table]`` when given), in order."""
    results = []
    for table in tables:
        for name in (rows or {}).get(table, TABLES[table]):
            row = run_row(table, name, data, config, scorers)
            m = row.metrics
            log(
                f"  [{table}] {name}: usage {100 * m['usage']:.1f}%, perplexity "
                f"{m['perplexity']:.1f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, "
                f"L1 {m['l1']:.4f} ({m['seconds']:.0f} s)"
            )
            results.append(row)
    return results


# --- output -------------------------------------------------------------------------------------
def _cell(metric: str, value, skipped: dict[str, str]) -> str:
    if value is None:
        return "skipped" if metric in skipped else "–"
    if metric == "usage":
        return f"{100 * value:.1f}%"
    if metric == "seconds":
        return f"{value:.0f} s"
    return {"perplexity": f"{value:.1f}", "psnr": f"{value:.2f}", "rfid": f"{value:.2f}"}.get(
        metric, f"{value:.4f}"
    )


def format_tables(rows: list[Row], config: RunConfig, skipped: dict[str, str]) -> str:
    """Markdown: one table per reproduced table, each of our rows followed by the paper's row
    (where the paper has one), then the official-code reference block and the skip notes."""
    titles = {
        "main": "Main table (CVQ-VAE Tab. 1 / LooC Tab. 1, MNIST)",
        "looc_dstar": "LooC Tab. 3: d* at K = 256 (beta = 2)",
        "cvq_anchors": "CVQ-VAE Tab. 4c: anchor sampling (online / offline)",
    }
    head = "| row | source | " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    out = [
        f"Setting: MNIST test set (first 9,000 train, last 1,000 validate), hidden "
        f"{HIDDEN}, Adam {config.lr:g}, batch {config.batch_size}, {config.steps} steps, "
        f"seed {config.seed}, device {config.device}; metrics on the "
        + (
            f"first {config.val_images} validation images (--quick)."
            if config.val_images
            else "1,000 validation images."
        )
    ]
    for table in dict.fromkeys(r.table for r in rows):
        out += ["", f"### {titles[table]}", "", head, rule]
        for r in (r for r in rows if r.table == table):
            cells = [_cell(m, r.metrics.get(m), skipped) for m, _ in COLUMNS]
            out.append(f"| {r.name} | ours | " + " | ".join(cells) + " |")
            if r.name in PAPERS:
                source, paper = PAPERS[r.name]
                cells = [_cell(m, paper.get(m), {}) for m, _ in COLUMNS]
                out.append(f"| {r.name} | {source} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### Reference: official code, H100, same setting, 1,800 steps, validation part",
        "",
        "| official quantizer | usage | perplexity | PSNR (dB) | SSIM | L1 | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in OFFICIAL]
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
    for r in rows:
        steps, usage = zip(*r.curve)
        ax.plot(steps, [100 * u for u in usage], marker=".", label=r.name)
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
    """Write ``table.md``, ``results.json`` and ``usage.png`` into ``out``; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_tables(rows, config, skipped)
    (out / "table.md").write_text(text)
    clean = [
        {
            **asdict(r),
            "metrics": {
                k: (v if v is None or math.isfinite(v) else None) for k, v in r.metrics.items()
            },
        }
        for r in rows
    ]
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "skipped": skipped,
                "rows": clean,
                "papers": {name: {"source": s, **p} for name, (s, p) in PAPERS.items()},
            },
            indent=1,
        )
    )
    plot_usage(rows, out / "usage.png")
    return text
