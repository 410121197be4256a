"""rFID plumbing with an Inception file the test writes itself (random weights): the real
network, loaded the way users load theirs, never downloaded."""

from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from engine.data import build_dataset
from engine.fid import INCEPTION_FILE, find_inception_weights, frechet_distance, load_inception
from tokenizer.evaluate import evaluate_tokenizer


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    g = np.random.default_rng(0)
    a = g.normal(0.0, 1.0, (4000, 3))
    b = g.normal(0.5, 2.0, (4000, 3))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed = (
        ((mu_a - mu_b) ** 2).sum()
        + np.trace(s_a + s_b)
        - 2 * np.trace(linalg.sqrtm(s_a @ s_b).real)
    )
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(closed, rel=1e-6)
    assert frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-6)


def test_missing_weights_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        find_inception_weights(tmp_path / "nope.pth")
    with mock.patch("torch.hub.get_dir", return_value=str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
            find_inception_weights()


def test_rfid_runs_with_a_given_weights_file(fake_inception_file, tiny_tokenizer):
    inception = load_inception(fake_inception_file)
    loaded = torch.load(fake_inception_file, weights_only=True)
    assert torch.equal(
        inception.state_dict()["Conv2d_1a_3x3.conv.weight"], loaded["Conv2d_1a_3x3.conv.weight"]
    )
    model = tiny_tokenizer(embed_dim=8, quantizer="vq", quantizer_options={"num_codes": 8})
    data = build_dataset(
        {"source": "digits", "resolution": 16, "validation_size": 20}, "validation"
    )
    report = evaluate_tokenizer(model, data, batch_size=10, inception=inception)
    assert report["images"] == 20
    assert report["rfid"] > 0  # an untrained tokenizer does not reproduce the digits
