"""The hostile values the fuzzer plants: extreme integers, odd dtypes, names of importable code.

Plain tables of JSON values (and a few helpers choosing among them); ``_mutate`` puts them into
headers and manifests, ``_strategies`` draws from the same tables.
"""

from __future__ import annotations

import random
from typing import Any

Json = Any

#: integers at the edges of every width a reader might store them in
EXTREME_INTS: tuple[int, ...] = (
    0,
    1,
    -1,
    2,
    7,
    4095,
    4096,
    2**31 - 1,
    2**31,
    2**32,
    2**32 + 1,
    2**53 + 1,
    2**62,
    2**62 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**64 + 1,
    -(2**31),
    -(2**63),
    -(2**63) - 1,
    10**30,
)

#: JSON values of the wrong type wherever an integer, a string or a list is expected
WRONG_TYPES: tuple[Json, ...] = (
    None,
    True,
    False,
    1.5,
    -0.0,
    1e308,
    "1",
    "",
    [],
    [1],
    {},
    {"a": 1},
)

#: names of code a reader must never import or call: resolving any of them is a defect
CODE_NAMES: tuple[str, ...] = (
    "os.system",
    "posix.system",
    "builtins.eval",
    "builtins.exec",
    "subprocess.Popen",
    "torch.load",
    "_sentinel.Sentinel",
    "_tripwire.Trip",
    "_tripwire",
    "__main__.Sentinel",
    "collections.OrderedDict",
    "pathlib.Path",
    "__import__('os').system('true')",
)

#: dtype names: torch dtypes save cannot write, near misses, names of code, wrong spellings
ODD_DTYPES: tuple[Json, ...] = (
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "complex32",
    "chalf",
    "float3",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "uint1",
    "uint3",
    "int4",
    "float4_e2m1fn_x2",
    "float8_e8m0fnu",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "Float",
    "F32",
    "torch.float32",
    "float32 ",
    "FLOAT32",
    "__class__",
    "__dict__",
    "__builtins__",
    "layout",
    "strided",
    "memory_format",
    "",
    *CODE_NAMES[:4],
    *WRONG_TYPES,
)

#: dtypes save does write, to mix with records of another element size
PLAIN_DTYPES: tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "uint8",
    "int64",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "uint16",
)

#: safetensors dtype codes an entry may claim
ODD_ST_DTYPES: tuple[Json, ...] = (
    "F4",
    "F6_E2M3",
    "F8_E8M0",
    "E8M0",
    "I4",
    "C128",
    "u8",
    "U8 ",
    "BOOL",
    "F64",
    "U64",
    "C64",
    "F8_E5M2",
    *WRONG_TYPES[:6],
)

#: Python attribute names that a tensor's ``attrs`` must not be able to set or shadow
ATTR_NAMES: tuple[Json, ...] = (
    "__class__",
    "__dict__",
    "__setstate__",
    "__reduce_ex__",
    "data",
    "grad",
    "requires_grad",
    "_base",
    "shape",
    "dtype",
    "T",
    "_backward_hooks",
    "__torch_function__",
    "note",
    "",
    "a" * 5000,
)

#: structure values a decoder must refuse or hold as plain data
ODD_VALUES: tuple[Json, ...] = (
    {"float": "nanx"},
    {"float": None},
    {"bytes": "!!not base64!!"},
    {"bytes": 5},
    {"dtype": "qint8"},
    {"dtype": "os.system"},
    {"dtype": None},
    {"size": [2**70]},
    {"size": [-1]},
    {"size": [2**63, 2**63]},
    {"size": "x"},
    {"list": "x"},
    {"list": None},
    {"tuple": {"a": 1}},
    {"dict": [[["s", "a"]]]},
    {"dict": [[["f", 1.5], 1]]},
    {"dict": [[["i", "x"], 1]]},
    {"dict": [[["s", "a"], 1], [["s", "a"], 2]]},
    {"set": [1, 2]},
    {"namedtuple": [1], "name": "os.system", "fields": ["x"]},
    {"object": "os.system"},
    {"float": "inf", "extra": 1},
    {},
    [1, 2],
    2**64,
    -(2**63) - 1,
    "x" * 10_000,
)


