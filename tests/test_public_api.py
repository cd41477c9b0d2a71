"""The public surface: exports, module names, docstrings, and the layer rules of STYLE.md."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import aiostage
import aiostage.errors

PACKAGE = pathlib.Path(aiostage.__file__).parent

#: a module may import only modules of a lower layer
LAYERS: dict[str, float] = {
    "errors": 0,
    "_gc": 0,
    "_tree": 1,
    "_completion": 1,
    "_cuda": 1,
    "_buffers": 1.5,
    "_dist": 2,
    "_dtypes": 1,
    "_fs": 1,
    "_staging": 2,
    "_format": 2,
    "_skeleton": 2,
    "_boxes": 2.5,
    "_reshard": 2.75,
    "_layout": 3,
    "_writer": 3,
    "_reader": 3,
    "_transport": 3,
    "_frames": 3.5,
    "_save": 4,
    "_model": 4,
    "_replication": 4,
    "_handle": 4.5,
    "_saving": 4.75,
    "_checkpointer": 5,
    "_channel": 5,
    "_channel_install": 4.5,
    "_channel_report": 4.5,
    "_channel_shm": 4.75,
    "_channel_stage": 4.9,
    "_channel_sub": 5,
    "_channel_wire": 4.5,
    "_cli": 5.5,  # the CLI's work; __main__ (6) renders it
    "testing": 6,
    "__main__": 6,
    "__init__": 7,
}


def test_all_is_sorted_and_complete() -> None:
    # "@py_builtins", "@pytest_ar": pytest rewrites the asserts of every module of a distribution
    # that registers a pytest11 plugin (aiostage.testing._plugin), and adds these two names
    public = {n for n in dir(aiostage) if not n.startswith(("_", "@"))} | {"__version__"}
    public -= {"annotations", "testing"}  # a subpackage, imported on demand
    assert aiostage.__all__ == sorted(aiostage.__all__)
    assert set(aiostage.__all__) == public


@pytest.mark.parametrize("name", [n for n in aiostage.__all__ if n not in {"__version__"}])
def test_public_names_have_docstrings_and_clean_module(name: str) -> None:
    obj = getattr(aiostage, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if isinstance(obj, type):
        assert obj.__module__ == "aiostage"


def test_errors_share_one_root_and_live_in_errors() -> None:
    for name in aiostage.errors.__all__:
        cls = getattr(aiostage.errors, name)
        root = UserWarning if name == "AiostageWarning" else aiostage.errors.AiostageError
        assert issubclass(cls, root)
        assert cls.__module__ == "aiostage.errors"
        assert inspect.getdoc(cls)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_siblings(path: pathlib.Path) -> set[str]:
    """aiostage modules imported by ``path`` (relative or absolute imports)."""
    found: set[str] = set()
    depth = len(path.relative_to(PACKAGE).parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == depth and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == depth:
                found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("aiostage."):
                found.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("aiostage."))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_only_import_downward(path: pathlib.Path) -> None:
    me = _module_name(path)
    assert me in LAYERS, f"register {me} in LAYERS (STYLE.md layer rules)"
    for other in _imported_siblings(path) - {me}:
        assert other in LAYERS, f"{me} imports unknown module {other}"
        assert LAYERS[other] < LAYERS[me], f"{me} (layer {LAYERS[me]}) imports {other}"


@pytest.mark.parametrize(
    ("world", "owner"),
    [("torch.cuda", "_cuda.py"), ("aiofiles", None), ("torch.distributed", None)],
)
def test_one_module_touches_each_outside_world(world: str, owner: str | None) -> None:
    users = {
        p.name
        for p in SOURCES
        if f"import {world}" in p.read_text() or f"{world}." in p.read_text()
    }
    if world == "torch.distributed":  # DTensor / ShardedTensor types are read by _tree, not used
        users -= {"_tree.py", "_model.py"}  # _model: DCP's state-dict helpers, by design
    if owner is not None:
        assert users <= {owner}, users
    else:
        assert len(users) <= 2, users  # the writer and reader for files; _dist for process groups
