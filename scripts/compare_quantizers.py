"""Train the small VQ-VAE on scikit-learn's digits with each quantizer (VQ, CVQ, LooC, FSQ, LFQ,
SimVQ, IBQ) and print codebook usage, perplexity and PSNR on the held-out digits.

    python scripts/compare_quantizers.py [--steps 300] [--resolution 16] [--seed 0]
"""

import argparse

import torch

from tokenizer.experiments.compare import DEFAULT_SETTINGS, format_table, train_and_evaluate
from tokenizer.experiments.mnist import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per quantizer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=16, help="digits are up-sampled to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
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
