"""Run by tests/diffusion/test_latent_cache.py under
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``.

Both ranks build the same tiny tokenizer (seed 0) and build one latent cache together. Each rank
writes ``rank-R.json`` (items it encoded, length of the cache it got back) to the report folder.

Arguments: CACHE_DIR REPORT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from diffusion.latent_cache import CacheConfig, build_latent_cache
from tests.launch import ROOT
from tokenizer import VQTokenizer

# the miniature tokenizer: the model section of configs/tokenizer/tiny.yaml, as in tests/conftest.py
TINY = yaml.safe_load((ROOT / "configs/tokenizer/tiny.yaml").read_text())["model"]
DATA = {"source": "digits", "resolution": 16, "validation_size": 97}


def main(cache_dir: str, report_dir: str) -> None:
    accelerator = Accelerator()
    torch.manual_seed(0)
    tokenizer = VQTokenizer(**TINY)
    encoded = []
    encode = tokenizer.encode
    tokenizer.encode = lambda x, **kw: encoded.append(len(x)) or encode(x, **kw)
    config = CacheConfig(dir=cache_dir, shard_size=256)
    cache = build_latent_cache(tokenizer, DATA, config, accelerator=accelerator)
    report = {
        "world_size": accelerator.num_processes,
        "encoded": sum(encoded),
        "cache_length": len(cache),
    }
    path = Path(report_dir) / f"rank-{accelerator.process_index}.json"
    path.write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
