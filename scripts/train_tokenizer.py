"""Train a VQGAN tokenizer (stage one).

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/digits_cvq.yaml \
        [--output_dir DIR] [--resume_from_checkpoint latest|PATH] [section.key=value ...]

The config is validated before anything is built; the trained tokenizer is exported to
DIR/tokenizer (load it with ``tokenizer.VQTokenizer.from_pretrained``).
"""

from engine.cli import parse_training, training_parser
from engine.run import run_training
from tokenizer.train import TokenizerConfig, train_tokenizer


def main() -> None:
    parser = training_parser(__doc__, "configs/tokenizer")
    args, config, output_dir = parse_training(parser, TokenizerConfig)
    run_training(lambda: train_tokenizer(config, output_dir, resume=args.resume_from_checkpoint))


if __name__ == "__main__":
    main()
