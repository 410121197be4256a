"""FID, KID, Inception Score and precision/recall with torch-fidelity's Inception v3
("inception-v3-compat": the network of the original TensorFlow FID), fed batch by batch.

torch-fidelity extracts the features and computes the metrics (its ``*_features_to_metric``
functions); we only feed it: features are computed wherever the images are (several processes,
a generator that writes no files) and reused (cached reference features)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from .weights import cached_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)


def find_inception_weights(path: str | os.PathLike | None = None, skip_hint: str = "") -> Path:
    """The Inception weights file: ``path`` if given, else the torch hub cache (downloaded there
    if possible). Raises a ``FileNotFoundError`` that says which file to put where (and
    ``skip_hint``, how to do without, e.g. " (or skip rFID with --no-fid)")."""
    if path is None:
        return cached_weights(
            INCEPTION_URL,
            "FID (torch-fidelity's Inception v3)",
            f"or pass its path with --inception-weights PATH{skip_hint}",
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--inception-weights {path}: no such file. It must be torch-fidelity's "
            f"{INCEPTION_FILE} ({INCEPTION_URL}){skip_hint}."
        )
    return Path(path)


@contextmanager
def _state_dict_source(state_dict: dict):
    # torch-fidelity would unpickle a user-given file with weights_only=False; we load it safely
    # ourselves and hand the tensors over in place of its download.
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state_dict):
        yield fe.FeatureExtractorInceptionV3


def load_inception(
    weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    logits: bool = False,
    skip_hint: str = "",
) -> torch.nn.Module:
    """The Inception feature extractor: 2048-d pool features, plus the 1008 "logits_unbiased"
    the Inception Score needs if ``logits``."""
    path = find_inception_weights(weights, skip_hint)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    with _state_dict_source(state_dict) as cls:
        model = cls("inception-v3-compat", ["2048", "logits_unbiased"] if logits else ["2048"])
    model.weights_path = path
    # channels-last convolutions: ~20% faster on CPU (oneDNN) and the cuDNN fast path on GPU;
    # the features change by float rounding only (~1e-6)
    return model.eval().to(device, memory_format=torch.channels_last)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float B×C×H×W → uint8 B×3×H×W (grey expanded to 3 channels)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's features of [-1, 1] images, by name ("2048", "logits_unbiased"): float32 on
    the CPU."""
    device = next(model.parameters()).device
    outputs = model(to_uint8(images).to(device))
    return {name: out.float().cpu() for name, out in zip(model.features_list, outputs)}


