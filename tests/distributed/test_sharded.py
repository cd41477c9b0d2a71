"""Sharded models on real gloo worlds: FSDP2/HSDP save, resume, and resharding on load.

A port of the behaviours of PyTorch's ``test_hsdp_checkpoint.py``: one HSDP checkpoint (4 ranks,
2 replicas x 2 shards, ``fully_shard`` on a 2-D CPU mesh) is saved once per module and loaded
back into the same layout, a 1-D FSDP layout, a world of 2, and plain full tensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _sharded_workers as workers
import pytest
import torch
import xxhash

import aiostage
from aiostage._format.codec import rank_file
from aiostage.errors import CheckpointCorrupt, StateDictMismatch
from aiostage.testing import assert_state_dict_equal, run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

WORLD_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The HSDP world of ``save_train_resume``: its checkpoint, saved state and losses (rank
    0's), and under ``"ranks"`` what each rank saw."""
    root = tmp_path_factory.mktemp("sharded")
    results = run_world(workers.save_train_resume, 4, str(root), timeout=WORLD_TIMEOUT)
    return {**results[0], "ranks": results}


def test_hsdp_saves_trains_on_and_resumes_the_saved_state(hsdp: dict[str, Any]) -> None:
    for rank, r in enumerate(hsdp["ranks"]):
        assert r["moved"], f"rank {rank}: training after the save left 0.weight as it was saved"
        assert r["resumed"] is None, f"rank {rank}: the state loaded back differs: {r['resumed']}"
        assert r["again"] == r["losses"], (
            f"rank {rank}: losses after the load {r['again']} != after the save {r['losses']}"
        )
    # what was saved is sharded
    assert sorted(p.name for p in Path(hsdp["path"]).iterdir()) == [
        "manifest.json",
        *(rank_file(r) for r in range(4)),
    ]
    assert len(hsdp["losses"]) == workers.STEPS
    assert hsdp["saved"]["optim"]["state"]["2.weight"]["exp_avg"].shape == (7, 10)


@pytest.mark.parametrize(
    ("layout", "world", "shapes", "unread"),
    [
        ("hsdp", 4, [(4, 10), (3, 10), (4, 10), (3, 10)], ()),  # same layout, fresh group
        ("fsdp", 4, [(2, 10), (2, 10), (2, 10), (1, 10)], ()),  # 1-D mesh of 4, uneven, empty
        ("fsdp", 2, [(4, 10), (3, 10)], (2, 3)),  # a world of 2
    ],
    ids=["same-layout", "fsdp-4", "fsdp-2"],
)
def test_loading_into_another_layout_gives_the_saved_state(
    hsdp: dict[str, Any],
    tmp_path: Path,
    layout: str,
    world: int,
    shapes: list[tuple[int, ...]],
    unread: tuple[int, ...],
) -> None:
    # in a world of 2, ranks 0 and 1 find every shard in their own files: the data of the
    # files of ranks 2 and 3 is never read (nor verified), so corrupting it changes nothing
    path = tmp_path / "copy"
    shutil.copytree(hsdp["path"], path)
    for r in unread:
        _flip_data(path / rank_file(r))
    got = run_world(
        workers.load_into, world, str(path), layout, hsdp["path"], timeout=WORLD_TIMEOUT
    )[0]
    assert got["shapes"] == shapes
    assert_state_dict_equal(got["state"], hsdp["saved"])
    assert_state_dict_equal(got["columns"], hsdp["saved"])  # sharded by columns, on dim 1


async def _load_plain(path: str | Path, seed: int = 2) -> Any:
    """Load ``path`` into a plain model's full tensors (which applies it); the state, in full."""
    model, opt = workers.model_and_optimizer(seed)
    await aiostage.load(path, into=aiostage.train_state(model, opt))
    return workers.full(await aiostage.train_state(model, opt).state_dict())


async def test_a_plain_process_assembles_the_full_tensors(hsdp: dict[str, Any]) -> None:
    assert_state_dict_equal(await _load_plain(hsdp["path"]), hsdp["saved"])


