"""No load of a model, checkpoint, cache or pipeline may unpickle arbitrary objects: the
package's code is scanned with ``ast`` for the calls that can."""

import ast

import pytest

from tests.launch import ROOT

SCANNED = ("engine", "tokenizer", "diffusion", "pipelines", "scripts")


def _is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unsafe_loads(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every call that may unpickle untrusted data."""
    tree = ast.parse(source, filename)
    # names bound by ``from torch import load`` / ``from pickle import loads as x`` etc.
    imported = {
        alias.asname or alias.name: f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            dotted = f"{f.value.id}.{f.attr}"
        elif isinstance(f, ast.Attribute):
            dotted = f"?.{f.attr}"
        elif isinstance(f, ast.Name):
            dotted = imported.get(f.id, f.id)
        else:
            continue
        module, _, attr = dotted.rpartition(".")
        problem = None
        if module == "torch" and attr == "load" and not _is_true(node, "weights_only"):
            problem = "torch.load without weights_only=True"
        elif module in ("pickle", "cPickle", "dill", "joblib") and attr in ("load", "loads"):
            problem = f"{dotted} unpickles arbitrary objects"
        elif module in ("np", "numpy") and attr == "load" and _is_true(node, "allow_pickle"):
            problem = "numpy load with allow_pickle=True"
        elif attr == "register_for_checkpointing":
            problem = (
                "accelerate loads registered objects with weights_only=False; save them "
                "with save_checkpoint(states=...) instead"
            )
        if problem:
            found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def test_no_unsafe_load_in_the_package():
    files = sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 20, "the scan found the package"
    found = [
        hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, weights_only=False)",
        "from torch import load\nstate = load(path)",
        "import pickle\nobj = pickle.loads(data)",
        "from pickle import load as read\nobj = read(f)",
        "import numpy as np\na = np.load(path, allow_pickle=True)",
        "accelerator.register_for_checkpointing(ema)",
    ],
)
def test_the_scan_catches_unsafe_loads(code):
    found = unsafe_loads(code, "planted.py")
    assert len(found) == 1 and found[0].startswith("planted.py:"), found


def test_the_scan_accepts_safe_loads():
    code = (
        "import torch, numpy as np\nfrom safetensors.torch import load_file\n"
        "a = torch.load(p, map_location='cpu', weights_only=True)\nb = np.load(p)\n"
        "c = load_file(p)\nd = json.loads(text)"
    )
    assert unsafe_loads(code, "ok.py") == []
