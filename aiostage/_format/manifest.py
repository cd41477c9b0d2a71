"""The manifest and the names of things on disk: ``manifest.json``, data files, steps.

``manifest.json`` is written last: its presence is what makes a directory a checkpoint. It lists
every data file with its exact size and the xxh3_64 of its header, and the caller's metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointCorrupt, UnsupportedValueError
from .checks import Json, json_int, json_list, json_object
from .structure import check_depth, json_copy

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "STEP_NAME",
    "FileInfo",
    "Manifest",
    "check_metadata",
    "decode_manifest",
    "encode_manifest",
    "rank_file",
    "step_name",
]

#: the version of the format, in the manifest and in every header
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the checkpoint names a ``Checkpointer`` gives its steps: ``step_`` and at least nine digits
STEP_NAME = re.compile(r"^step_(?P<step>\d{9,})$")
#: what may precede a data file's name: nothing, or (object stores) the prefix of the save that
#: wrote it, its token: ``0123...cdef/rank_00000.safetensors``
_SAVE_PREFIX = re.compile(r"(?:[0-9a-f]{32}/)?")


def step_name(step: int) -> str:
    """The checkpoint name of ``step`` (``step_000000100``): names sort in step order."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    """The data file name of ``rank`` inside a checkpoint directory."""
    return f"rank_{rank:05d}.safetensors"


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A data file as the manifest records it: name, exact size, xxh3_64 of its header."""

    name: str
    size: int
    header_xxh3: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """``manifest.json``: written last, its presence is what makes a directory a checkpoint."""

    world_size: int
    files: tuple[FileInfo, ...]
    metadata: dict[str, Any]


def check_metadata(metadata: Any) -> dict[str, Any]:
    """User metadata as stored (JSON: tuples become lists); ``UnsupportedValueError`` naming the
    key path otherwise (``json_copy``: no code of the caller's objects runs, depth bounded)."""
    if metadata is None:
        return {}
    if not issubclass(type(metadata), dict):
        raise UnsupportedValueError(
            f"metadata must be a JSON object (a dict), not a {type(metadata).__qualname__}",
            key="metadata",
        )
    out: dict[str, Any] = json.loads(json.dumps(json_copy(metadata, "metadata")))
    return out


def encode_manifest(m: Manifest) -> bytes:
    """``manifest.json`` as bytes."""
    files = [
        {"name": f.name, "size": f.size, "header_xxh3": f"{f.header_xxh3:016x}"} for f in m.files
    ]
    doc = {"format": "aiostage", "version": FORMAT_VERSION, "world_size": m.world_size}
    return json.dumps({**doc, "files": files, "metadata": m.metadata}, indent=1).encode() + b"\n"


def decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate ``manifest.json``; raises ``CheckpointCorrupt`` naming ``where``."""
    try:
        doc = json_object(json.loads(raw), "manifest")
        if doc.get("format") != "aiostage" or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an aiostage v{FORMAT_VERSION} manifest")
        world = json_int(doc["world_size"], 1, 1 << 24, "world_size")
        files = tuple(_decode_file(f, r) for r, f in enumerate(json_list(doc["files"], "files")))
        if len(files) != world:
            raise ValueError(f"{len(files)} files listed for world size {world}")
        meta = check_depth(json_object(doc["metadata"], "metadata"), "metadata")
        return Manifest(world, files, meta)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: bad manifest: {exc}", path=where) from exc


def _decode_file(f: Json, rank: int) -> FileInfo:
    f = json_object(f, "file")
    name, want = f.get("name"), rank_file(rank)
    if not (
        isinstance(name, str) and name.endswith(want) and _SAVE_PREFIX.fullmatch(name[: -len(want)])
    ):
        raise ValueError(f"file {rank} must be named {want} (or TOKEN/{want})")
    digest = f["header_xxh3"]
    if not isinstance(digest, str) or len(digest) != 16:
        raise ValueError(f"bad header_xxh3 {digest!r:.40}")
    return FileInfo(f["name"], json_int(f["size"], 0, 1 << 62, "size"), int(digest, 16))