def _flip_data(file: Path) -> None:
    """Flip every 7th byte of the data of ``file`` (its header stays intact)."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    for i in range(start, len(raw), 7):
        raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))


async def test_only_the_overlapping_shards_are_read(hsdp: dict[str, Any], tmp_path: Path) -> None:
    # rank 0 of a plain load reads shard 0 from its own file (rank 0's) and shard 1 from the
    # first replica (rank 1's): ranks 2 and 3 hold nothing it needs, so their data is never
    # read, let alone verified; corrupting it changes nothing
    path = tmp_path / "copy"
    shutil.copytree(hsdp["path"], path)
    for r in (2, 3):
        _flip_data(path / rank_file(r))
    assert_state_dict_equal(await _load_plain(path), hsdp["saved"])
    _flip_data(path / rank_file(1))
    with pytest.raises(CheckpointCorrupt, match=rank_file(1)) as info:
        await _load_plain(path)
    assert info.value.key


async def test_a_global_shape_mismatch_names_the_key(hsdp: dict[str, Any]) -> None:
    state = await aiostage.train_state(*workers.model_and_optimizer()).state_dict()
    state["model"]["2.weight"] = torch.zeros(8, 10)
    with pytest.raises(StateDictMismatch, match=r"shape mismatch at model\.2\.weight"):
        await aiostage.load(hsdp["path"], into=state)


async def test_a_missing_rank_file_is_corrupt(hsdp: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "copy"
    shutil.copytree(hsdp["path"], path)
    (path / rank_file(3)).unlink()
    with pytest.raises(CheckpointCorrupt, match=rank_file(3)):
        await _load_plain(path)


def _edit_layouts(path: Path, edit: Callable[[int, str, dict[str, Any]], None]) -> None:
    """Call ``edit(rank, entry name, layout)`` on every stored DTensor layout of ``path`` and
    rewrite the headers (same length, new checksums in the manifest)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for rank, entry in enumerate(manifest["files"]):
        file = path / entry["name"]
        raw = file.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        top = json.loads(raw[8 : 8 + n])
        meta = json.loads(top["__metadata__"]["aiostage"])
        for record in meta["tensors"]:
            if "dtensor" in record:
                edit(rank, meta["entries"][record["entry"]], record["dtensor"])
        top["__metadata__"]["aiostage"] = json.dumps(meta, separators=(",", ":"))
        body = json.dumps(top, separators=(",", ":")).encode().ljust(n, b" ")
        file.write_bytes(raw[:8] + body + raw[8 + n :])
        entry["header_xxh3"] = f"{xxhash.xxh3_64_intdigest(raw[:8] + body):016x}"
    (path / "manifest.json").write_text(json.dumps(manifest))


async def test_a_checkpoint_without_stored_offsets_reshards_from_the_mesh(
    hsdp: dict[str, Any], tmp_path: Path
) -> None:
    # as the writer did before offsets were stored: the reader computes them from the mesh
    path, removed = tmp_path / "old", []
    shutil.copytree(hsdp["path"], path)
    _edit_layouts(path, lambda rank, name, layout: removed.append(layout.pop("offset")))
    assert len(removed) == 4 * 18  # per rank: 6 parameters, 12 optimizer moments
    assert_state_dict_equal(await _load_plain(path), hsdp["saved"])


async def test_a_shard_outside_its_tensor_is_corrupt(hsdp: dict[str, Any], tmp_path: Path) -> None:
    def move(rank: int, name: str, layout: dict[str, Any]) -> None:
        if rank == 1 and name == "model.2.weight":
            layout["offset"] = [5, 0]  # 3 rows from row 5 of 7

    path = tmp_path / "bad"
    shutil.copytree(hsdp["path"], path)
    _edit_layouts(path, move)
    with pytest.raises(
        CheckpointCorrupt, match=rf"{rank_file(1)}: .* shard at \[5, 0\] is outside"
    ):
        await _load_plain(path)
