"""Saving, staging and sending never run code of the caller's objects, and nesting has one limit.

Issue 13, items 9 and 10. A value whose ``__deepcopy__``, ``__reduce__``, ``__getstate__``,
``__eq__``, ``__hash__``, ``__repr__`` (or ``__class__``, which ``isinstance`` asks) records that
it ran and hands back a substitute is refused with ``UnsupportedValueError`` naming its key by
every front door, and none of those hooks runs (the code before this saved the substitute);
dict, list and tuple subclasses whose methods lie are read through their base class, so what is
saved is what they hold. Containers nest at most ``MAX_DEPTH`` deep: at the limit a state dict
(and metadata) round-trips, one level more is refused by ``save`` and, in a crafted file, by
``load`` (``CheckpointCorrupt``), and 10,000 levels are an ``UnsupportedValueError``, never a
``RecursionError``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist
import xxhash
from torch._C._distributed_c10d import HashStore  # torch.distributed.HashStore, typed

import aiostage
from aiostage._format.codec import DATA_ALIGN
from aiostage._format.manifest import MANIFEST, decode_manifest, encode_manifest, rank_file
from aiostage._format.structure import MAX_DEPTH
from aiostage._replication.frames import plan_frame
from aiostage.errors import CheckpointCorrupt, UnsupportedValueError
from aiostage.testing import assert_state_dict_equal

pytestmark = pytest.mark.timeout(120)

#: every hook that ran, by name, in order (cleared by the ``ran`` fixture)
RAN: list[str] = []


def hook(name: str) -> None:
    RAN.append(name)


class Hooked:
    """A value whose copy, pickle, compare, hash and text hooks record that they ran and hand
    back a substitute (an int, which the format would store)."""

    def __deepcopy__(self, memo: object) -> int:
        hook("__deepcopy__")
        return 42

    def __copy__(self) -> int:
        hook("__copy__")
        return 42

    def __reduce_ex__(self, protocol: object) -> Any:
        hook("__reduce_ex__")
        return (int, (42,))

    def __reduce__(self) -> Any:
        hook("__reduce__")
        return (int, (42,))

    def __getstate__(self) -> object:
        hook("__getstate__")
        return {}

    def __eq__(self, other: object) -> bool:
        hook("__eq__")
        return True

    def __hash__(self) -> int:
        hook("__hash__")
        return 0

    def __repr__(self) -> str:
        hook("__repr__")
        return "42"


class Disguised(Hooked):
    """A ``Hooked`` that also claims to be a dict: ``isinstance(disguised, dict)`` asks its
    ``__class__``, which says yes."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        hook("__class__")
        return dict


class LyingDict(dict[str, Any]):
    """A dict whose every reading method records that it ran and returns a substitute."""

    def items(self) -> Any:
        hook("items")
        return {"substitute": 42}.items()

    def keys(self) -> Any:
        hook("keys")
        return {"substitute": 42}.keys()

    def values(self) -> Any:
        hook("values")
        return {"substitute": 42}.values()

    def __iter__(self) -> Iterator[str]:
        hook("__iter__")
        return iter(["substitute"])

    def __getitem__(self, key: str) -> Any:
        hook("__getitem__")
        return 42

    def __len__(self) -> int:
        hook("__len__")
        return 1


class LyingOrderedDict(collections.OrderedDict[str, Any]):
    """An OrderedDict whose iteration and item access lie (its order is its own)."""

    def __iter__(self) -> Iterator[str]:
        hook("__iter__")
        return iter(["substitute"])

    def items(self) -> Any:
        hook("items")
        return {"substitute": 42}.items()

    def __setitem__(self, key: str, value: Any) -> None:
        hook("__setitem__")
        super().__setitem__(key, value)


class LyingList(list[Any]):
    """A list whose iteration, length and item access lie."""

    def __iter__(self) -> Iterator[Any]:
        hook("__iter__")
        return iter([42])

    def __len__(self) -> int:
        hook("__len__")
        return 1

    def __getitem__(self, i: Any) -> Any:
        hook("__getitem__")
        return 42


