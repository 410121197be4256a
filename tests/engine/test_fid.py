"""rFID plumbing with an Inception file the test writes itself (random weights): the real
network, loaded the way users load theirs, never downloaded."""

from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from engine.data import build_dataset
from engine.fid import (
    INCEPTION_FILE,
    class_averaged_fid,
    find_inception_weights,
    frechet_distance,
    frechet_distances,
    load_inception,
    precision_recall,
)
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


def dxd_fid(a, b):
    """torch-fidelity's FID: the D×D eigendecomposition route, whatever N."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(torch.as_tensor(f).double()) for f in (a, b)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def test_the_gram_route_equals_the_dxd_fid():
    g = torch.Generator().manual_seed(0)
    dim = 48
    scale = torch.linspace(0.2, 3.0, dim)
    sizes = [(2, 2), (2, 9), (17, 17), (30, 45), (47, 200), (48, 48), (120, 70), (300, 500)]
    pairs = [
        (torch.rand(n1, dim, generator=g), torch.rand(n2, dim, generator=g) * scale + 0.1)
        for n1, n2 in sizes
    ]
    expected = [dxd_fid(a, b) for a, b in pairs]
    # forced on every pair (n > D too), batched with padding, and one by one
    assert frechet_distances(pairs) == pytest.approx(expected, rel=1e-6)
    assert frechet_distances(pairs, max_elements=1) == pytest.approx(expected, rel=1e-6)
    # frechet_distance takes it below D features on either side, torch-fidelity's route above
    assert [frechet_distance(a, b) for a, b in pairs] == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(*pairs[-1]) == expected[-1]
    a = pairs[3][0]
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_class_averaged_fid_is_the_mean_of_per_class_dxd_fids():
    g = torch.Generator().manual_seed(1)
    dim = 32
    # class 0: 40/60 images, 1: 3/2, 2: 80/50 (over D on one side), 3: 70/90 (over D on both),
    # 4: only one generated image (left out), 5: generated only, -1: unlabelled
    counts_a = {0: 40, 1: 3, 2: 80, 3: 70, 4: 1, 5: 6, -1: 5}
    counts_b = {0: 60, 1: 2, 2: 50, 3: 90, 4: 5, -1: 5}

    def draw(counts, shift):
        labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
        labels = labels[torch.randperm(len(labels), generator=g)]  # classes interleaved
        return torch.rand(len(labels), dim, generator=g) + shift * labels[:, None], labels

    (fa, la), (fb, lb) = draw(counts_a, 0.1), draw(counts_b, 0.12)
    out = class_averaged_fid(fa, la, fb, lb)
    expected = {c: dxd_fid(fa[la == c], fb[lb == c]) for c in (0, 1, 2, 3)}
    assert list(out["per_class_fid"]) == [0, 1, 2, 3]
    assert list(out["per_class_fid"].values()) == pytest.approx(list(expected.values()), rel=1e-6)
    assert out["class_averaged_fid"] == pytest.approx(np.mean(list(expected.values())), rel=1e-6)
    with pytest.raises(ValueError, match="per-class FID"):
        class_averaged_fid(fa, torch.full_like(la, -1), fb, lb)


def brute_force_precision_recall(fake, real, k=3):
    """The definition in float64 with exact differences (no ‖a‖²+‖b‖²−2ab expansion)."""
    fake, real = fake.double(), real.double()
    dist = lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    fake_radii = dist(fake, fake).kthvalue(k + 1).values
    real_radii = dist(real, real).kthvalue(k + 1).values
    cross = dist(fake, real)
    precision = (cross <= real_radii).any(1).float().mean().item()
    recall = (cross.T <= fake_radii).any(1).float().mean().item()
    return precision, recall


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_precision_recall_equals_torch_fidelity(dtype):
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(2)
    fake = torch.rand(300, 64, generator=g)
    real = torch.rand(257, 64, generator=g) * 1.02 + 0.01
    expected = prc_features_to_metric(fake, real, verbose=False)
    assert 0.1 < expected["precision"] < 0.9 and 0.1 < expected["recall"] < 0.9
    for chunk in (1 << 30, 10_000):  # one chunk; 7-8 rows a chunk
        got = precision_recall(fake, real, dtype=dtype, max_chunk_bytes=chunk)
        assert got == expected
    assert (got["precision"], got["recall"]) == brute_force_precision_recall(fake, real)


def test_precision_recall_ties_count_as_inside():
    # small integer points on a lattice, with repeats: squared distances are exact integers in
    # float32 and float64, so many cross distances equal a radius exactly ("<=" counts them)
    g = torch.Generator().manual_seed(3)
    fake = torch.randint(0, 3, (120, 4), generator=g).float()
    real = torch.randint(0, 3, (90, 4), generator=g).float() + torch.tensor([1.0, 0, 0, 0])
    precision, recall = brute_force_precision_recall(fake, real)
    for dtype in (torch.float32, torch.float64):
        got = precision_recall(fake, real, dtype=dtype, max_chunk_bytes=3000)
        assert (got["precision"], got["recall"]) == (precision, recall)
    # the ties matter: a strict "<" would give other numbers
    strict = (torch.cdist(fake, real) < torch.cdist(real, real).kthvalue(4).values).any(1)
    assert strict.float().mean().item() != precision
    same = precision_recall(fake, fake)
    assert same["precision"] == same["recall"] == 1.0


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
