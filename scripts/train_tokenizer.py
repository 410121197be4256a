"""Train a VQGAN tokenizer (stage one).

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/digits_cvq.yaml \
        [--output-dir DIR] [--resume latest|PATH] [section.key=value ...]

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
    parser.add_argument("--output-dir", help="default: runs/<config name>")
    parser.add_argument("--resume", help='"latest" or a checkpoint folder')
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides, TokenizerConfig)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    run_training(lambda: train_tokenizer(config, output_dir, resume=args.resume))


if __name__ == "__main__":
    main()
