import os

# No test may download weights: missing files must produce the "put this file there" error.
os.environ["NEVERCOLLAPSE_NO_DOWNLOAD"] = "1"
# Data manifests go to a folder of this test session (inherited by the scripts tests start).
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["NEVERCOLLAPSE_DATA_CACHE"] = tempfile.mkdtemp(prefix="nevercollapse-data-")


import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tests.launch import ROOT  # noqa: E402


def write_fake_inception(path):
    """A random Inception weights file (Kaiming-initialised, so FIDs are not ~0)."""
    from benchmarks.inception import write_random_inception

    return write_random_inception(Path(path))


@pytest.fixture(scope="session")
def fake_inception_file(tmp_path_factory):
    from engine.fid import INCEPTION_FILE

    return write_fake_inception(tmp_path_factory.mktemp("weights") / INCEPTION_FILE)


@pytest.fixture(scope="session")
def vgg_torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds LPIPS's VGG16 backbone file, with random weights
    (half precision: half the bytes; loading casts them), where torchvision looks for it."""
    from torchvision.models import VGG16_Weights, vgg16

    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in vgg16().state_dict().items()}, path)
    return home


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests run only where a CUDA device is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# the miniature tokenizer of the tests, the workers and the benchmarks (latents 4×8×8)
TINY_TOKENIZER = yaml.safe_load((ROOT / "configs/tokenizer/tiny.yaml").read_text())["model"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Makes a tiny random tokenizer (seed 0): ``TINY_TOKENIZER`` (configs/tokenizer/tiny.yaml's
    ``model``) with any argument overridden."""
    from tokenizer import VQTokenizer

    def make(**overrides):
        torch.manual_seed(0)
        return VQTokenizer(**{**TINY_TOKENIZER, **overrides})

    return make


@pytest.fixture(scope="session")
def save_pipeline(tiny_tokenizer):
    """Saves a tiny random pipeline (unconditional, or with ``num_classes``) into a folder."""
    from diffusers import UNet2DModel

    from pipelines import (
        ClassConditionalLatentDiffusionPipeline,
        LatentDiffusionPipeline,
        default_scheduler,
    )

    def save(path, num_classes=0):
        vqvae = tiny_tokenizer().eval()
        unet = UNet2DModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=num_classes + 1 if num_classes else None,
        )
        cls = ClassConditionalLatentDiffusionPipeline if num_classes else LatentDiffusionPipeline
        cls(vqvae=vqvae, unet=unet, scheduler=default_scheduler()).save_pretrained(path)
        return path

    return save


# how an error says what is allowed instead
ALLOWED = r"allowed|expected|must|choose|pick|accepts"


@pytest.fixture(scope="session")
def assert_config_refused():
    """Checks that a whole config (``cls``) made of ``base`` with ``change`` merged in fails
    everything a run checks before building, in one line matching ``message`` and saying what
    is allowed."""
    import json
    import re

    from engine.config import ConfigError, from_mapping
    from engine.data import check_source_exists

    def check(cls, base: dict, change: dict, message: str) -> None:
        config = json.loads(json.dumps(base))
        for section, values in change.items():
            config.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError, match=message) as error:
            check_source_exists(from_mapping(cls, config).data)
        text = str(error.value)
        assert "\n" not in text and re.search(ALLOWED, text), text

    return check
