"""The forger's edits: records, entries, header metadata, skeleton, JSON text, data, manifest,
and special files, each labelled with what it changed (``record:shape``, ``fs:fifo``...)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import _odd
from _odd import CODE_NAMES, ODD_VALUES, WRONG_TYPES, odd_int
from _seal import DEEP, MANIFEST, Ckpt, data_files, frame, parse, seal_entries, seal_manifest

Json = Any

# ---------------------------------------------------------------- records


def _coherent(r: dict[str, Json], rng: random.Random) -> str:
    """A view that looks well-formed but reaches too far, overflows int64 or repeats an element
    2**40 times (stride 0)."""
    shape, stride, offset = rng.choice(
        (
            ([2**40], [0], 0),
            ([2**32, 2**32], [0, 0], 0),
            ([2**62, 2**62, 0], [1, 1, 1], 0),
            ([2, 2**62], [2**62, 1], 0),
            ([3], [2**62], 0),
            ([2], [1], 2**62),
            ([1], [1], 2**63 - 1),
            ([100], [1], 0),
            ([2, 2], [2**63 - 1, 1], 0),
        )
    )
    r.update(shape=shape, stride=stride, offset=offset)
    return "view"


def record(top: dict[str, Json], meta: dict[str, Json], rng: random.Random) -> str:
    """Rewrite one field of one tensor record with a hostile value."""
    recs = meta.get("tensors")
    if not isinstance(recs, list) or not recs:
        meta["tensors"] = [{"entry": 0, "offset": 0, "shape": [], "stride": [], "dtype": "qint8"}]
        return "added"
    i = rng.randrange(len(recs))
    r = recs[i]
    if not isinstance(r, dict):
        recs[i] = {}
        return "emptied"
    what = rng.choice(
        ("entry", "offset", "shape", "stride", "dtype", "dtype", "wrap", "grad", "attrs",
         "attrs", "dtensor", "dtensor", "view", "view", "drop", "extra", "whole", "dup")
    )  # fmt: skip
    if what in ("entry", "offset"):
        r[what] = odd_int(rng)
    elif what in ("shape", "stride"):
        r[what] = _odd.odd_dims(rng, r[what] if isinstance(r.get(what), list) else [])
    elif what == "dtype":
        r[what] = rng.choice((*_odd.ODD_DTYPES, *_odd.PLAIN_DTYPES))
    elif what == "wrap":
        r[what] = rng.choice(("parameter", "dtensor", "buffer", None, 1, *CODE_NAMES[:7]))
    elif what == "grad":
        r[what] = rng.choice((True, 1, "true", None, [True]))
    elif what == "attrs":
        r[what] = _odd.odd_attrs(rng)
    elif what == "dtensor":
        shape: list[Json] = r["shape"] if isinstance(r.get("shape"), list) else []
        r["wrap"] = "dtensor" if rng.random() < 0.8 else r.get("wrap", "tensor")
        plain = rng.random() < 0.25
        r[what] = _odd.dtensor_record(shape) if plain else _odd.odd_dtensor(rng, shape)
    elif what == "view":
        _coherent(r, rng)
    elif what == "drop" and r:
        del r[rng.choice(sorted(r))]
    elif what == "extra":
        r[rng.choice(("__class__", "module", "reduce", "pickle", "tensor"))] = rng.choice(
            CODE_NAMES
        )
    elif what == "whole":
        recs[i] = rng.choice(WRONG_TYPES)
    elif what == "dup":
        recs.append(r)
    return what


# ---------------------------------------------------------------- entries and metadata


_ENTRY_NAMES = (
    "__metadata__",
    "",
    "../outside/secret",
    "__aiostage__/span/0",
    "a" * 5000,
    "\u0000",
    "\ud800",
)


def entry(top: dict[str, Json], meta: dict[str, Json], rng: random.Random) -> str:
    """Rewrite one safetensors entry (dtype, shape, offsets, name) or the entry and checksum
    lists."""
    names = [n for n in meta.get("entries", []) if isinstance(n, str) and n in top]
    what = rng.choice(("dtype", "shape", "offsets", "offsets", "rename", "drop", "list", "xxh3"))
    if not names or what == "list":
        meta["entries"] = rng.choice(
            ([*names, *names], [*names, "ghost"], [1], None, "x", [*names[::-1]], [])
        )
        return "list"
    name = rng.choice(names)
    info = top[name]
    if what == "dtype":
        info["dtype"] = rng.choice(_odd.ODD_ST_DTYPES)
    elif what == "shape":
        info["shape"] = _odd.odd_dims(rng, info.get("shape", []))
    elif what == "offsets":
        begin, end = info.get("data_offsets", [0, 0])
        info["data_offsets"] = rng.choice(
            ([end, begin], [begin, odd_int(rng)], [odd_int(rng), end], [begin], [0, 0, 0],
             [begin + 1, end + 1], odd_int(rng))
        )  # fmt: skip
    elif what == "rename":
        new = rng.choice(_ENTRY_NAMES)
        top[new] = top.pop(name)
        meta["entries"] = [new if n == name else n for n in meta["entries"]]
    elif what == "drop":
        del top[name]
    else:
        meta["xxh3"] = rng.choice(
            ([], ["g" * 16], ["0" * 17], [0], None, ["E" * 16], "0" * 16, ["-" + "0" * 15])
        )
    return what


def header_meta(top: dict[str, Json], meta: dict[str, Json], rng: random.Random) -> str:
    """Rewrite or drop a top-level field of the aiostage metadata or of ``__metadata__``."""
    key = rng.choice(("version", "rank", "world_size", "entries", "tensors", "tree", "format"))
    if key == "format":
        top["__metadata__"]["format"] = rng.choice(("np", None, 1))
        top[rng.choice(("junk", "__metadata__x"))] = {"dtype": "U8", "shape": [0]}
        return key
    if rng.random() < 0.3:
        meta.pop(key, None)
        return f"{key}:drop"
    meta[key] = rng.choice((odd_int(rng), 2, True, 1.0, "1", *WRONG_TYPES[-4:]))
    return key


# ---------------------------------------------------------------- the skeleton


def _slots(tree: Json) -> list[tuple[Json, Json]]:
    """(container, index or key) of every node of ``tree``, at most 2000, without recursion."""
    slots: list[tuple[Json, Json]] = []
    stack: list[Json] = [tree]
    while stack and len(slots) < 2000:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        for kind in ("dict", "odict", "list", "tuple", "namedtuple", "dataclass"):
            kids = node.get(kind)
            if not isinstance(kids, list):
                continue
            for i, kid in enumerate(kids):
                if kind in ("dict", "odict") and isinstance(kid, list) and len(kid) == 2:
                    slots.append((kid, 1))
                    stack.append(kid[1])
                elif kind not in ("dict", "odict"):
                    slots.append((kids, i))
                    stack.append(kid)
    return slots


_FIELDS: tuple[list[Json], ...] = (
    ["__class__", "x"],
    ["x", "x"],
    ["def", "y"],
    ["1x", "y"],
    [1, 2],
    ["_x", "y"],
    [],
)


def odd_node(rng: random.Random, n_tensors: int) -> Json:
    """A skeleton node that must be refused or decoded as plain data."""
    name = rng.choice((*CODE_NAMES, "Point", "", 5, "a b", "class", "tuple", "type"))
    return rng.choice(
        (
            {"tensor": odd_int(rng)},
            {"tensor": rng.randrange(max(n_tensors, 1))},
            {"value": rng.choice(ODD_VALUES)},
            {"namedtuple": [{"value": 1}, {"value": 2}], "name": name, "fields": ["x", "y"]},
            {
                "namedtuple": [{"value": 1}, {"value": 2}],
                "name": "P",
                "fields": rng.choice(_FIELDS),
            },
            {"dataclass": [[["s", "x"], {"value": 1}]], "name": name, "fields": ["x"]},
            {"set": []},
            {"dict": "x"},
            {},
            {"dict": [], "list": []},
            {"dict": [[rng.choice((["f", 1.5], ["i", 2**64], ["s", 5], [], None)), {"value": 1}]]},
            {"list": [{"value": 1}] * 100_000},
            {"odict": [[["i", -1], {"tensor": 0}]]},
            {"tuple": None},
            DEEP,
        )
    )


def skeleton(top: dict[str, Json], meta: dict[str, Json], rng: random.Random) -> str:
    """Replace one node of the skeleton (or the whole tree) with an odd node."""
    n = len(meta["tensors"]) if isinstance(meta.get("tensors"), list) else 0
    slots = _slots(meta.get("tree"))
    node = odd_node(rng, n)
    if not slots or rng.random() < 0.1:
        meta["tree"] = node
        return "root"
    parent, at = rng.choice(slots)
    child = parent[at]
    if isinstance(child, dict) and "namedtuple" in child and rng.random() < 0.6:
        new = node.get("name") if isinstance(node, dict) and "name" in node else None
        child[rng.choice(("name", "fields"))] = new or rng.choice(_FIELDS)
        return "namedtuple"
    parent[at] = node
    return "node"


# ---------------------------------------------------------------- JSON text


_LITERALS = ("1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, "-0", "1.0", "1E2", "true")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    """A textual edit of JSON: a number becomes a hostile literal, a character goes or
    doubles, a key is repeated, or an odd escape goes into a string."""
    how = rng.choice(("number", "number", "number", "drop", "double", "dupkey", "escape"))
    if how == "number":
        found = list(_NUMBER.finditer(text))
        if found:
            m = rng.choice(found)
            return text[: m.start()] + rng.choice(_LITERALS) + text[m.end() :], how
    at = rng.randrange(max(len(text), 1))
    if how == "drop":
        return text[:at] + text[at + 1 :], how
    if how == "double":
        return text[:at] + text[at : at + 1] * 2 + text[at:], how
    if how == "dupkey" and text.startswith("{"):
        key = rng.choice(('"tensors":[],', '"tree":null,', '"world_size":2,', '"files":[],'))
        return "{" + key + text[1:], how
    quote = text.find('"', at)
    escape = rng.choice(("\\ud800", "\\u0000", "\\udfff\\ud800", "\\\\..\\\\"))
    return (text[: quote + 1] + escape + text[quote + 1 :], "escape") if quote >= 0 else (text, how)


def json_text(ck: Ckpt, rng: random.Random) -> str:
    """Edit the text of one header's aiostage JSON or of the manifest, then reseal."""
    if rng.random() < 0.4:
        text, how = mutate_text(ck.files[MANIFEST].decode("utf-8", "replace"), rng)
        ck.files[MANIFEST] = text.encode("utf-8", "surrogatepass")
        return f"manifest:{how}"
    name = rng.choice(data_files(ck))
    parsed = parse(ck.files[name])
    if parsed is None:
        return "header:unparsed"
    top, meta, data = parsed
    seal_entries(top, meta, data)
    text, how = mutate_text(json.dumps(meta, separators=(",", ":")), rng)
    ck.files[name] = frame(top, None, data, text)
    seal_manifest(ck)
    return f"header:{how}"


def data(ck: Ckpt, rng: random.Random) -> str:
    """Change data bytes and reseal every checksum: a well-formed checkpoint holding odd
    values (NaN payloads, bool bytes other than 0 and 1) that must load or be refused."""
    name = rng.choice(data_files(ck))
    parsed = parse(ck.files[name])
    if parsed is None or not parsed[2]:
        return "unparsed"
    top, meta, raw = parsed
    body = bytearray(raw)
    for _ in range(rng.randrange(1, 16)):
        body[rng.randrange(len(body))] = rng.choice((0x02, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    seal_entries(top, meta, bytes(body))
    ck.files[name] = frame(top, meta, bytes(body))
    seal_manifest(ck)
    return "bytes"
