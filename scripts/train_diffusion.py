"""Train the latent diffusion model (stage two) on a frozen tokenizer.

    accelerate launch scripts/train_diffusion.py --config configs/diffusion/digits_uncond.yaml \
        --tokenizer runs/digits_looc/tokenizer [--output_dir DIR] \
        [--resume_from_checkpoint latest|PATH] [--report_to wandb] \
        [--push_to_hub --hub_model_id you/repo] [section.key=value ...]

The dataset is encoded once into DIR/latents; the pipeline (tokenizer + EMA UNet + DDIM
scheduler, with the measured latent scaling_factor) is exported to DIR/pipeline, the one with the
best validation loss to DIR/pipeline-best; ``--push_to_hub`` publishes DIR/pipeline.
"""

import argparse
from pathlib import Path

from engine.cli import load_run_config, parse_training_args, run_training, training_parser


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__, "configs/diffusion")
    parser.add_argument(
        "--tokenizer", required=True, help="DIR/tokenizer from stage one (the frozen tokenizer)"
    )
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="publish DIR/pipeline at the end of training (default: not published)",
    )
    parser.add_argument(
        "--hub_model_id", help="the Hub repository, e.g. you/repo (default: the output folder name)"
    )
    parser.add_argument(
        "--hub_private_repo",
        action="store_true",
        help="with --push_to_hub, create the repository private (default: public)",
    )
    parser.add_argument(
        "--hub_token",
        help="the Hub token (default: HF_TOKEN's or `hf auth login`'s, the safer way: a token "
        "given here warns, as the command line is echoed when a run fails)",
    )
    return parser


def main() -> None:
    args = parse_training_args(build_parser())  # --help exits here, before torch is imported
    from accelerate import PartialState

    from diffusion.latent_cache import StaleCacheError
    from diffusion.train import DiffusionConfig, train_diffusion
    from pipelines.hub import HubPushError, push_to_hub, warn_hub_token

    config, output_dir = load_run_config(args, DiffusionConfig)
    warn_hub_token(args.hub_token)

    def train() -> None:
        pipeline = train_diffusion(
            config, args.tokenizer, output_dir, resume=args.resume_from_checkpoint
        )
        if args.push_to_hub and PartialState().is_main_process:
            repo_id = args.hub_model_id or Path(output_dir).name
            url = push_to_hub(
                pipeline, repo_id, private=args.hub_private_repo, token=args.hub_token
            )
            print(f"pushed {pipeline} to {url}")

    run_training(train, errors=(StaleCacheError, HubPushError))


if __name__ == "__main__":
    main()
