"""Generation FID: the metric, the reference cache, scripts/eval_fid.py end to end on a tiny
pipeline (one and two processes), the model card, and the offline error. The Inception network
is torch-fidelity's, with a random (kaiming) weights file the test writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from diffusion.evaluate import gather_in_order, reference_key, reference_spec
from engine.data import DataConfig, build_dataset
from engine.fid import fidelity_metrics, frechet_distance, inception_features, load_inception
from pipelines.model_card import record_evaluation
from tests.launch import ROOT, launch_two_processes


def eval_fid(*args, ok=True, env=None):
    done = subprocess.run(
        [sys.executable, "scripts/eval_fid.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def digits_features(fake_inception_file):
    inception = load_inception(fake_inception_file, logits=True)
    data = build_dataset(
        {"source": "digits", "resolution": 16, "validation_size": 12}, "validation"
    )
    images = torch.stack([data[i]["pixel_values"] for i in range(12)])
    noisy = {
        s: (
            images + s * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        ).clamp(-1, 1)
        for s in (0.1, 0.5)
    }
    return {"clean": inception_features(inception, images)} | {
        s: inception_features(inception, x) for s, x in noisy.items()
    }


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits_features):
    clean = digits_features["clean"]["2048"]
    assert frechet_distance(clean, clean) == pytest.approx(0.0, abs=1e-3)
    small = frechet_distance(clean, digits_features[0.1]["2048"])
    large = frechet_distance(clean, digits_features[0.5]["2048"])
    assert 0 < small < large


def test_kid_isc_from_torch_fidelity_and_precision_recall_as_it_defines_them(digits_features):
    from torch_fidelity.metric_prc import prc_features_to_metric

    clean, noisy = digits_features["clean"], digits_features[0.5]
    same = fidelity_metrics(clean, clean["2048"], kid=True, isc=True, prc=True)
    assert same["precision"] == same["recall"] == 1.0
    other = fidelity_metrics(noisy, clean["2048"], kid=True, isc=True, prc=True, device="cpu")
    prc = prc_features_to_metric(noisy["2048"], clean["2048"], verbose=False)
    assert {k: other[k] for k in prc} == prc
    assert other["kernel_inception_distance_mean"] > same["kernel_inception_distance_mean"] + 1e-3
    assert other["kid_subset_size"] == 12 and other["inception_score_mean"] >= 1.0
    assert other["fid"] == pytest.approx(frechet_distance(noisy["2048"], clean["2048"]))


def test_reference_key_follows_data_and_preprocessing_only():
    base = DataConfig(source="digits", resolution=16, validation_size=24)
    key = reference_key(reference_spec(base, "train", 100, "w#1"))
    assert key.startswith("digits-train-16px-")
    assert key == reference_key(
        reference_spec(
            DataConfig(
                source="digits", resolution=16, validation_size=24, flip=True, crop="random"
            ),
            "train",
            100,
            "w#1",
        )
    )
    for changed in (
        reference_spec(
            DataConfig(source="digits", resolution=32, validation_size=24), "train", 100, "w#1"
        ),
        reference_spec(base, "validation", 100, "w#1"),
        reference_spec(base, "train", 50, "w#1"),
        reference_spec(base, "train", 100, "w#2"),
    ):
        assert reference_key(changed) != key


def test_gather_in_order_sorts_one_process_rows():
    out = gather_in_order(
        Accelerator(cpu=True), [2, 0, 1], {"x": torch.tensor([[2.0], [0.0], [1.0]])}
    )
    assert out["x"].flatten().tolist() == [0.0, 1.0, 2.0]


def report(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_eval_fid_end_to_end_cache_model_card_and_two_processes(
    tmp_path, fake_inception_file, save_pipeline
):
    pipe = save_pipeline(tmp_path / "pipe")
    common = [
        "--pipeline",
        pipe,
        "--inception-weights",
        fake_inception_file,
        "--steps",
        2,
        "--reference-images",
        8,
        "--cache-dir",
        tmp_path / "cache",
        "--batch-size",
        4,
    ]
    first = eval_fid(
        *common,
        "--num-samples",
        5,
        "--out",
        tmp_path / "one.json",
        "--save-samples",
        tmp_path / "samples",
    )
    one = report(tmp_path / "one.json")
    assert "FID" in first.stdout and one["metrics"]["fid"] > 0
    assert one["sampling"] == {
        "num_samples": 5,
        "steps": 2,
        "eta": 0.0,
        "guidance_scale": None,
        "seed": 0,
        "class_labels": None,
        "scheduler": "DDIMScheduler",
        "dtype": "float32",
    }
    assert one["reference"]["images"] == 8 and not one["reference"]["cached"]
    assert one["reference"]["resolution"] == 16 and len(one["pipeline"]["hash"]) == 16
    assert len(list((tmp_path / "samples").glob("*.png"))) == 5

    # the second run reads the cached reference features and draws the same samples
    eval_fid(*common, "--num-samples", 5, "--out", tmp_path / "again.json")
    again = report(tmp_path / "again.json")
    assert again["reference"]["cached"] and again["reference"]["key"] == one["reference"]["key"]
    assert again["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-9)

    # two processes, an uneven share each: the same 10 samples, hence the same FID
    launch_two_processes(
        ROOT / "scripts" / "eval_fid.py",
        *map(str, common),
        "--num-samples",
        "5",
        "--out",
        str(tmp_path / "two.json"),
        "--no-model-card",
        port=29591,
    )
    two = report(tmp_path / "two.json")
    assert two["processes"] == 2 and two["sampling"]["num_samples"] == 5
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-4)

    # another reference part misses the cache
    eval_fid(
        *common,
        "--num-samples",
        5,
        "--reference-part",
        "validation",
        "--out",
        tmp_path / "val.json",
    )
    val = report(tmp_path / "val.json")
    assert not val["reference"]["cached"] and val["reference"]["key"] != one["reference"]["key"]

    card = (pipe / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ") and "px-" in line]
    assert len(rows) == 2  # the repeated protocol replaced its row; the other part added one
    assert f"{one['metrics']['fid']:.2f}" in card and val["reference"]["key"] in card


def test_class_conditional_labels_and_class_averaged_fid(
    tmp_path, fake_inception_file, save_pipeline
):
    pipe = save_pipeline(tmp_path / "pipe", num_classes=2)
    eval_fid(
        "--pipeline",
        pipe,
        "--inception-weights",
        fake_inception_file,
        "--steps",
        2,
        "--num-samples",
        4,
        "--class-labels",
        "0,1",
        "--per-class",
        "--guidance-scale",
        2,
        "--reference-images",
        30,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "r.json",
        "--save-samples",
        tmp_path / "s",
    )
    r = report(tmp_path / "r.json")
    assert r["sampling"]["class_labels"] == [0, 1] and r["sampling"]["guidance_scale"] == 2.0
    assert set(r["metrics"]["per_class_fid"]) == {"0", "1"}
    assert r["metrics"]["class_averaged_fid"] == pytest.approx(
        sum(r["metrics"]["per_class_fid"].values()) / 2
    )
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png"))[:2] == [
        "000000_class0.png",
        "000001_class1.png",
    ]


def test_missing_weights_stop_before_sampling(tmp_path, save_pipeline):
    pipe = save_pipeline(tmp_path / "pipe")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    done = eval_fid(
        "--pipeline", pipe, "--num-samples", 4, "--save-samples", tmp_path / "s", ok=False, env=env
    )
    assert done.returncode == 3
    assert "weights-inception-2015-12-05-6726825d.pth" in done.stderr
    assert "--inception-weights" in done.stderr
    assert "--no-fid" not in done.stderr  # an option of eval_tokenizer.py, not of this script
    assert not (tmp_path / "s").exists()


def test_bad_options_are_named(tmp_path, fake_inception_file, save_pipeline):
    pipe = save_pipeline(tmp_path / "pipe")
    done = eval_fid("--pipeline", pipe, "--num-samples", 1, ok=False)
    assert done.returncode == 1 and "eval.num_samples" in done.stderr
    done = eval_fid("--pipeline", pipe, "--per-class", ok=False)
    assert "unconditional" in done.stderr
    done = eval_fid("--pipeline", tmp_path, ok=False)
    assert "not a saved pipeline folder" in done.stderr


def test_model_card_keeps_one_row_per_protocol(tmp_path):
    def fake(fid, steps):
        return {
            "metrics": {"fid": fid},
            "date": "today",
            "sampling": {"num_samples": 10, "steps": steps, "eta": 0.0, "guidance_scale": None},
            "reference": {"key": "digits-train-16px-abc", "images": 20},
        }

    (tmp_path / "README.md").write_text("# my pipeline\n\nkept text\n")
    record_evaluation(tmp_path, fake(12.5, 2))
    record_evaluation(tmp_path, fake(11.25, 2))
    record_evaluation(tmp_path, fake(9.75, 4))
    card = (tmp_path / "README.md").read_text()
    assert "kept text" in card and "12.50" not in card
    assert "11.25" in card and "9.75" in card


@pytest.mark.slow
@pytest.mark.parametrize("seer", [0, 1])
def test_one_decision_when_only_one_process_sees_the_cached_reference(
    tmp_path, seer, fake_inception_file
):
    from safetensors.torch import save_file

    from engine.data import DataConfig

    data = DataConfig(source="digits", resolution=16, validation_size=97)
    key = reference_key(reference_spec(data, "validation", 6, "test"))
    cached = tmp_path / "caches" / f"rank-{seer}" / f"{key}.safetensors"
    cached.parent.mkdir(parents=True)
    save_file(
        {"features": torch.zeros(6, 2048), "labels": torch.zeros(6, dtype=torch.long)}, str(cached)
    )
    (tmp_path / "reports").mkdir()
    launch_two_processes(
        ROOT / "tests" / "workers" / "one_sees_file_worker.py",
        str(fake_inception_file),
        str(tmp_path / "caches"),
        str(tmp_path / "reports"),
        timeout=300,
        port=29545 + seer,
    )
    ranks = [json.loads((tmp_path / "reports" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    if seer == 0:  # the main process reads its cache; the other one needs no features
        assert ranks == [{"cached": True, "features": 6}, {"cached": True, "features": 0}]
    else:  # the main process has no cache: both compute their shares and gather
        assert ranks == [{"cached": False, "features": 6}, {"cached": False, "features": 6}]


def test_reference_leaves_unreadable_images_out(tmp_path, fake_inception_file):
    from diffusion.evaluate import reference_features
    from tests.diffusion.test_latent_cache import bad_folder

    data = DataConfig(source=str(bad_folder(tmp_path / "images")), resolution=16, validation_size=1)
    part = build_dataset(data, "train")
    readable = [i for i in range(len(part)) if "unreadable" not in part.readable(i)]
    assert len(part) == 21 and len(readable) < 21  # some of the 4 bad files are in this part
    reference = reference_features(
        data,
        "train",
        load_inception(fake_inception_file),
        Accelerator(cpu=True),
        weights="fake",
        cache_dir=tmp_path / "cache",
    )
    assert len(reference.features) == len(readable)
    assert len(torch.unique(reference.features, dim=0)) == len(readable), "an image twice"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "diffusion").glob("*.yaml")), ids=lambda p: p.stem
)
def test_each_recipes_eval_section_is_its_fid_protocol(path):
    """eval_fid.py scores a pipeline with the ``eval`` section it was trained with (LDM's 250
    DDIM steps and guidance 1.5 for ImageNet, ...); its options override it."""
    from diffusion.fid_report import FIDOptions, _protocol
    from engine.config import parse_yaml
    from pipelines import ClassConditionalLatentDiffusionPipeline, LatentDiffusionPipeline

    recipe = parse_yaml(path.read_text())
    conditional = bool(recipe["unet"].get("num_classes"))
    kind = ClassConditionalLatentDiffusionPipeline if conditional else LatentDiffusionPipeline
    pipe = object.__new__(kind)  # what the protocol asks of a pipeline: its kind
    protocol, train = recipe.get("eval", {}), recipe["train"]
    config, steps, guidance = _protocol(FIDOptions(pipeline="p"), recipe, pipe)
    assert steps == (protocol.get("steps") or train.get("sample_steps", 50))
    assert config.eta == protocol.get("eta", 0.0)
    if conditional:
        assert guidance == protocol.get("guidance_scale", train.get("sample_guidance", 1.5))
    else:
        assert guidance is None
    if "num_samples" in protocol:
        assert config.num_samples == protocol["num_samples"]
    given = FIDOptions(pipeline="p", steps=4, eta=0.5, num_samples=8)
    config, steps, _ = _protocol(given, recipe, pipe)
    assert (steps, config.eta, config.num_samples) == (4, 0.5, 8)
