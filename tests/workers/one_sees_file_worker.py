"""Run by tests/diffusion/test_eval_fid.py under
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``.

Each process has its own FID reference cache folder (as node-local caches would be); the test put
a cached entry into one of them only. Each process writes ``rank-R.json`` (whether its reference
came from the cache, how many features it holds) after a last collective, which a process that
took another branch than the others would never reach.

Arguments: INCEPTION_FILE CACHE_BASE REPORT_DIR
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from diffusion.evaluate import reference_features
from engine.data import DataConfig
from engine.fid import load_inception

DATA = DataConfig(source="digits", resolution=16, validation_size=97)


def main(inception_file: str, cache_base: str, report_dir: str) -> None:
    accelerator = Accelerator()
    inception = load_inception(inception_file)
    reference = reference_features(
        DATA,
        "validation",
        inception,
        accelerator,
        weights="test",
        max_images=6,
        batch_size=3,
        cache_dir=Path(cache_base) / f"rank-{accelerator.process_index}",
    )
    accelerator.wait_for_everyone()
    report = {"cached": reference.cached, "features": len(reference.features)}
    (Path(report_dir) / f"rank-{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