class Pair(collections.namedtuple("Pair", ["w", "n"])):
    """A namedtuple whose construction, iteration and item access lie."""

    def __new__(cls, *args: Any) -> Pair:
        hook("__new__")
        return super().__new__(cls, *args)

    def __iter__(self) -> Iterator[Any]:
        hook("__iter__")
        return iter([42, 42])

    def __getitem__(self, i: Any) -> Any:
        hook("__getitem__")
        return 42


@dataclasses.dataclass
class Config:
    """A dataclass whose attribute access lies."""

    w: torch.Tensor
    lr: float

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            hook("__getattribute__")
            return 42
        return object.__getattribute__(self, name)


@pytest.fixture(autouse=True)
def ran() -> Iterator[list[str]]:
    RAN.clear()
    yield RAN
    RAN.clear()


# ---------------------------------------------------------------- the front doors


async def via_save(sd: Any, tmp: Path) -> Any:
    await aiostage.save(sd, tmp / "save")
    return await aiostage.load(tmp / "save")


async def via_checkpointer(sd: Any, tmp: Path) -> Any:
    async with aiostage.Checkpointer(tmp / "root") as ckpt:
        await (await ckpt.save(1, sd)).committed
        return await ckpt.load(1)


async def via_async_save(sd: Any, tmp: Path) -> Any:
    refused: list[UnsupportedValueError] = []  # raised outside the task group, not in a group
    async with anyio.create_task_group() as tg:
        try:
            handle = await aiostage.async_save(sd, tmp / "async", task_group=tg)
        except UnsupportedValueError as exc:
            refused.append(exc)
        else:
            await handle.committed
    if refused:
        raise refused[0]
    return await aiostage.load(tmp / "async")


async def via_stage(sd: Any, tmp: Path) -> Any:
    async with aiostage.DefaultStager(pool_size=1) as stager:
        first = await stager.stage(sd)
        stager.release(first)
        return await stager.stage(sd)  # the warm path too (a kept skeleton)


async def via_replication(sd: Any, tmp: Path) -> Any:
    async with aiostage.ReplicationStager(None, timeout=30) as stager:
        return await stager.stage(sd)


async def via_frame(sd: Any, tmp: Path) -> Any:
    """The frame a ReplicationStager or a WeightPublisher sends to a peer."""
    return await anyio.to_thread.run_sync(plan_frame, sd)


async def via_publish(sd: Any, tmp: Path) -> Any:
    if dist.is_initialized():
        pytest.skip("a default process group exists already")
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        async with aiostage.WeightPublisher(subscribers=[], timeout=30) as pub:
            return await pub.publish(sd, 1)
    finally:
        dist.destroy_process_group()


Door = Callable[[Any, Path], Awaitable[Any]]
DOORS: dict[str, Door] = {
    "save": via_save,
    "checkpointer": via_checkpointer,
    "async_save": via_async_save,
    "stage": via_stage,
    "replication": via_replication,
    "frame": via_frame,
    "publish": via_publish,
}
STORING = ["save", "checkpointer", "async_save"]


def _with_attribute(value: object) -> torch.Tensor:
    t = torch.ones(2)
    t.note = value  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: {"w": torch.ones(2), "opaque": Hooked()}, "opaque"),
        (
            lambda: {"optim": {"param_groups": [{"lr": 0.1, "fn": Disguised()}]}},
            "optim.param_groups.0.fn",
        ),
        (lambda: {"w": _with_attribute(Hooked())}, "w.note"),
        (lambda: {"w": _with_attribute({"deep": [Hooked()]})}, "w.note.deep.0"),
        (lambda: {"cfg": {Hooked(): torch.ones(1)}}, "cfg"),
    ],
    ids=["value", "disguised", "tensor-attr", "attr-nested", "key"],
)
async def test_a_hooked_value_is_refused_and_its_hooks_never_run(
    tmp_path: Path, ran: list[str], door: str, make: Callable[[], Any], key: str
) -> None:
    sd = make()
    ran.clear()  # building the dict hashed a key: only what aiostage does counts
    with pytest.raises(UnsupportedValueError) as info:
        await DOORS[door](sd, tmp_path)
    assert info.value.key == key
    assert "42" not in str(info.value)  # no repr of it either
    assert ran == [], f"{door} ran the value's own code: {ran}"
    assert not (tmp_path / "save").exists()
    assert not (tmp_path / "async").exists()


