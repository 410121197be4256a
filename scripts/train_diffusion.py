"""Train the latent diffusion model (stage two) on a frozen tokenizer.

    accelerate launch scripts/train_diffusion.py --config configs/diffusion/digits_uncond.yaml \
        --tokenizer runs/digits_looc/tokenizer [--output-dir DIR] [--resume latest|PATH] \
        [section.key=value ...]

The dataset is encoded once into DIR/latents; the pipeline (tokenizer + EMA UNet + DDIM
scheduler, with the measured latent scaling_factor) is exported to DIR/pipeline.
"""

import argparse
import sys
from pathlib import Path

from diffusion.latent_cache import StaleCacheError
from diffusion.train import DiffusionConfig, train_diffusion
from engine.config import ConfigError, load_config
from engine.run import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/diffusion/*.yaml)")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer from stage one")
    parser.add_argument("--output-dir", help="default: runs/<config name>")
    parser.add_argument("--resume", help='"latest" or a checkpoint folder')
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides, DiffusionConfig)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    run_training(
        lambda: train_diffusion(config, args.tokenizer, output_dir, resume=args.resume),
        errors=(StaleCacheError,),
    )


if __name__ == "__main__":
    main()
