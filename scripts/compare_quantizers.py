"""Train the small VQ-VAE on scikit-learn's digits with each quantizer (VQ, CVQ, LooC, FSQ, LFQ,
SimVQ, IBQ) and print codebook usage, perplexity and PSNR on the held-out digits.

    python scripts/compare_quantizers.py [--steps 300] [--resolution 16] [--seed 0]
"""

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps per quantizer (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="training batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=16,
        help="digits are up-sampled to this side in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every quantizer's run (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()  # --help exits here, before torch is imported
    import torch

    from tokenizer.experiments.compare import DEFAULT_SETTINGS, format_table, train_and_evaluate
    from tokenizer.experiments.mnist import load_digits

    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_digits(args.resolution)
    print(
        f"digits: {len(data['train'])} train / {len(data['val'])} validation images, "
        f"{args.resolution}x{args.resolution}, {args.steps} steps per quantizer"
    )
    results = []
    for name, (kind, options) in DEFAULT_SETTINGS.items():
        result = train_and_evaluate(
            name,
            kind,
            options,
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        print(
            f"  {name}: usage {100 * result.usage:.1f}%, perplexity {result.perplexity:.1f}, "
            f"PSNR {result.psnr:.2f} dB ({result.seconds:.0f} s)",
            flush=True,
        )
        results.append(result)
    print()
    print(format_table(results))


if __name__ == "__main__":
    main()