def lying_state() -> dict[str, Any]:
    return {
        "d": LyingDict(w=torch.ones(2), step=3),
        "od": LyingOrderedDict([("b", torch.zeros(1)), ("a", 1.5)]),
        "l": LyingList([torch.full((2,), 2.0), "x"]),
        "p": Pair(torch.full((3,), 3.0), 7),
        "c": Config(torch.full((1,), 4.0), 0.1),
    }


def expected_plain() -> dict[str, Any]:
    """What ``lying_state`` holds, as the format stores it (subclasses become their base)."""
    return {
        "d": {"w": torch.ones(2), "step": 3},
        "od": collections.OrderedDict([("b", torch.zeros(1)), ("a", 1.5)]),
        "l": [torch.full((2,), 2.0), "x"],
        "p": (torch.full((3,), 3.0), 7),
        "c": {"w": torch.full((1,), 4.0), "lr": 0.1},
    }


@pytest.mark.parametrize("door", STORING)
async def test_lying_containers_are_saved_as_what_they_hold(
    tmp_path: Path, ran: list[str], door: str
) -> None:
    sd = lying_state()
    ran.clear()
    back = await DOORS[door](sd, tmp_path)
    assert ran == [], f"{door} ran the containers' own methods: {ran}"
    want = expected_plain()
    pair = back.pop("p")
    assert type(pair).__name__ == "Pair"
    assert_state_dict_equal(tuple(pair), want.pop("p"))
    assert_state_dict_equal(back, want)


@pytest.mark.parametrize("door", ["stage", "replication"])
async def test_lying_containers_are_staged_as_what_they_hold(
    tmp_path: Path, ran: list[str], door: str
) -> None:
    """Staged in memory, a container keeps its class, built through the base class (its own
    ``__init__``, ``__new__`` or ``__setitem__`` never runs), holding what it held."""
    sd = lying_state()
    ran.clear()
    out = await DOORS[door](sd, tmp_path)
    assert ran == [], f"{door} ran the containers' own methods: {ran}"
    assert [type(out[k]) for k in ("d", "od", "l", "p", "c")] == [
        LyingDict,
        LyingOrderedDict,
        LyingList,
        Pair,
        Config,
    ]
    seen = {
        "d": dict(dict.items(out["d"])),
        "od": collections.OrderedDict(collections.OrderedDict.items(out["od"])),
        "l": list(list.__iter__(out["l"])),
        "p": tuple(tuple.__iter__(out["p"])),
        "c": {n: object.__getattribute__(out["c"], n) for n in ("w", "lr")},
    }
    assert ran == []
    assert_state_dict_equal(seen, expected_plain())


async def test_a_later_stage_compares_no_key_of_another_type(ran: list[str]) -> None:
    """The warm path (a kept skeleton) checks the keys' types before comparing keys: a key
    that became a ``Hooked`` is refused by the walk that follows, its ``__eq__`` never runs."""
    sd: dict[str, Any] = {"cfg": {"a": torch.ones(1), "b": torch.zeros(1)}}
    async with aiostage.DefaultStager(pool_size=1) as stager:
        stager.release(await stager.stage(sd))
        sd["cfg"] = {Hooked(): torch.ones(1), "b": torch.zeros(1)}
        ran.clear()
        with pytest.raises(UnsupportedValueError) as info:
            await stager.stage(sd)
    assert info.value.key == "cfg"
    assert ran == []


