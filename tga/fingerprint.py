"""Fingerprints of the library code a pipeline step runs.

Snakemake reruns a job when its inputs, params or rule code change, but not when the
library code it imports changes. Each rule therefore takes the fingerprint of the
``tga`` modules it depends on as a param: editing the model or training code reruns
training and everything downstream, editing one figure module (``tga.figures_model``,
``tga.figures_compare``, ``tga.figures_evolution``) reruns only the rules drawing its
figures. A rule names the module its script imports; the fingerprint follows that
module's ``tga.*`` imports (flat modules, ``tga/<name>.py``), so a table module must
never import figure code.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _module_path(name: str) -> Path:
    return PACKAGE_DIR / (name.split(".", 1)[1].replace(".", "/") + ".py")


def _tga_imports(tree: ast.AST) -> set[str]:
    """Every ``tga.*`` module a module imports, lazily (inside functions) or not."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tga.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tga":
                found |= {f"tga.{a.name}" for a in node.names}
            elif node.module.startswith("tga."):
                found.add(node.module)
    return {m for m in found if _module_path(m).is_file()}


@lru_cache(maxsize=None)
def _parsed(name: str) -> tuple[str, frozenset[str]]:
    """(normalized code, direct tga imports). Comments and formatting do not count."""
    tree = ast.parse(_module_path(name).read_text(encoding="utf-8"))
    return ast.dump(tree, include_attributes=False), frozenset(_tga_imports(tree))


def module_closure(*modules: str) -> list[str]:
    """The given modules and every tga module they import, transitively, sorted."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not _module_path(name).is_file():
            raise ValueError(f"{name} is not a module of the tga package ({PACKAGE_DIR})")
        seen.add(name)
        todo.extend(_parsed(name)[1] - seen)
    return sorted(seen)


def code_fingerprint(*modules: str) -> str:
    """A short hash of the code of ``modules`` and everything in tga they import."""
    digest = hashlib.sha256()
    for name in module_closure(*modules):
        digest.update(name.encode())
        digest.update(_parsed(name)[0].encode())
    return digest.hexdigest()[:16]
