"""Hostile tensor records in a real checkpoint, with valid checksums (issue 13, items 1-3): one
decoder refuses them on every reader path (``load``, ``load(into=)``, ``verify``, ``inspect``,
``export``) with ``CheckpointCorrupt`` naming the file, never a raw torch error or an "OK"."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import xxhash

import aiostage
from aiostage.__main__ import main
from aiostage._core.dtypes import STORABLE_DTYPES
from aiostage._core.storages import plan_storages
from aiostage._core.tree import flatten
from aiostage._format.codec import MANIFEST, decode_header, encode_header, rank_file
from aiostage._format.plan import plan_file
from aiostage._format.records import MAX_ELEMENTS, check_elements
from aiostage.errors import CheckpointCorrupt

pytestmark = pytest.mark.timeout(60)

Record = dict[str, Any]

#: each class of issue 13 items 1-3, as a change to the record of ``w`` (a 4x4 float32)
BENT: dict[str, Callable[[Record], None]] = {
    "overflow_stride_0": lambda r: r.update(shape=[2**32, 2**32], stride=[0, 0]),
    "overflow_before_a_0": lambda r: r.update(shape=[2**62, 2**62, 0], stride=[0, 0, 0]),
    "overflow_past_int64": lambda r: r.update(shape=[2**62, 8], stride=[0, 1]),
    "reach_past_entry": lambda r: r.update(shape=[4, 4], stride=[4, 2]),
    "qint8": lambda r: r.update(dtype="qint8"),
    "quint4x2": lambda r: r.update(dtype="quint4x2"),
    "attrs_float_list": lambda r: r.update(attrs={"float": []}),
    "attrs_not_a_dict": lambda r: r.update(attrs={"list": [1, 2]}),
    "attrs_int_keys": lambda r: r.update(attrs={"dict": [[["i", 3], 1]]}),
    "attrs_size_2_70": lambda r: r.update(attrs={"dict": [[["s", "s"], {"size": [2**70]}]]}),
    "dtensor_on_a_tensor": lambda r: r.update(dtensor={"shape": [4, 4]}),
    "dtensor_ragged_mesh": lambda r: r.update(
        wrap="dtensor",
        dtensor={"shape": [8, 4], "placements": [["shard", 0]], "mesh": [[0, 1], [2]]},
    ),
    "dtensor_shard_dim": lambda r: r.update(
        wrap="dtensor", dtensor={"shape": [8, 4], "placements": [["shard", 5]], "mesh": [0, 1]}
    ),
    "dtensor_offset_outside": lambda r: r.update(
        wrap="dtensor",
        dtensor={"shape": [8, 4], "placements": [["shard", 0]], "mesh": [0, 1], "offset": [6, 0]},
    ),
}


def bend(ckpt: Path, change: Callable[[Record], None]) -> None:
    """Apply ``change`` to the first record of rank 0's file, keep the header's length, and
    give the manifest the new header's checksum: only the decoder stands in the way."""
    file = ckpt / rank_file(0)
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    top = json.loads(blob[8 : 8 + n])
    meta = json.loads(top["__metadata__"]["aiostage"])
    change(meta["tensors"][0])
    top["__metadata__"]["aiostage"] = json.dumps(meta)
    body = json.dumps(top).encode()
    assert len(body) <= n, "the bent header must fit in the padded one"
    head = blob[:8] + body.ljust(n)
    file.write_bytes(head + blob[8 + n :])
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][0]["header_xxh3"] = f"{xxhash.xxh3_64_intdigest(head):016x}"
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def state() -> dict[str, Any]:
    return {"w": torch.arange(16.0).reshape(4, 4), "b": torch.ones(3), "step": 7}


@pytest.fixture
def bent_ckpt(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    path = tmp_path / "ckpt"
    anyio.run(aiostage.save, state(), path)
    bend(path, BENT[request.param])
    return path


@pytest.mark.parametrize("bent_ckpt", list(BENT), indirect=True)
async def test_every_load_refuses_a_bent_record_naming_the_file(bent_ckpt: Path) -> None:
    file = str(bent_ckpt / rank_file(0))
    for verify in (True, False):
        with pytest.raises(CheckpointCorrupt) as caught:
            await aiostage.load(bent_ckpt, verify=verify)
        assert file in str(caught.value)
    into = state()
    before = into["w"].clone()
    with pytest.raises(CheckpointCorrupt, match="bad header"):
        await aiostage.load(bent_ckpt, into=into)
    assert torch.equal(into["w"], before)
    assert await aiostage.load_metadata(bent_ckpt) == {}  # the manifest's own copy is sound


@pytest.mark.parametrize("bent_ckpt", list(BENT), indirect=True)
def test_every_command_refuses_a_bent_record_in_one_line(
    bent_ckpt: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    commands = [
        ["verify", str(bent_ckpt)],
        ["inspect", str(bent_ckpt)],
        ["export", str(bent_ckpt), "--to", "safetensors", str(tmp_path / "out")],
    ]
    for argv in commands:
        status = main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        if argv[0] == "verify":  # a damaged file is what verify reports: exit 1, on stdout
            assert status == 1, (argv, out, err)
            assert "bad header" in out, out
            continue
        assert status == 2, (argv, out, err)
        (line,) = err.strip().splitlines()
        assert "bad header" in line, (argv, err)
    assert not (tmp_path / "out").exists()


def test_element_counts_skip_zeros_and_stop_at_int64() -> None:
    check_elements((2**31, 2**31, 0), "shape")
    check_elements((MAX_ELEMENTS,), "shape")
    for bad in [(2**62, 2**62, 0), (2**62, 2), (2**32, 2**32)]:
        with pytest.raises(ValueError, match="int64"):
            check_elements(bad, "shape")


def test_an_entry_shape_past_int64_is_refused_even_with_no_bytes() -> None:
    tree = flatten({"e": torch.empty(0, 3)})
    header, _ = plan_file(tree, plan_storages([leaf.data for leaf in tree.leaves]))
    top = json.loads(encode_header(header)[8:])
    entry = next(k for k in top if k != "__metadata__")
    top[entry]["shape"] = [2**62, 2**62, 0]
    with pytest.raises(CheckpointCorrupt, match="int64"):
        decode_header(json.dumps(top).encode(), header.data_bytes, "f")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
async def test_every_dtype_save_writes_loads_back_and_only_those(tmp_path: Path) -> None:
    """The reader accepts exactly the dtypes ``save`` writes: all but the quantized ones."""
    dtypes = sorted(STORABLE_DTYPES, key=str)
    assert torch.float32 in dtypes
    assert torch.qint8 not in dtypes
    sd = {str(d): torch.zeros(4, dtype=d) for d in dtypes}
    await aiostage.save(sd, tmp_path / "all")
    back = await aiostage.load(tmp_path / "all")
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in sd.items()}