def frechet_distance(
    features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray
) -> float:
    """FID between two feature sets (N×D each). With at least D features on both sides, via
    torch-fidelity's statistics (a D×D eigendecomposition); with fewer on either side, via the
    small N1×N2 cross-Gram matrix (``frechet_distances``), which equals it to ~1e-6 relative."""
    a, b = (torch.as_tensor(f).double() for f in (features_a, features_b))
    if 2 <= min(len(a), len(b)) < a.shape[1]:  # (one feature: NaN, as before)
        return frechet_distances([(a, b)])[0]
    from torch_fidelity.metric_fid import (
        KEY_METRIC_FID,
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    stats = [fid_features_to_statistics(f) for f in (a, b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def frechet_distances(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], max_elements: int = 1 << 25
) -> list[float]:
    """FID of each (A, B) pair of feature sets (N1×D, N2×D, N ≥ 2), in float64, by the Gram route:
    with centred X = A − μA and Y = B − μB, Σ1 = XᵀX/(N1−1) and Σ2 = YᵀY/(N2−1), the nonzero
    eigenvalues of Σ1Σ2 are the squared singular values of XYᵀ/√((N1−1)(N2−1)), so
    Tr((Σ1Σ2)^½) is that N1×N2 matrix's nuclear norm and no D×D matrix is formed. Cheap while
    min(N1, N2) is small (per-class FID: ~50 images a class); pairs are batched, zero-padded to
    the largest of their batch (zero rows add zero singular values), at most ``max_elements``
    float64 numbers of padded features at a time."""
    pairs = [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in pairs]
    if any(min(len(a), len(b)) < 2 for a, b in pairs):
        raise ValueError("FID needs at least two features in each set")
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
    while order:
        batch, rows = [], [0, 0]
        for i in order:  # the next pairs while their padded batch fits
            a, b = pairs[i]
            grown = [max(rows[0], len(a)), max(rows[1], len(b))]
            if batch and (len(batch) + 1) * sum(grown) * a.shape[1] > max_elements:
                break
            batch.append(i)
            rows = grown
        order = order[len(batch) :]
        for i, fid in zip(batch, _gram_fids([pairs[i] for i in batch], *rows)):
            out[i] = fid
    return out


def _gram_fids(pairs: list[tuple[torch.Tensor, torch.Tensor]], rows_a: int, rows_b: int):
    dim = pairs[0][0].shape[1]
    x = torch.zeros(len(pairs), rows_a, dim, dtype=torch.float64)
    y = torch.zeros(len(pairs), rows_b, dim, dtype=torch.float64)
    mean_term = torch.empty(len(pairs), dtype=torch.float64)
    for i, (a, b) in enumerate(pairs):
        a, b = a.double(), b.double()
        mu_a, mu_b = a.mean(0), b.mean(0)
        mean_term[i] = (mu_a - mu_b).square().sum()
        torch.sub(a, mu_a, out=x[i, : len(a)]).div_((len(a) - 1) ** 0.5)
        torch.sub(b, mu_b, out=y[i, : len(b)]).div_((len(b) - 1) ** 0.5)
    traces = sum(torch.linalg.vector_norm(z, dim=(1, 2)).square() for z in (x, y))  # TrΣ1+TrΣ2
    tr_sqrt = torch.linalg.svdvals(x @ y.mT).sum(-1)  # Tr((Σ1Σ2)^½)
    return (mean_term + traces - 2 * tr_sqrt).tolist()


def _by_label(features: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    labels = torch.as_tensor(labels)
    order = torch.argsort(labels, stable=True)
    values, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return dict(zip(values.tolist(), torch.as_tensor(features)[order].split(counts.tolist())))


def class_averaged_fid(
    features_a: torch.Tensor,
    labels_a: torch.Tensor,
    features_b: torch.Tensor,
    labels_b: torch.Tensor,
) -> dict:
    """FID of each class (the images of class c in both sets) and their mean, as LooC reports
    ImageNet (Tab. 11). Classes with fewer than two images in either set are left out. Classes
    with fewer images than feature dimensions on either side (ImageNet: ~50 of 2048) go through
    the batched Gram route (``frechet_distances``): 1,000 classes take seconds, not hours."""
    groups_a, groups_b = _by_label(features_a, labels_a), _by_label(features_b, labels_b)
    classes = [
        c
        for c in sorted(groups_a.keys() & groups_b.keys())
        if c >= 0 and len(groups_a[c]) >= 2 and len(groups_b[c]) >= 2
    ]
    if not classes:
        raise ValueError(
            "per-class FID needs labelled reference images and at least two images "
            "of a class in both sets"
        )
    dim = groups_a[classes[0]].shape[1]
    small = [c for c in classes if min(len(groups_a[c]), len(groups_b[c])) < dim]
    per_class = dict(zip(small, frechet_distances([(groups_a[c], groups_b[c]) for c in small])))
    for c in classes:
        if c not in per_class:
            per_class[c] = frechet_distance(groups_a[c], groups_b[c])
    per_class = {int(c): per_class[c] for c in classes}
    return {
        "class_averaged_fid": float(np.mean(list(per_class.values()))),
        "per_class_fid": per_class,
    }


@contextmanager
def _ieee_float32():
    # TF32 matmuls (~1e-3 relative) would blur the distance comparisons
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _distances(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor):
    """Euclidean distances of the rows of ``a`` to those of ``b`` (``*_sq``: squared norms) by
    ‖a‖² + ‖b‖² − 2ab, clamped at 0, as torch.cdist computes them for large inputs."""
    d = a @ b.T
    return d.mul_(-2).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0).sqrt_()


def _chunk_rows(columns: int, itemsize: int, max_bytes: int) -> int:
    return max(1, max_bytes // (columns * (itemsize + 1)))  # the distances and a boolean mask


def _kth_neighbour_radii(x: torch.Tensor, x_sq: torch.Tensor, k: int, rows: int):
    radii = []
    for start in range(0, len(x), rows):
        d = _distances(x[start : start + rows], x_sq[start : start + rows], x, x_sq)
        d.diagonal(offset=start).zero_()  # a point's distance to itself, exactly
        # the (k+1)-th smallest including the point itself, as torch-fidelity's kthvalue(k + 1)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


@torch.no_grad()
def precision_recall(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    k: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_chunk_bytes: int = 1 << 30,
) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) exactly as torch-fidelity
    defines them (``prc_features_to_metric``): each point's radius is the distance to its
    (k+1)-th nearest point of its own set counting itself (ties kept, as ``kthvalue``); precision
    is the share of ``fake`` rows within (≤) the radius of some ``real`` row, recall the reverse;
    the F-score as there. Distances are computed on ``device`` (default: the features') in row
    chunks of at most ``max_chunk_bytes`` (never N×N at once): radii by chunked top-k, then one
    pass over real×fake chunks for both coverage tests.

    Tolerance: ``dtype`` float32 (default) computes ‖a‖² + ‖b‖² − 2ab in IEEE float32 (TF32 off)
    after shifting both sets by one real point, i.e. torch-fidelity's own float32 cdist rounding
    (~1e-6 relative on a distance); a decision can differ from exact arithmetic only for a pair
    whose distance is within that of the radius. ``torch.float64``: ~1e-14 (slow on CPUs and on
    GPUs without fast float64)."""
    device = torch.device(device) if device is not None else real.device
    shift = real[:1].to(device, dtype)  # translation-invariant; fewer bits lost to cancellation
    fake = fake.to(device, dtype) - shift
    real = real.to(device, dtype) - shift
    fake_sq, real_sq = fake.square().sum(1), real.square().sum(1)
    itemsize = torch.finfo(dtype).bits // 8
    rows = _chunk_rows(max(len(fake), len(real)), itemsize, max_chunk_bytes)
    with _ieee_float32():
        fake_radii = _kth_neighbour_radii(fake, fake_sq, k, rows)
        real_radii = _kth_neighbour_radii(real, real_sq, k, rows)
        rows = _chunk_rows(len(fake), itemsize, max_chunk_bytes)
        recalled = torch.zeros(len(real), dtype=torch.bool, device=device)
        precise = torch.zeros(len(fake), dtype=torch.bool, device=device)
        for start in range(0, len(real), rows):
            d = _distances(real[start : start + rows], real_sq[start : start + rows], fake, fake_sq)
            recalled[start : start + rows] = (d <= fake_radii).any(1)
            precise |= (d <= real_radii[start : start + rows, None]).any(0)
    precision = precise.float().mean().item()  # float32 means, as torch-fidelity's
    recall = recalled.float().mean().item()
    return {
        "precision": precision,
        "recall": recall,
        "f_score": 2 * precision * recall / max(1e-5, precision + recall),
    }


def fidelity_metrics(
    generated: dict[str, torch.Tensor],
    reference: torch.Tensor,
    *,
    kid: bool = False,
    isc: bool = False,
    prc: bool = False,
    seed: int = 2020,
    device: torch.device | str | None = None,
) -> dict:
    """FID of the generated "2048" features against the reference's, and, if asked, KID (100
    subsets of min(1000, N) images), the Inception Score (10 splits of the "logits_unbiased"),
    and precision/recall (k = 3, ``precision_recall``, computed on ``device``: default the
    features'). Precision/recall use the Inception pool features, as ADM's evaluation suite does
    (torch-fidelity's own default is VGG16)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    fake = generated["2048"]
    report = {"fid": frechet_distance(fake, reference)}
    if kid:
        size = min(1000, len(fake), len(reference))
        report.update(
            kid_features_to_metric(
                fake, reference, kid_subset_size=size, rng_seed=seed, verbose=False
            )
        )
        report["kid_subset_size"] = size
    if isc:
        if "logits_unbiased" not in generated:
            raise ValueError("the Inception Score needs load_inception(..., logits=True)")
        report.update(isc_features_to_metric(generated["logits_unbiased"], rng_seed=seed))
    if prc:
        report.update(precision_recall(fake, reference, device=device))
    return report
