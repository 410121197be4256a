"""Evaluate a trained tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity.

    python scripts/eval_tokenizer.py --tokenizer runs/digits_cvq/tokenizer --data digits \
        [--part validation] [--config configs/tokenizer/digits_cvq.yaml] [--batch-size 64] \
        [--max-images N] [--inception-weights PATH] [--no-fid] [--no-lpips] [--out report.json]

The images are read and preprocessed like training data: the ``data`` section of ``--config``,
by default the config the run saved beside the tokenizer (``DIR/../config.yaml``), else
resolution and channels from the tokenizer; ``--data`` overrides the source.
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer", required=True, help="folder written by training (DIR/tokenizer)"
    )
    parser.add_argument(
        "--data",
        help="data source: digits, a folder, a file, a hub name (default: data.source of the "
        "config, see --config)",
    )
    parser.add_argument(
        "--config",
        help="take the data section of this training config "
        "(default: the one saved by the run, if any)",
    )
    parser.add_argument(
        "--part",
        default="validation",
        choices=["train", "validation"],
        help="the part of the data to evaluate on (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--max-images", type=int, help="evaluate at most this many images (default: all)"
    )
    parser.add_argument(
        "--inception-weights",
        help="torch-fidelity's Inception weights file (default: the torch hub cache's, "
        "downloaded there if possible)",
    )
    parser.add_argument("--no-fid", action="store_true", help="skip rFID")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--device", help="the torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--out", help="write the report here as JSON (default: the report is printed only)"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()  # --help exits here, before torch is imported
    import torch

    from engine.config import ConfigError, from_mapping, load_yaml
    from engine.data import DataConfig, build_dataset
    from engine.fid import load_inception
    from tokenizer.evaluate import evaluate_tokenizer
    from tokenizer.losses import build_lpips
    from tokenizer.model import VQTokenizer

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = VQTokenizer.from_pretrained(args.tokenizer).to(args.device)
    except OSError as e:
        sys.exit(f"--tokenizer {args.tokenizer}: not a saved tokenizer folder ({e})")
    saved = Path(args.tokenizer).parent / "config.yaml"
    try:
        config = (
            load_yaml(args.config) if args.config else (load_yaml(saved) if saved.is_file() else {})
        )
    except ConfigError as e:
        sys.exit(f"--config: {e}")
    data = dict(config.get("data") or {})
    data.setdefault("resolution", model.config.resolution)
    data.setdefault("channels", model.config.in_channels)
    if args.data:
        data["source"] = args.data
    try:
        data_config = from_mapping(DataConfig, data, "data")
        lpips = None if args.no_lpips else build_lpips(pretrained=True).to(args.device)
        inception = (
            None
            if args.no_fid
            else load_inception(
                args.inception_weights, args.device, skip_hint=" (or skip rFID with --no-fid)"
            )
        )
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        sys.exit(str(e))
    dataset = build_dataset(data_config, args.part)
    report = evaluate_tokenizer(
        model,
        dataset,
        args.batch_size,
        lpips=lpips,
        inception=inception,
        max_images=args.max_images,
    )
    report.update(tokenizer=args.tokenizer, data=asdict(data_config), part=args.part)
    for key in ("rfid", "psnr", "ssim", "lpips", "l1", "usage", "perplexity"):
        value = report[key]
        shown = (
            "skipped"
            if value is None
            else (f"{100 * value:.1f}%" if key == "usage" else f"{value:.4f}")
        )
        print(f"{key:>10}: {shown}")
    print(f"{'images':>10}: {report['images']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
