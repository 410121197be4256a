"""The tokenizer training script end to end on the CPU: tiny models, real code paths."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from engine.config import from_mapping
from tests.faults import Run, script
from tests.launch import ROOT
from tokenizer import VQTokenizer
from tokenizer.losses import VQGANLoss
from tokenizer.train import TokenizerConfig

TINY = {
    "model": {
        "resolution": 16,
        "ch": 16,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "z_channels": 8,
        "embed_dim": 8,
        "norm_groups": 4,
        "quantizer": "cvq",
        "quantizer_options": {"num_codes": 16},
    },
    "loss": {
        "perceptual_weight": 0.0,
        "disc_weight": 0.5,
        "disc_start": 4,
        "disc_layers": 1,
        "disc_channels": 8,
    },
    "data": {"source": "digits", "resolution": 16, "validation_size": 97},
    "train": {
        "max_steps": 6,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "log_every": 2,
        "image_every": 3,
        "validation_steps": 3,
        "validation_size": 16,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 3,
    },
}


def write_config(path: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            "--config",
            str(config),
            "--output-dir",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 6-step run with checkpoints at 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("run")
    config = write_config(tmp / "tiny.yaml")
    train(config, tmp / "run")
    return config, tmp / "run"


def test_run_exports_a_tokenizer_that_reloads_identically(trained):
    _, run = trained
    assert (run / "tokenizer" / "config.json").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert (run / "images" / "reconstructions_00000003.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*")), "TensorBoard logs"
    model = VQTokenizer.from_pretrained(run / "tokenizer").eval()
    again = VQTokenizer.from_pretrained(run / "tokenizer").eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(model(x).sample, again(x).sample)
    saved = load_file(run / "checkpoint-6" / "model.safetensors")
    assert torch.equal(saved["vector_quantizer.codebook"], model.vector_quantizer.codebook)


def tracked(run: Path) -> dict:
    """Scalars (tag → {step: value}), image tags and the hyperparameters, read back from the
    run's TensorBoard files (and the hparams.yml accelerate writes beside them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, set()
    for events in (run / "logs").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        images |= set(tags["images"])
    hparams = {}
    for file in (run / "logs").rglob("hparams.yml"):
        hparams.update(yaml.safe_load(file.read_text()))
    return {"scalars": scalars, "images": images, "hparams": hparams}


def test_the_tracker_gets_hyperparameters_losses_validation_and_images(trained):
    logged = tracked(trained[1])
    assert logged["hparams"]["train.learning_rate"] == 1e-3
    assert logged["hparams"]["model.quantizer"] == "cvq"
    assert set(logged["scalars"]["total"]) == {2, 4, 6} and "usage" in logged["scalars"]
    assert set(logged["scalars"]["validation/nll"]) == {3, 6}
    assert {"validation/psnr", "validation/usage"} <= logged["scalars"].keys()
    assert "reconstructions" in logged["images"]


def test_the_best_validation_export_is_kept_beside_the_last(trained):
    _, run = trained
    nll = tracked(run)["scalars"]["validation/nll"]
    best = load_file(run / "tokenizer-best" / "diffusion_pytorch_model.safetensors")
    last = load_file(run / "tokenizer" / "diffusion_pytorch_model.safetensors")
    same = all(torch.equal(best[k], last[k]) for k in last)
    assert same == (nll[6] < nll[3])  # the export of step 6 only if step 6 was better
    checkpoint = torch.load(run / "checkpoint-6" / "progress.pt", weights_only=True)
    assert checkpoint["best"] == pytest.approx(min(nll.values()), rel=1e-5)


def test_a_run_starts_from_an_exported_tokenizer(trained, tmp_path):
    config, run = trained
    tuned = tmp_path / "tuned"
    train(config, tuned, f"train.init_from={run}", "train.max_steps=1", "train.learning_rate=1e-9")
    start = load_file(run / "tokenizer" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "tokenizer" / "diffusion_pytorch_model.safetensors")
    weights = [k for k in start if "codebook" not in k and "usage" not in k and "anchor" not in k]
    for key in weights:  # one step at lr 1e-9 moves no weight visibly
        torch.testing.assert_close(after[key], start[key], atol=1e-6, rtol=0, msg=key)


