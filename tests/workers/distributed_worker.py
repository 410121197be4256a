"""Run by tests/tokenizer/test_distributed.py under
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``.

Each rank trains a tiny encoder + quantizer (DDP) on its own, different data for many steps and
then compares its codebook and running statistics with the other rank's. Rank 0 writes a JSON
report to the path given as the first argument.
"""

import json
import sys

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed

from engine.distributed import any_process
from tokenizer.losses import ActNorm
from tokenizer.quantizers import build_quantizer

SETTINGS = {
    "cvq-closest": ("cvq", dict(num_codes=32, code_dim=8, anchor="closest")),
    "cvq-random": ("cvq", dict(num_codes=32, code_dim=8, anchor="random")),
    "cvq-unique": ("cvq", dict(num_codes=32, code_dim=8, anchor="unique", distance="l2")),
    "cvq-probabilistic": ("cvq", dict(num_codes=32, code_dim=8, anchor="probabilistic")),
    "cvq-offline-contrastive": (
        "cvq",
        dict(num_codes=32, code_dim=8, online=False, contrastive_weight=1.0),
    ),
    "looc": ("looc", dict(num_codes=16, code_dim=4)),
    "looc-official": (  # the official code's segment layout and straight-through
        "looc",
        dict(num_codes=16, code_dim=4, segment_layout="unshuffle", straight_through="interpolated"),
    ),
    "looc-no-update": ("looc", dict(num_codes=16, code_dim=4, anchor="none")),
    "cvq-contrastive-chunked": (  # the contrastive loss a code at a time
        "cvq",
        dict(num_codes=32, code_dim=8, contrastive_weight=1.0, max_search_bytes=28),
    ),
    "vq-ema": ("vq", dict(num_codes=32, code_dim=8, ema=True)),
    "fsq": ("fsq", dict(levels=[5, 5, 5, 5, 3, 3, 3, 3])),
    "lfq": ("lfq", dict(code_dim=8, entropy_temperature=0.5)),
    "lfq-groups": ("lfq", dict(code_dim=8, entropy_temperature=0.5, entropy_group_bits=3)),
    "simvq": ("simvq", dict(num_codes=32, code_dim=8)),
    "ibq": ("ibq", dict(num_codes=32, code_dim=8, entropy_temperature=0.5)),
}
# the entropy of the batch mean over both processes: DDP's averaged gradient must be that of one
# process holding both batches (checked by the test, from what rank 0 saves)
GRADIENTS = ("lfq", "lfq-groups", "ibq")


class Tiny(nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.quantizer = quantizer
        self.decoder = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q


def batch(accelerator, generator):
    """Different data on each rank: a rank-specific shift and scale."""
    return torch.randn(4, 3, 8, 8, generator=generator) * (1 + accelerator.process_index)


def loss_of(model, x):
    recon, q = model(x)
    return (recon - x).pow(2).mean() + q.loss


def averaged_gradients(accelerator, name: str) -> dict:
    """One step's gradients after DDP's averaging, with the initial weights and both batches."""
    kind, options = SETTINGS[name]
    set_seed(0, device_specific=True)
    model = accelerator.prepare(Tiny(build_quantizer(kind, **options)))
    initial = {
        k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()
    }
    x = batch(accelerator, torch.Generator().manual_seed(7 + accelerator.process_index))
    accelerator.backward(loss_of(model, x))
    inner = accelerator.unwrap_model(model)
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return {"initial": initial, "x": accelerator.gather(x), "grads": grads}


def main(out_path: str) -> None:
    accelerator = Accelerator()
    report = {"world_size": accelerator.num_processes}
    saved = {name: averaged_gradients(accelerator, name) for name in GRADIENTS}
    if accelerator.is_main_process:
        torch.save(saved, out_path + ".gradients.pt")
    for name, (kind, options) in SETTINGS.items():
        set_seed(0, device_specific=True)  # as the trainers: own draws, weights from rank 0
        model = Tiny(build_quantizer(kind, **options))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        data = torch.Generator().manual_seed(1000 + accelerator.process_index)
        local_counts = None
        for _ in range(40):
            x = batch(accelerator, data)
            recon, q = model(x)
            loss = (recon - x).pow(2).mean() + q.loss
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            local_counts = q.counts if local_counts is None else local_counts + q.counts
        # the whole model: the quantizer's state (codebooks, statistics) and the weights the
        # quantizer's losses trained
        inner = accelerator.unwrap_model(model)
        state = torch.cat([t.detach().float().flatten() for t in inner.state_dict().values()])
        states = accelerator.gather(state.unsqueeze(0))
        counts = accelerator.gather(local_counts.unsqueeze(0))
        report[name] = {
            "max_state_difference": (states[0] - states[1]).abs().max().item(),
            "state_size": state.numel(),
            "local_counts_differ": not torch.equal(counts[0], counts[1]),
        }
    # ActNorm's data-dependent initialisation: from both processes' batches, the same everywhere
    norm = ActNorm(3).train()
    norm(torch.randn(4, 3, 8, 8) * (1 + accelerator.process_index) + accelerator.process_index)
    params = accelerator.gather(torch.cat([norm.loc.flatten(), norm.scale.flatten()])[None])
    report["actnorm_difference"] = (params[0] - params[1]).abs().max().item()
    # a non-finite loss on one process must make every process skip the step
    mine = torch.tensor(float("nan") if accelerator.process_index == 1 else 1.0)
    report["skip_agreed"] = any_process(accelerator, not torch.isfinite(mine))
    report["finite_agreed"] = not any_process(accelerator, not torch.isfinite(torch.tensor(1.0)))
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
