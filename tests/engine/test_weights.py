import pytest
import torch

from engine.weights import NO_DOWNLOAD, cached_weights

URL = "https://example.invalid/models/net-1234.pth"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path / "checkpoints" / "net-1234.pth"


def test_cached_file_is_used_without_download(hub, monkeypatch):
    hub.parent.mkdir()
    hub.write_bytes(b"weights")
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    assert cached_weights(URL, "X", "or else") == hub


def test_downloads_into_the_cache_when_allowed(hub, monkeypatch):
    monkeypatch.delenv(NO_DOWNLOAD)
    calls = []
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda url, dst, progress: calls.append(url) or open(dst, "wb").close(),
    )
    assert cached_weights(URL, "X", "or else") == hub and hub.is_file()
    assert calls == [URL]


def test_failed_or_disabled_download_says_which_file_to_put_where(hub, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"net-1234.pth.*{hub.parent}.*disabled.*or else"):
        cached_weights(URL, "X", "or else")
    monkeypatch.delenv(NO_DOWNLOAD)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded.*no network.*" + URL):
        cached_weights(URL, "X", "or else")
