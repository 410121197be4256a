import os

# No test may download weights: missing files must produce the "put this file there" error.
os.environ["NEVERCOLLAPSE_NO_DOWNLOAD"] = "1"
# Data manifests go to a folder of this test session (inherited by the scripts tests start).
import tempfile  # noqa: E402

os.environ["NEVERCOLLAPSE_DATA_CACHE"] = tempfile.mkdtemp(prefix="nevercollapse-data-")

from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def write_fake_inception(path):
    """torch-fidelity's Inception v3 with random weights, saved where a user's file would be.
    Kaiming-initialised: with PyTorch's default (small) initialisation every image gets nearly
    the same features and every FID comes out ~0, which would hide broken plumbing."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


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