async def test_metadata_runs_no_code_of_its_values(tmp_path: Path, ran: list[str]) -> None:
    meta: dict[str, Any] = {"hooked": Hooked()}
    with pytest.raises(UnsupportedValueError) as info:
        await aiostage.save({"w": torch.ones(1)}, tmp_path / "a", metadata=meta)
    assert info.value.key == "metadata.hooked"
    lying = LyingDict(step=3, loss=0.5)
    await aiostage.save({"w": torch.ones(1)}, tmp_path / "b", metadata={"m": lying})
    assert ran == []
    assert await aiostage.load_metadata(tmp_path / "b") == {"m": {"step": 3, "loss": 0.5}}


# ---------------------------------------------------------------- depth


def nest(levels: int, leaf: Any, kinds: str = "d") -> Any:
    """``leaf`` inside ``levels`` containers, cycling through ``kinds`` (d: dict, l: list,
    t: tuple); every key is "a" (or 0)."""
    out = leaf
    for i in range(levels):
        kind = kinds[i % len(kinds)]
        out = {"a": out} if kind == "d" else [out] if kind == "l" else (out,)
    return out


def dig(obj: Any, levels: int) -> Any:
    for _ in range(levels):
        obj = obj["a"] if isinstance(obj, dict) else obj[0]
    return obj


@pytest.mark.parametrize("kinds", ["d", "dlt"])
async def test_a_state_dict_at_the_limit_round_trips(tmp_path: Path, kinds: str) -> None:
    sd = nest(MAX_DEPTH, torch.arange(3.0), kinds)
    meta = nest(MAX_DEPTH - 1, [1, 2], "dl")  # the list inside is the limit's level
    await aiostage.save(sd, tmp_path / "x", metadata=meta)
    assert torch.equal(dig(await aiostage.load(tmp_path / "x"), MAX_DEPTH), torch.arange(3.0))
    assert await aiostage.load_metadata(tmp_path / "x") == json.loads(json.dumps(meta))
    assert torch.equal(dig(await via_stage(sd, tmp_path), MAX_DEPTH), torch.arange(3.0))
    assert torch.equal(dig(await via_checkpointer(sd, tmp_path), MAX_DEPTH), torch.arange(3.0))


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 10_000])
async def test_deeper_nesting_is_refused_naming_the_key(
    tmp_path: Path, door: str, levels: int
) -> None:
    sd = {"w": torch.ones(1), "deep": nest(levels - 1, torch.ones(1), "dl")}
    with pytest.raises(UnsupportedValueError, match=f"deeper than {MAX_DEPTH}") as info:
        await DOORS[door](sd, tmp_path)
    key = info.value.key or ""
    assert key.startswith("deep."), key
    assert f".<{MAX_DEPTH - 6} more>." in key, key
    assert len(key.split(".")) == 7, key  # three parts, the count, three parts
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 10_000])
async def test_deeper_values_and_metadata_are_refused(tmp_path: Path, levels: int) -> None:
    t = _with_attribute(nest(levels - 1, 1, "l"))  # the attributes' dict is one level
    with pytest.raises(UnsupportedValueError, match="deeper") as attr:
        await aiostage.save({"t": t}, tmp_path / "a")
    assert str(attr.value.key).startswith("t.note.0.<")
    with pytest.raises(UnsupportedValueError, match="deeper") as meta:
        await aiostage.save({"w": torch.ones(1)}, tmp_path / "b", metadata=nest(levels, 1))
    assert str(meta.value.key).startswith("metadata.a.a.<")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- crafted deeper files