def extreme_int(rng: random.Random) -> int:
    """An integer from ``EXTREME_INTS``."""
    return rng.choice(EXTREME_INTS)


def odd_int(rng: random.Random) -> Json:
    """An extreme integer, or (one time in four) a value of the wrong type."""
    return rng.choice(WRONG_TYPES) if rng.random() < 0.25 else extreme_int(rng)


def odd_dims(rng: random.Random, dims: list[Json]) -> list[Json]:
    """``dims`` (a shape or a stride) with an extreme or wrong value, or a dimension more or
    less, or replaced by a famous overflow."""
    pick = rng.randrange(6)
    out = list(dims)
    if pick == 0 and out:
        out[rng.randrange(len(out))] = odd_int(rng)
    elif pick == 1:
        out.insert(rng.randrange(len(out) + 1), extreme_int(rng))
    elif pick == 2 and out:
        out.pop(rng.randrange(len(out)))
    elif pick == 3:
        out = rng.choice([[2**32, 2**32], [2**62, 2**62, 0], [0, 2**63], [2**31] * 3, [1] * 65])
    elif pick == 4:
        out = [extreme_int(rng) for _ in range(rng.randrange(1, 4))]
    else:
        out = rng.choice(WRONG_TYPES)
    return out


def odd_attrs(rng: random.Random) -> Json:
    """A tensor's ``attrs``: a dict value with hostile names or values, or not a dict at all."""
    pick = rng.randrange(4)
    if pick == 0:
        return {"dict": [[["s", rng.choice(ATTR_NAMES)], rng.choice((1, "x", None))]]}
    if pick == 1:
        return {"dict": [[["s", "note"], rng.choice(ODD_VALUES)]]}
    if pick == 2:
        return {"dict": [[rng.choice((["i", 3], ["s", 3], ["x"], None, "note")), 1]]}
    return rng.choice((*ODD_VALUES, *WRONG_TYPES))


def dtensor_record(shape: list[Json]) -> dict[str, Json]:
    """A plausible ``dtensor`` field for a one-rank mesh holding a tensor of ``shape``."""
    stride: list[int] = []
    at = 1
    for n in reversed(shape):
        stride.insert(0, at)
        at *= n if type(n) is int and n > 0 else 1
    return {
        "device_type": "cpu",
        "mesh": [0],
        "dim_names": None,
        "placements": [["replicate"]],
        "shape": list(shape),
        "stride": stride,
        "param": False,
        "offset": [0] * len(shape),
    }


def odd_dtensor(rng: random.Random, shape: list[Json]) -> Json:
    """A ``dtensor`` field with one hostile part (mesh, placements, device, global geometry)."""
    d = dtensor_record(shape)
    key = rng.choice([*d, "extra", "whole"])
    if key == "whole":
        return rng.choice(WRONG_TYPES)
    choices: dict[str, tuple[Json, ...]] = {
        "device_type": ("cuda", "meta", "xla:0", *CODE_NAMES[:2], 5, None),
        "mesh": ([0, 1], [[0, 1]], [1], [-1], [], [[]], [2**63], [0, 0], "0", [[0], [0]]),
        "dim_names": (["a", "b"], [5], "a", [None]),
        "placements": (
            [["shard", 99]],
            [["shard", -1]],
            [["shard", 2**63]],
            [["partial", "os.system"]],
            [["partial", "sum"]],
            [["strided_shard", 0, 2]],
            [["replicate"], ["replicate"]],
            [],
            [[]],
            [["os.system"]],
            "replicate",
        ),
        "shape": ([2**62, 2**62], [-1], [2**64], [], [0]),
        "stride": ([0], [2**63], [-1], []),
        "param": (1, "yes", None),
        "offset": ([2**63], [-1], [1], [0, 0, 0], None, [2**62]),
        "extra": (1,),
    }
    d[key] = rng.choice(choices[key])
    return d
