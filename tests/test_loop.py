from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from tokenizer.loop import NonFiniteGuard, seeded_batches


class OneProcess(SimpleNamespace):
    num_processes, process_index = 1, 0

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    accelerator = OneProcess(printed=[])
    guard = NonFiniteGuard(3, tmp_path, accelerator)
    assert guard.update(True, 0)
    assert not guard.update(False, 1) and not guard.update(False, 2)
    assert guard.update(True, 3), "a finite step resets the count"
    assert not guard.update(False, 4) and not guard.update(False, 5)
    with pytest.raises(FloatingPointError, match=r"3 non-finite.*learning_rate.*bf16"):
        guard.update(False, 6)
    assert "step 4: non-finite loss, step skipped (1 in a row)" in accelerator.printed


def test_resumed_batch_stream_continues_the_uninterrupted_one():
    data = TensorDataset(torch.arange(50))
    full = seeded_batches(data, 4, 1, 0, 0, OneProcess(printed=[]))
    stream = [next(full)[0].tolist() for _ in range(30)]  # crosses epochs (12 batches each)
    resumed = seeded_batches(data, 4, 1, 0, 0, OneProcess(printed=[]), start_step=17)
    assert [next(resumed)[0].tolist() for _ in range(13)] == stream[17:]
    assert stream[0] != stream[12], "each epoch has its own order"


def test_all_finite_single_process():
    from accelerate import Accelerator

    from tokenizer.loop import all_finite
    accelerator = Accelerator(cpu=True)
    assert all_finite(accelerator, torch.tensor(1.0))
    assert not all_finite(accelerator, torch.tensor(float("nan")))
    assert not all_finite(accelerator, torch.tensor(float("inf")))