def rewrite_header(ckpt: Path, edit: Callable[[str], str]) -> None:
    """Rewrite the JSON of the aiostage metadata in rank 0's header with ``edit`` (text in,
    text out), then fix the manifest's size and header checksum, as a forger would."""
    file = ckpt / rank_file(0)
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    top = json.loads(blob[8 : 8 + n])
    marker = '"@@"'
    top["__metadata__"]["aiostage"] = "@@"
    inner = edit(json.loads(blob[8 : 8 + n])["__metadata__"]["aiostage"])
    body = json.dumps(top, separators=(",", ":")).replace(marker, json.dumps(inner)).encode()
    body += b" " * (-(8 + len(body)) % DATA_ALIGN)
    head = struct.pack("<Q", len(body)) + body
    file.write_bytes(head + blob[8 + n :])
    m = decode_manifest((ckpt / MANIFEST).read_bytes(), "m")
    info = dataclasses.replace(
        m.files[0], size=len(head) + len(blob) - 8 - n, header_xxh3=xxhash.xxh3_64_intdigest(head)
    )
    (ckpt / MANIFEST).write_bytes(encode_manifest(dataclasses.replace(m, files=(info,))))


def wrap_skeleton(levels: int) -> Callable[[str], str]:
    """Put the skeleton inside ``levels`` more one-key dicts."""

    def edit(text: str) -> str:
        m = json.loads(text)
        before, after = json.dumps({**m, "tree": "@@"}).split('"@@"')
        skeleton = json.dumps(m["tree"])
        opened = '{"dict": [[["s", "z"], ' * levels
        return before + opened + skeleton + "]]}" * levels + after

    return edit


async def test_a_crafted_file_one_level_too_deep_is_corrupt(tmp_path: Path) -> None:
    ckpt = tmp_path / "x"
    await aiostage.save(nest(MAX_DEPTH, torch.ones(2)), ckpt)
    rewrite_header(ckpt, lambda text: text)  # the forger's round trip alone changes nothing
    assert torch.equal(dig(await aiostage.load(ckpt), MAX_DEPTH), torch.ones(2))
    rewrite_header(ckpt, wrap_skeleton(1))
    with pytest.raises(CheckpointCorrupt, match=f"deeper than {MAX_DEPTH}"):
        await aiostage.load(ckpt)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 10_000])
async def test_crafted_deep_values_and_metadata_are_corrupt(tmp_path: Path, levels: int) -> None:
    ckpt = tmp_path / "x"
    await aiostage.save({"t": _with_attribute(1)}, ckpt, metadata={"a": 1})

    def deep_attrs(text: str) -> str:
        m = json.loads(text)
        m["tensors"][0]["attrs"] = "@@"
        before, after = json.dumps(m).split('"@@"')
        value = '{"dict": [[["s", "note"], ' + '{"list": [' * (levels - 1) + "1"
        return before + value + "]}" * (levels - 1) + "]]}" + after

    rewrite_header(ckpt, deep_attrs)
    with pytest.raises(CheckpointCorrupt):
        await aiostage.load(ckpt)
    raw = (ckpt / MANIFEST).read_text()
    deep = '{"a": ' * levels + "1" + "}" * levels
    (ckpt / MANIFEST).write_text(raw.replace('"metadata": {\n  "a": 1\n }', f'"metadata": {deep}'))
    with pytest.raises(CheckpointCorrupt, match="manifest"):
        await aiostage.load_metadata(ckpt)


async def test_a_crafted_skeleton_ten_thousand_deep_is_corrupt(tmp_path: Path) -> None:
    ckpt = tmp_path / "x"
    await aiostage.save({"w": torch.ones(2)}, ckpt)
    rewrite_header(ckpt, wrap_skeleton(10_000))
    with pytest.raises(CheckpointCorrupt):
        await aiostage.load(ckpt)


def test_the_cli_reads_the_limit_and_refuses_one_more(tmp_path: Path) -> None:
    at, over = tmp_path / "at", tmp_path / "over"
    anyio.run(lambda: aiostage.save(nest(MAX_DEPTH, torch.ones(2)), at))
    anyio.run(lambda: aiostage.save(nest(MAX_DEPTH, torch.ones(2)), over))
    rewrite_header(over, wrap_skeleton(1))
    for command, path, code in (("verify", at, 0), ("verify", over, 1), ("inspect", over, 2)):
        cmd = [sys.executable, "-m", "aiostage", command, str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == code, (command, path, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        if code:
            assert f"deeper than {MAX_DEPTH}" in done.stdout + done.stderr