def test_init_from_a_different_architecture_names_the_mismatch(trained, tiny_tokenizer):
    from engine.config import ConfigError
    from engine.weights import init_from

    with pytest.raises(ConfigError, match=r"init_from=.*tokenizer: .* is \(.*\) there but"):
        init_from(tiny_tokenizer(ch=8), trained[1], ("tokenizer",))


def test_resume_continues_at_the_saved_step_with_the_same_state(trained, tmp_path):
    config, run = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")
    # a checkpoint killed mid-write is never picked
    (resumed / "checkpoint-4.partial").mkdir()
    done = train(config, resumed, "--resume_from_checkpoint", "latest")
    assert "at step 2" in done.stdout + done.stderr
    a = load_file(run / "tokenizer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "tokenizer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_discriminator_untouched_before_disc_start(trained):
    config, run = trained
    recipe = from_mapping(TokenizerConfig, yaml.safe_load(config.read_text()))
    torch.manual_seed(recipe.train.seed)  # the construction order of train_tokenizer
    VQTokenizer(**recipe.model)
    initial = VQGANLoss(recipe.loss).discriminator.state_dict()
    at_start = load_file(run / "checkpoint-4" / "model_1.safetensors")
    after = load_file(run / "checkpoint-6" / "model_1.safetensors")
    assert at_start.keys() == initial.keys()
    for key in initial:  # parameters and BatchNorm buffers alike
        assert torch.equal(at_start[key], initial[key]), key
    assert any(not torch.equal(after[k], initial[k]) for k in initial), "D trains after start"


def test_eval_script_reports_metrics(trained, tmp_path):
    _, run = trained
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/eval_tokenizer.py",
            "--tokenizer",
            str(run / "tokenizer"),
            "--data",
            "digits",
            "--no-fid",
            "--no-lpips",
            "--max-images",
            "50",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 50
    assert 0 < report["usage"] <= 1 and 1 <= report["perplexity"] <= 16
    assert 0 < report["psnr"] < 60 and -1 <= report["ssim"] <= 1
    assert report["rfid"] is None and report["lpips"] is None
    assert "usage" in done.stdout


def test_eval_script_without_inception_weights_says_what_to_do(trained, tmp_path):
    _, run = trained
    done = subprocess.run(
        [
            sys.executable,
            "scripts/eval_tokenizer.py",
            "--tokenizer",
            str(run / "tokenizer"),
            "--data",
            "digits",
            "--no-lpips",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_HOME": str(tmp_path)},
    )
    assert done.returncode != 0
    assert "weights-inception-2015-12-05-6726825d.pth" in done.stderr
    assert "--inception-weights" in done.stderr and str(tmp_path) in done.stderr
    assert "--no-fid" in done.stderr


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(21):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    # odd but readable: transparency, 16-bit, grayscale
    Image.new("RGBA", (20, 20), (10, 200, 30, 128)).save(folder / "rgba.png")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(folder / "gray.png")
    # unreadable: zero bytes, not an image, truncated
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    whole = (folder / "1.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    # 24 readable images, 4 held out: the 5 steps of 4 read every one of them
    config = write_config(
        tmp_path / "c.yaml",
        data__source=str(folder),
        data__validation_size=4,
        train__max_steps=5,
        train__batch_size=4,
        train__image_every=100,
    )
    main = script(ROOT / "scripts" / "train_tokenizer.py")
    strict = Run(
        main,
        ["--config", str(config), "--output-dir", str(tmp_path / "strict"), "data.strict=true"],
        tmp_path / "strict.log",
    )
    assert strict.wait() == 1
    first = strict.output().strip().splitlines()[-1]
    assert first.startswith("error: unreadable image") and "empty.png" in first, first
    assert "strict: false" in first and "Traceback" not in strict.output()

    run = Run(
        main, ["--config", str(config), "--output-dir", str(tmp_path / "run")], tmp_path / "run.log"
    )
    assert run.wait() == 0, run.output()[-3000:]
    output = run.output()
    for name in ("empty.png", "notes.png", "truncated.png"):  # each named in a warning
        assert f"skipping unreadable image {folder / name}" in output
    assert "3 unreadable file(s)" in output  # RGBA, 16-bit and grayscale were all decoded
    assert (tmp_path / "run" / "tokenizer" / "config.json").is_file()


# two processes: tests/end_to_end/test_fault_tolerance.py (reference run, SIGTERM, SIGKILL, resume)


BAD = [
    ({"modle": {}}, "unknown section"),
    ({"model": {"chanels": 3}}, "model.chanels"),
    ({"model": {"ch": "wide"}}, "model.ch"),
    ({"model": {"quantizer": "rvq"}}, "rvq"),
    ({"model": {"quantizer_options": {"num_codes": 0}}}, "num_codes"),
    ({"model": {"quantizer_options": {"anchor": "nearest"}}}, "nearest"),
    ({"model": {"quantizer": "looc", "quantizer_options": {"code_dim": 3}}}, r"C=8.*d\*=3"),
    (
        {"model": {"quantizer": "looc", "quantizer_options": {"code_dim": 4, "interp_scale": 0}}},
        "interp_scale",
    ),
    ({"loss": {"disc_loss": "wasserstein"}}, "disc_loss"),
    ({"loss": {"perceptual_weight": -1.0}}, "perceptual_weight"),
    ({"data": {"resolution": 32}}, "data.resolution"),
    ({"data": {"crop": "middle"}}, "crop"),
    ({"data": {"channels": 1}}, "data.channels"),
    ({"loss": {"disc_in_channels": 1}}, "loss.disc_in_channels"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"batch_size": -4}}, "train.batch_size"),
    ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
    ({"train": {"lr": 1e-4}}, "train.lr"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps.*expected int"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate.*expected float"),
    ({"model": {"ch": -4}}, "model.ch = -4.*must be >= 1"),
    ({"model": {"z_channels": 0}}, "model.z_channels = 0.*must be >= 1"),
    ({"model": {"ch_mult": [1, 0]}}, "model.ch_mult.*one multiplier >= 1 per level"),
    (
        {"model": {"quantizer": "looc", "quantizer_options": {"num_codes": 0, "code_dim": 4}}},
        r"num_codes \(K\) must be an integer >= 1",
    ),
    ({"model": {"quantizer_options": {"distance": "manhattan"}}}, "distance must be one of"),
    ({"data": {"resolution": -16}}, "resolution = -16.*integer >= 1"),
    ({"data": {"source": "/no/such/images"}}, "data.source.*no such file or folder.*accepts"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_configs_fail_fast_naming_the_key(change, message, assert_config_refused):
    assert_config_refused(TokenizerConfig, TINY, change, message)


def test_disc_start_beyond_max_steps_warns():
    config = json.loads(json.dumps(TINY))
    config["loss"]["disc_start"] = 100
    with pytest.warns(UserWarning, match="disc_start"):
        from_mapping(TokenizerConfig, config)


def test_missing_vgg_weights_stop_before_training(tmp_path):
    config = write_config(tmp_path / "c.yaml", loss__perceptual_weight=1.0)
    done = subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            "--config",
            str(config),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")},
    )
    assert done.returncode != 0
    assert "vgg16-397923af.pth" in done.stderr and "perceptual_weight: 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_script_reports_config_errors_in_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    done = subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            "--config",
            str(config),
            "train.max_stpes=5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "config error: unknown key train.max_stpes" in done.stderr
    assert not (ROOT / "runs" / "c").exists()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "tokenizer").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_is_valid(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = from_mapping(TokenizerConfig, yaml.safe_load(path.read_text()))
    assert recipe.train.max_steps > recipe.train.log_every
