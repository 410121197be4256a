"""A module and everything it imports relatively, as one Python file: how the tokenizer's code
travels with a saved model, for diffusers' remote-code loader (``trust_remote_code=True``).

One file, because that is all diffusers brings along. A pipeline component's code is
``<component>/<module>.py``; a Hub download of the pipeline fetches that one file of the folder
(``DiffusionPipeline.download`` allows ``<component>/<module>.py``, not the folder's other
``.py`` files), and the loader copies into its modules cache only the files a module imports
relatively itself, not what those import in turn (``get_cached_module_file`` runs
``check_imports`` on that one file). So the modules are concatenated, dependencies first, each
verbatim less its relative imports (whose names the earlier sections define) and its
``from __future__`` imports (moved to the top). Checked while concatenating: every relative
import names a module of the package and a name that some section defines, and no two sections
bind the same name differently. A file without relative imports comes back unchanged, so a model
loaded from such a file saves the same file again.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _target(path: Path, node: ast.ImportFrom) -> Path:
    """The file that ``from .x import y`` in ``path`` imports: ``x.py`` or ``x/__init__.py``."""
    if node.module is None:
        raise ValueError(
            f"{path}:{node.lineno}: 'from {'.' * node.level} import ...' imports module objects, "
            "which one file cannot hold; import names from the module instead"
        )
    base = path.parent
    for _ in range(node.level - 1):
        base = base.parent
    stem = base.joinpath(*node.module.split("."))
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"{path}:{node.lineno}: no module {node.module!r} to inline")


def _relative_imports(path: Path, tree: ast.Module) -> list[ast.ImportFrom]:
    """The module's relative imports, all at its top level, importing plain names."""
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and node not in top:
            raise ValueError(f"{path}:{node.lineno}: move this relative import to the top level")
    for node in top:
        if any(a.name == "*" or a.asname not in (None, a.name) for a in node.names):
            raise ValueError(
                f"{path}:{node.lineno}: 'import *' / 'import x as y' cannot be inlined"
            )
    return top


def _bindings(body: list[ast.stmt], names: dict[str, str]) -> dict[str, str]:
    """Names the statements bind at module level, except by relative imports: name → what binds
    it (the import itself for an import, so that two sections may import the same thing)."""
    for node in body:
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not node.level):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                module = getattr(node, "module", None)
                names[name] = f"import {module}:{alias.name}:{alias.asname}"
        elif isinstance(node, _DEFINITIONS):
            names[node.name] = f"definition {id(node)}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names[sub.id] = f"definition {id(node)}"
        else:  # if / try / with / for blocks at module level
            for field in ("body", "orelse", "finalbody", "handlers"):
                _bindings(getattr(node, field, []), names)
    return names


def single_file_source(path: str | os.PathLike) -> str:
    """The source of module ``path`` with its relative imports inlined (see the module
    docstring); ``path`` itself unchanged if it has none."""
    root = Path(path).resolve()
    order: list[tuple[Path, str, ast.Module]] = []
    visiting: set[Path] = set()

    def visit(file: Path) -> None:  # depth first: a module after the modules it imports
        if file in visiting:
            raise ValueError(f"{file}: circular relative imports cannot be inlined")
        if any(file == done for done, _, _ in order):
            return
        visiting.add(file)
        text = file.read_text(encoding="utf-8")
        tree = ast.parse(text, str(file))
        for node in _relative_imports(file, tree):
            visit(_target(file, node))
        visiting.discard(file)
        order.append((file, text, tree))

    visit(root)
    if len(order) == 1:
        return order[0][1]

    bound: dict[str, tuple[str, Path]] = {}
    for file, _, tree in order:
        for name, binding in _bindings(tree.body, {}).items():
            if name in bound and bound[name][0] != binding:
                raise ValueError(
                    f"{file} and {bound[name][1]} both define {name!r}; one file cannot hold both"
                )
            bound.setdefault(name, (binding, file))
    futures: list[str] = []
    sections = []
    base = Path(os.path.commonpath([str(f.parent) for f, _, _ in order])).parent
    for file, text, tree in order:
        lines = text.splitlines()
        for node in tree.body:
            future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
            if not (future or (isinstance(node, ast.ImportFrom) and node.level)):
                continue
            for alias in node.names:
                if future and alias.name not in futures:
                    futures.append(alias.name)
                if not future and alias.name not in bound:
                    raise ValueError(f"{file}:{node.lineno}: nothing inlined defines {alias.name}")
            for i in range(node.lineno - 1, node.end_lineno):
                lines[i] = None
        body = "\n".join(line for line in lines if line is not None).strip("\n")
        sections.append(f"# {'-' * 20} {file.relative_to(base).as_posix()}\n\n{body}\n")
    files = "".join(f"\n    {f.relative_to(base).as_posix()}" for f, _, _ in order)
    header = (
        f'"""{root.stem}.py and what it imports relatively, as one file for diffusers\'\n'
        "remote-code loader. Each section below is one of these files, verbatim less its\n"
        "relative imports (the sections above it define what they import) and its __future__\n"
        f'imports (here):{files}\n"""\n\n'
    )
    if futures:
        header += f"from __future__ import {', '.join(futures)}\n\n"
    return header + "\n\n".join(sections)
