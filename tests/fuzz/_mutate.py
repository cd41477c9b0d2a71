"""Deterministic mutations of real checkpoints: one seed, one damaged (or forged) checkpoint.

A mutation either damages bytes as an unlucky user would (flip, truncate, extend, splice, the
header length) or forges as an attacker would (``_edits``: records, entries, the skeleton, the
manifest, JSON text, data, special files), resealing so the edit reaches the decoder.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import _edits
from _odd import CODE_NAMES, WRONG_TYPES, odd_int
from _seal import MANIFEST, Ckpt, data_files, forge, parse, seal_manifest

from aiostage._format.codec import DATA_ALIGN

Json = Any

# ---------------------------------------------------------------- byte-level damage


def _target(ck: Ckpt, rng: random.Random) -> tuple[str, str]:
    """A file to damage and which part: the manifest, a header or a data region."""
    name = MANIFEST if rng.random() < 0.3 else rng.choice(data_files(ck))
    if name == MANIFEST:
        return name, "manifest"
    return name, "header" if rng.random() < 0.7 else "data"


def _span(blob: bytes, part: str) -> tuple[int, int]:
    if part == "manifest" or len(blob) < 8:
        return 0, len(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    return (0, min(8 + n, len(blob))) if part == "header" else (min(8 + n, len(blob)), len(blob))


def flip(ck: Ckpt, rng: random.Random) -> str:
    """Flip a few bits (or set a few bytes) of one file, resealed one time in three."""
    name, part = _target(ck, rng)
    raw = bytearray(ck.files[name])
    lo, hi = _span(bytes(raw), part)
    if hi <= lo:
        return f"flip:{part}:empty"
    for _ in range(rng.choice((1, 1, 2, 8))):
        at = rng.randrange(lo, hi)
        raw[at] = raw[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.7 else rng.randrange(256)
    ck.files[name] = bytes(raw)
    sealed = part == "header" and rng.random() < 0.35
    if sealed:
        seal_manifest(ck)
    return f"flip:{part}" + (":sealed" if sealed else "")


def truncate(ck: Ckpt, rng: random.Random) -> str:
    """Cut one file at a boundary (0, 7, 8, the header's end and around) or anywhere."""
    name, part = _target(ck, rng)
    blob = ck.files[name]
    _lo, hi = _span(blob, "header") if part != "manifest" else (0, len(blob))
    at = rng.choice((0, 1, 7, 8, 9, hi - 1, hi, hi + 1, len(blob) - 1, rng.randrange(len(blob))))
    ck.files[name] = blob[: max(0, min(at, len(blob)))]
    sealed = part != "manifest" and rng.random() < 0.5
    if sealed:
        seal_manifest(ck)
    return f"truncate:{part}" + (":sealed" if sealed else "")


def extend(ck: Ckpt, rng: random.Random) -> str:
    """Append bytes to one file (zeros, noise, a copy of itself) or make it sparse and huge."""
    name, part = _target(ck, rng)
    blob = ck.files[name]
    how = rng.choice(("zeros", "noise", "self", "page", "sparse"))
    if how == "sparse":
        ck.special[name] = f"sparse:{rng.choice((1 << 27, 1 << 30, 1 << 40))}"
        return f"extend:{part}:sparse"
    tail = {
        "zeros": bytes(rng.randrange(1, 64)),
        "noise": rng.randbytes(rng.randrange(1, 64)),
        "self": blob,
        "page": bytes(DATA_ALIGN),
    }[how]
    ck.files[name] = blob + tail
    sealed = part != "manifest" and rng.random() < 0.5
    if sealed:
        seal_manifest(ck)
    return f"extend:{part}:{how}" + (":sealed" if sealed else "")


def splice(ck: Ckpt, rng: random.Random, bases: dict[str, dict[str, bytes]]) -> str:
    """Put part of another file (of this or another base) into one file: a header from another
    base before this data, another base's manifest, or a chunk overwritten or inserted."""
    other = bases[rng.choice(sorted(bases))]
    how = rng.choice(("header", "manifest", "chunk", "insert"))
    name = rng.choice(data_files(ck))
    donor = rng.choice(sorted(other))
    if how == "header":
        mine, theirs = parse(ck.files[name]), other.get(name) or other[sorted(other)[0]]
        (n,) = struct.unpack("<Q", theirs[:8])
        ck.files[name] = theirs[: 8 + n] + (mine[2] if mine else ck.files[name][8 + n :])
        seal_manifest(ck)
        return "splice:header"
    if how == "manifest":
        ck.files[MANIFEST] = other[MANIFEST]
        return "splice:manifest"
    target = rng.choice((name, MANIFEST))
    blob, chunk = ck.files[target], other[donor]
    at, size = rng.randrange(len(blob) + 1), rng.randrange(1, 256)
    piece = chunk[(start := rng.randrange(len(chunk))) : start + size]
    keep = at if how == "insert" else at + len(piece)
    ck.files[target] = blob[:at] + piece + blob[keep:]
    return f"splice:{how}"


def header_len(ck: Ckpt, rng: random.Random) -> str:
    """Rewrite the 8-byte header length of one data file with an extreme or near value."""
    name = rng.choice(data_files(ck))
    blob = ck.files[name]
    (n,) = struct.unpack("<Q", blob[:8])
    value = rng.choice(
        (0, 1, 2, n - 1, n + 1, n - DATA_ALIGN, n + DATA_ALIGN, len(blob) - 8, len(blob),
         100_000_000, 2**60, 2**63, 2**64 - 1, 4088, 4096 - 8 + 2**32)
    ) % 2**64  # fmt: skip
    ck.files[name] = struct.pack("<Q", value) + blob[8:]
    if rng.random() < 0.5:
        seal_manifest(ck)
    return "header_len"


# ---------------------------------------------------------------- the manifest


_NAMES = (
    "../outside/secret",
    "/etc/hostname",
    "rank_00000.safetensors/../rank_00000.safetensors",
    "./rank_00000.safetensors",
    "rank_0.safetensors",
    "rank_00001.safetensors",
    "manifest.json",
    "",
    ".",
    "..",
    "rank_00000.safetensors\u0000x",
    "a" * 5000,
    "_sentinel.Sentinel",
)


def _file_field(info: dict[str, Json], rng: random.Random) -> str:
    what = rng.choice(("name", "size", "header_xxh3", "drop", "extra"))
    if what == "name":
        info["name"] = rng.choice((*_NAMES, *WRONG_TYPES[:5]))
    elif what == "size":
        size: int = info["size"] if type(info.get("size")) is int else 0
        info["size"] = rng.choice((size - 1, size + 1, odd_int(rng)))
    elif what == "header_xxh3":
        info["header_xxh3"] = rng.choice(("", "g" * 16, "0" * 17, "E" * 16, "-" + "1" * 15, 0))
    elif what == "drop" and info:
        del info[rng.choice(sorted(info))]
    else:
        info["module"] = rng.choice(CODE_NAMES)
    return f"file:{what}"


def _files(m: dict[str, Json], rng: random.Random) -> str:
    files = m.get("files")
    if not isinstance(files, list) or not files or rng.random() < 0.3:
        fake = {"name": "rank_00001.safetensors", "size": 4096, "header_xxh3": "0" * 16}
        m["files"] = rng.choice(([], [1], None, "x", [fake], [*(files or []), fake], {"a": 1}))
        if isinstance(files, list) and files and rng.random() < 0.5:
            m["files"] = [*files, *files] if rng.random() < 0.5 else files[::-1]
        return "files"
    info = rng.choice(files)
    return _file_field(info, rng) if isinstance(info, dict) else "files:item"


def _metadata(rng: random.Random) -> Json:
    levels = rng.choice((99, 100, 101, 150))
    deep: Json = 1
    for _ in range(levels - 1):
        deep = {"a": deep}
    return rng.choice((deep, [1], "x", None, 2**64, {"a": "\u0000"}, {"x" * 10_000: 1}))


def manifest(ck: Ckpt, rng: random.Random) -> str:
    """Rewrite a field of ``manifest.json`` (format, version, world size, a file's name, size
    or header checksum, the metadata), drop one, or replace the whole of it."""
    try:
        m = json.loads(ck.files[MANIFEST])
    except ValueError:
        return "unparsed"
    if not isinstance(m, dict) or rng.random() < 0.05:
        ck.files[MANIFEST] = json.dumps(rng.choice(([], "x", None, 1, {}, [m]))).encode()
        return "whole"
    key = rng.choice(("format", "version", "world_size", "files", "files", "files", "metadata"))
    if key == "files":
        label = _files(m, rng)
    elif rng.random() < 0.2:
        m.pop(key, None)
        label = f"{key}:drop"
    else:
        label = key
        draws: dict[str, Callable[[], Json]] = {
            "format": lambda: rng.choice(("safetensors", "", None, 1, "AIOSTAGE")),
            "version": lambda: rng.choice((0, 2, True, 1.0, "1", odd_int(rng))),
            "world_size": lambda: rng.choice((0, 2, 3, True, odd_int(rng))),
            "metadata": lambda: _metadata(rng),
        }
        m[key] = draws[key]()
    ck.files[MANIFEST] = json.dumps(m, indent=1).encode()
    return label


# ---------------------------------------------------------------- special files


_SPECIAL = ("fifo", "dir", "absent", "link-secret", "link-loop", "link-dir", "link-inside")


def special(ck: Ckpt, rng: random.Random) -> str:
    """Replace the manifest or a data file by a FIFO, a directory, a symlink (to a private file
    outside, to itself, to a directory, to a copy inside) or nothing; or plant a symlink where
    export puts its temporary file."""
    if rng.random() < 0.15:
        ck.plant = "partial-link"
        return "fs:partial-link"
    name = rng.choice((MANIFEST, *data_files(ck)))
    kind = rng.choice(_SPECIAL)
    ck.special[name] = kind
    return f"fs:{kind}:{'manifest' if name == MANIFEST else 'data'}"


# ---------------------------------------------------------------- one mutation per seed


Bases = dict[str, dict[str, bytes]]
KINDS = (
    "flip",
    "truncate",
    "extend",
    "splice",
    "header_len",
    "record",
    "entry",
    "meta",
    "skeleton",
    "json_text",
    "data",
    "manifest",
    "fs",
)
#: how often each kind is drawn: the forged edits reach the most code
_WEIGHTS = (3, 2, 2, 2, 1, 8, 3, 2, 5, 3, 1, 4, 1)


def mutate(bases: Bases, seed: str) -> tuple[Ckpt, str, str]:
    """The checkpoint, mutation kind and label for ``seed``: the same seed, the same bytes."""
    rng = random.Random(seed)
    base = rng.choice(sorted(bases))
    ck = Ckpt(base, dict(bases[base]))
    kind = rng.choices(KINDS, _WEIGHTS)[0]
    label = _apply(ck, rng, kind, bases)
    if rng.random() < 0.1:  # now and then a second mutation on top of the first
        second = rng.choices(KINDS, _WEIGHTS)[0]
        try:
            label += "+" + _apply(ck, rng, second, bases)
        except (struct.error, ValueError, IndexError, KeyError, TypeError):
            label += f"+{second}(not applicable)"  # e.g. a header edit on a file cut to 3 bytes
    return ck, kind, label


def _apply(ck: Ckpt, rng: random.Random, kind: str, bases: Bases) -> str:
    if kind == "splice":
        return splice(ck, rng, bases)
    simple = {
        "flip": flip,
        "truncate": truncate,
        "extend": extend,
        "header_len": header_len,
        "json_text": _edits.json_text,
        "data": _edits.data,
        "manifest": manifest,
        "fs": special,
    }
    if kind in simple:
        return simple[kind](ck, rng)
    edit = {
        "record": _edits.record,
        "entry": _edits.entry,
        "meta": _edits.header_meta,
        "skeleton": _edits.skeleton,
    }[kind]
    return forge(ck, rng, edit, kind)
