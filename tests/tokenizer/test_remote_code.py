"""The tokenizer's folder carries its code (tokenizer/remote_code.py): the one-file source and
its checks, AutoModel loading it without this package, and the codebook kept float32 by
``.to(dtype)`` / ``.half()`` / ``.bfloat16()``."""

import importlib.util
import json
import logging
import sys

import pytest
import torch

from tests.isolated import run_without_project
from tokenizer import VQTokenizer
from tokenizer.remote_code import single_file_source

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_one_file_holds_the_model_and_the_quantizers(tmp_path, tiny_tokenizer):
    path = tmp_path / "model.py"
    path.write_text(single_file_source("tokenizer/model.py"))
    module = load_module(path, "one_file_tokenizer")
    model = tiny_tokenizer(quantizer="looc", quantizer_options={"num_codes": 16, "code_dim": 2})
    copy = module.VQTokenizer(**model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(X).sample, model.eval()(X).sample)
    assert type(copy.vector_quantizer).__module__ == "one_file_tokenizer"
    # a file without relative imports comes back as it is (a loaded copy saves the same file)
    assert single_file_source(path) == path.read_text()


def write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)


def test_what_one_file_cannot_hold_is_refused(tmp_path):
    package = tmp_path / "pkg"
    write(package, __init__="", b="def f():\n    return 1\n", c="def f():\n    return 2\n")
    write(package, a="from .b import f\n\nVALUE = f()\n")
    text = single_file_source(package / "a.py")
    assert "from ." not in text and "VALUE = f()" in text
    assert "# -------------------- pkg/b.py" in text
    cases = {
        "clash": ("from .b import f\nfrom .c import f as g\n", "import x as y"),
        "same_name": ("from .b import f\nfrom .c import *\n", "import \\*"),
        "module": ("from . import b\n", "imports module objects"),
        "nested": ("def g():\n    from .b import f\n", "top level"),
        "missing": ("from .b import nothing\n", "nothing inlined defines nothing"),
        "absent": ("from .zz import f\n", "no module 'zz'"),
    }
    for name, (text, message) in cases.items():
        write(package, **{name: text})
        with pytest.raises(ValueError, match=message):
            single_file_source(package / f"{name}.py")
    write(package, d="from .b import f\nfrom .e import h\n", e="def f():\n    return 3\nh = 1\n")
    with pytest.raises(ValueError, match="both define 'f'"):
        single_file_source(package / "d.py")


def test_automodel_loads_a_saved_tokenizer_without_this_package(tmp_path, tiny_tokenizer):
    model = tiny_tokenizer().eval()
    model.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "model.py").is_file()
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "model.VQTokenizer"}
    with torch.no_grad():
        expected = model(X).sample
    torch.save({"x": X, "expected": expected}, tmp_path / "io.pt")
    output = run_without_project(
        f"FOLDER, IO = {str(tmp_path / 'tok')!r}, {str(tmp_path / 'io.pt')!r}\n"
        """
import torch
from diffusers import AutoModel

io = torch.load(IO, weights_only=True)
model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
with torch.no_grad():
    assert torch.equal(model(io["x"]).sample, io["expected"])
print("loaded", type(model).__module__, type(model).__name__)
""",
        tmp_path,
    )
    assert "loaded diffusers_modules.local.model VQTokenizer" in output
    assert "not expected and will be ignored" not in output  # auto_map is no init argument


def test_installed_class_reads_the_folder_without_complaint(tmp_path, tiny_tokenizer, caplog):
    tiny_tokenizer().save_pretrained(tmp_path)
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)
    try:
        loaded = VQTokenizer.from_pretrained(tmp_path)
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    assert type(loaded) is VQTokenizer
    assert not [r for r in caplog.records if "auto_map" in r.getMessage()]


@pytest.mark.parametrize(
    "cast, dtype",
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(torch.float16), torch.float16),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(dtype=torch.float16), torch.float16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.type(torch.bfloat16), torch.bfloat16),
    ],
)
def test_casts_keep_the_quantizer_float32(tiny_tokenizer, cast, dtype):
    model = tiny_tokenizer().eval()
    before = {k: v.clone() for k, v in model.vector_quantizer.state_dict().items()}
    assert cast(model) is model
    assert model.dtype == dtype and model.decoder.conv_out.weight.dtype == dtype
    after = model.vector_quantizer.state_dict()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert model.vector_quantizer.codebook.dtype == torch.float32
    if dtype == torch.bfloat16:  # runs on the CPU: decoding latents of either dtype
        with torch.no_grad():
            h = model.encode(X.to(dtype)).latents
            for latents in (h, h.float()):
                for force in (False, True):
                    image = model.decode(latents, force_not_quantize=force).sample
                    assert image.dtype == dtype and torch.isfinite(image).all()
            q = model.quantize(h)
            assert torch.equal(model.decode_indices(q.indices), model.decode(h).sample)
    model.float()
    assert model.dtype == torch.float32 and model.vector_quantizer.codebook.dtype == torch.float32


def test_device_moves_still_apply_to_the_quantizer(tiny_tokenizer):
    model = tiny_tokenizer().to("meta", torch.bfloat16)
    codebook = model.vector_quantizer.codebook
    assert codebook.device.type == "meta" and codebook.dtype == torch.float32
    assert model.decoder.conv_out.weight.device.type == "meta"
    assert model.vector_quantizer.usage.device.type == "meta"
