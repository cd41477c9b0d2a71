"""The public surface: exports, module names, docstrings, and the layer rules of STYLE.md."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import pytest

import aiostage
import aiostage.errors

PACKAGE = pathlib.Path(aiostage.__file__).parent

#: a module may import only from a lower layer; a folder is one unit (STYLE.md, docs/design.md)
LAYERS: dict[str, int] = {
    "errors": 0,
    "_core": 1,  # tree, storage identity, buffers, completion, and the doors to CUDA and dist
    "_format": 2,  # pure bytes in and out
    "_staging": 2,
    "_train_state": 2,  # the front doors take a TrainState wherever they take a state dict
    "_storage": 3,  # the storage seam, its local backend, writer, reader, save, reshard
    "_replication": 4,  # persists the replicas it receives through _storage
    "_async_save": 5,
    "_channel": 5,
    "_tiers": 5,  # the tiers the Checkpointer composes: local disk, memory, restore
    "_checkpointer": 6,
    "_cli": 6,
    "testing": 7,
    "__main__": 7,
    "__init__": 8,
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
    """The top-level aiostage units (modules or folders) that ``path`` imports."""
    package = ["aiostage", *path.relative_to(PACKAGE).parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = [*base, *(node.module.split(".") if node.module else [])]
            else:
                module = (node.module or "").split(".")
            if module[0] != "aiostage":
                continue
            if len(module) > 1:
                found.add(module[1])
            else:
                found.update(a.name for a in node.names)
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


#: what reaches each outside world, and the one module allowed to
WORLDS = {
    "CUDA": (r"torch\.cuda\b", "_core/cuda.py"),
    "torch.distributed": (r"torch\.distributed\b", "_core/dist.py"),
    "the file system": (
        r"\baiofiles\b|\bshutil\b|\bos\.(open|rename|replace|listdir|scandir|walk|fsync|stat|"
        r"unlink|remove|mkdir)\b|\.(iterdir|read_bytes|write_bytes|read_text|write_text)\(|"
        r"\banyio\.Path\b|\bopen\(",
        "_storage/localfs.py",
    ),
}
#: modules that name a world without using it: DTensor/ShardedTensor types (tree), DCP's
#: state-dict helpers (train state), the CLI's stdout redirect (__main__), shared-memory regions
#: (the channel's own transport), and the test kit (spawned worlds, fault injection)
NOT_USERS = {
    "torch.distributed": {
        "_core/tree.py",
        "_train_state.py",
        "testing/_world.py",
        "testing/_restart.py",
    },
    "the file system": {
        "__main__.py",
        "_channel/shm.py",
        "testing/_world.py",
        "testing/_faults.py",
    },
    "CUDA": set(),
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_one_module_touches_each_outside_world(world: str) -> None:
    pattern, owner = WORLDS[world]
    users = {
        str(p.relative_to(PACKAGE))
        for p in SOURCES
        if re.search(pattern, p.read_text().split('"""', 2)[-1])  # code, not the docstring
    }
    assert users - NOT_USERS[world] <= {owner}, f"{world} is reached from {users - {owner}}"
