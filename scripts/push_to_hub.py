"""Publish a saved pipeline folder on the Hugging Face Hub (after ``eval_fid.py``, its card
carries the FID in ``model-index``).

    python scripts/push_to_hub.py --pipeline runs/cin/pipeline --hub_model_id you/cin-ldm \
        [--hub_private_repo]

Only the pipeline's own files go up (model_index.json, the components' configs, weights and code,
the pipeline's code, the model card, the training configs), with no path of this machine in
them: never checkpoints, latents, logs or anything else left in the folder.
``train_diffusion.py --push_to_hub`` does the same at the end of training. The token is the
HF_TOKEN environment variable's or that of ``hf auth login``; ``--hub_token`` works but warns:
the command line is echoed when a run fails.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="DIR/pipeline of train_diffusion.py")
    parser.add_argument("--hub_model_id", required=True, help="the repository, e.g. you/cin-ldm")
    parser.add_argument(
        "--hub_private_repo", action="store_true", help="create it private (default: public)"
    )
    parser.add_argument(
        "--hub_token",
        help="the Hub token (default: HF_TOKEN's or `hf auth login`'s; given here, it warns: the "
        "command line is echoed when a run fails)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()  # --help exits here, before torch is imported
    from pipelines.hub import HubPushError, push_to_hub, warn_hub_token

    warn_hub_token(args.hub_token)
    try:
        url = push_to_hub(
            args.pipeline, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token
        )
    except (HubPushError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"pushed {args.pipeline} to {url}")


if __name__ == "__main__":
    main()
