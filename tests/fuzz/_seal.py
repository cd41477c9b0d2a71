"""A checkpoint in memory and the forger's tools: parse a header, frame it, reseal it.

Resealing fixes the header padding, the entries' checksums and the manifest's sizes and header
checksums after an edit, as an attacker would, so the edit reaches the decoder behind them.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from aiostage._format.codec import DATA_ALIGN

Json = Any
MANIFEST = "manifest.json"


@dataclass
class Ckpt:
    """A checkpoint in memory: its files' bytes and the special files that replace some."""

    base: str
    files: dict[str, bytes]
    #: name -> "fifo" | "dir" | "absent" | "link-secret" | "link-loop" | "link-dir" | "sparse:N"
    special: dict[str, str] = field(default_factory=dict)
    #: planted in the export output directory: "partial-link" (a symlink where a temporary goes)
    plant: str = ""


# ---------------------------------------------------------------- headers and sealing


def parse(blob: bytes) -> tuple[dict[str, Json], dict[str, Json], bytes] | None:
    """(top-level header JSON, aiostage metadata JSON, data) of a data file, or ``None``."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        top = json.loads(blob[8 : 8 + n])
        meta = json.loads(top["__metadata__"]["aiostage"])
    except (ValueError, KeyError, TypeError, struct.error, RecursionError):
        return None
    if not isinstance(top, dict) or not isinstance(meta, dict):
        return None
    return top, meta, blob[8 + n :]


def frame(top: dict[str, Json], meta: Json, data: bytes, meta_text: str | None = None) -> bytes:
    """A data file: length, header JSON (``meta`` as its aiostage string), spaces up to the
    next ``DATA_ALIGN`` boundary, then ``data``."""
    inner = meta_text if meta_text is not None else json.dumps(meta, separators=(",", ":"))
    top["__metadata__"] = {**top.get("__metadata__", {}), "aiostage": inner}
    body = json.dumps(top, separators=(",", ":")).encode()
    body = body.ljust(-(-(8 + len(body)) // DATA_ALIGN) * DATA_ALIGN - 8, b" ")
    return struct.pack("<Q", len(body)) + body + data


def seal_entries(top: dict[str, Json], meta: dict[str, Json], data: bytes) -> None:
    """Recompute each entry's xxh3 over ``data`` where the entry's offsets can be read."""
    names: list[Json] = meta["entries"] if isinstance(meta.get("entries"), list) else []
    meta["xxh3"] = [_entry_sum(top, name, data) for name in names]


def _entry_sum(top: dict[str, Json], name: Json, data: bytes) -> str:
    try:
        begin, end = top[name]["data_offsets"]
        return xxhash.xxh3_64_hexdigest(data[begin:end])
    except (KeyError, TypeError, ValueError):
        return "0" * 16


def seal_manifest(ck: Ckpt) -> None:
    """Fix the manifest's size and header checksum of every file it lists that exists."""
    try:
        m = json.loads(ck.files[MANIFEST])
        listed = [f for f in m["files"] if isinstance(f, dict)]
    except (KeyError, ValueError, TypeError, RecursionError):
        return
    for info in listed:
        name = info.get("name")
        blob = ck.files.get(name) if isinstance(name, str) else None
        if blob is None or len(blob) < 8:
            continue
        (n,) = struct.unpack("<Q", blob[:8])
        info["size"] = len(blob)
        info["header_xxh3"] = xxhash.xxh3_64_hexdigest(blob[: 8 + n])
    ck.files[MANIFEST] = json.dumps(m, indent=1).encode()


def data_files(ck: Ckpt) -> list[str]:
    """The names of the data files (sorted)."""
    return sorted(n for n in ck.files if n != MANIFEST)


# ---------------------------------------------------------------- forging


#: a skeleton node an edit wants replaced by a deeply nested one
DEEP = "@@DEEP@@"


def deep_text(levels: int) -> str:
    """A skeleton node ``levels`` one-key dicts deep, as JSON text (too deep to build)."""
    return '{"dict":[[["s","z"],' * levels + '{"value":1}' + "]]}" * levels


Edit = Callable[[dict[str, Json], dict[str, Json], random.Random], str]


def forge(ck: Ckpt, rng: random.Random, edit: Edit, kind: str) -> str:
    """Apply ``edit`` to one data file's header JSON (its checksums fixed first, so an edit of
    them stands), then reseal the manifest (nine times in ten)."""
    name = rng.choice(data_files(ck))
    parsed = parse(ck.files[name])
    if parsed is None:
        return f"{kind}:unparsed"
    top, meta, data = parsed
    seal_entries(top, meta, data)
    label = edit(top, meta, rng)
    text = json.dumps(meta, separators=(",", ":"))
    if DEEP in text:  # a node too deep to build as Python objects goes in as text
        text = text.replace(f'"{DEEP}"', deep_text(rng.choice((99, 100, 101, 5000, 200_000))))
    ck.files[name] = frame(top, None, data, text)
    if rng.random() < 0.9:
        seal_manifest(ck)
        return f"{kind}:{label}"
    return f"{kind}:{label}:unsealed"
