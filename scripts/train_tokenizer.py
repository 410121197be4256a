"""Train a VQGAN tokenizer (stage one).

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/digits_cvq.yaml \
        [--output_dir DIR] [--resume_from_checkpoint latest|PATH] [section.key=value ...]

The config is validated before anything is built; the trained tokenizer is exported to
DIR/tokenizer (load it with ``tokenizer.VQTokenizer.from_pretrained``).
"""

import argparse

from engine.cli import load_run_config, parse_training_args, run_training, training_parser


def build_parser() -> argparse.ArgumentParser:
    return training_parser(__doc__, "configs/tokenizer")


def main() -> None:
    args = parse_training_args(build_parser())  # --help exits here, before torch is imported
    from tokenizer.train import TokenizerConfig, train_tokenizer

    config, output_dir = load_run_config(args, TokenizerConfig)
    run_training(lambda: train_tokenizer(config, output_dir, resume=args.resume_from_checkpoint))


if __name__ == "__main__":
    main()
