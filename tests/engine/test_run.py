from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from engine.loader import seeded_batches
from engine.run import NonFiniteGuard


class OneProcess(SimpleNamespace):
    num_processes, process_index, device = 1, 0, torch.device("cpu")

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


def test_any_process_single_process():
    from accelerate import Accelerator

    from engine.distributed import any_process

    accelerator = Accelerator(cpu=True)
    assert not any_process(accelerator, not torch.isfinite(torch.tensor(1.0)))
    assert any_process(accelerator, not torch.isfinite(torch.tensor(float("nan"))))
    assert any_process(accelerator, not torch.isfinite(torch.tensor(float("inf"))))


def test_sigterm_sets_a_stop_flag_and_the_handler_is_restored():
    import os
    import signal

    from engine.run import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    assert not stop.flag
    os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
    assert stop.flag
    stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_diverged_replicas_are_named():
    from engine.distributed import check_replicas_agree

    class TwoProcesses(OneProcess):
        num_processes = 2

        def gather(self, mine):  # the other process differs in its second tensor
            other = mine.clone()
            other[0, 1] += 1
            return torch.cat([mine, other])

    tensors = {"a": torch.zeros(3), "codebook": torch.ones(2, 2), "z": torch.arange(4)}
    with pytest.raises(RuntimeError, match=r"different \['codebook'\] \(1 tensors\)"):
        check_replicas_agree(TwoProcesses(printed=[], device="cpu"), tensors)
    same = TwoProcesses(printed=[], device="cpu")
    same.gather = lambda mine: torch.cat([mine, mine])
    check_replicas_agree(same, tensors)
    assert same.printed == ["weights identical on all 2 processes"]
