"""Train a VQGAN tokenizer (stage one).

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/digits_cvq.yaml \
        [--output_dir DIR] [--resume_from_checkpoint latest|PATH] [section.key=value ...]

The config is validated before anything is built; the trained tokenizer is exported to
DIR/tokenizer (load it with ``tokenizer.VQTokenizer.from_pretrained``).
"""

import argparse
import sys
from pathlib import Path

from engine.config import ConfigError, load_config
from engine.run import run_training
from tokenizer.train import TokenizerConfig, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/tokenizer/*.yaml)")
    parser.add_argument("--output_dir", "--output-dir", help="default: runs/<config name>")
    parser.add_argument(
        "--resume_from_checkpoint", help='"latest", a checkpoint-N name or a checkpoint folder'
    )
    parser.add_argument("--report_to", help="the train.report_to tracker: tensorboard, wandb, …")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args()
    try:
        overrides = args.overrides + (
            [f"train.report_to={args.report_to}"] if args.report_to else []
        )
        config = load_config(args.config, overrides, TokenizerConfig)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    run_training(lambda: train_tokenizer(config, output_dir, resume=args.resume_from_checkpoint))


if __name__ == "__main__":
    main()
