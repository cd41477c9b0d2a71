"""Hostile and damaged files inside a checkpoint: links, FIFOs, directories and huge manifests.

Every case is built from real parts (``os.mkfifo``, ``os.symlink``, sparse files made by
``truncate``) and must be refused as ``CheckpointCorrupt`` naming the file, at once: never
waited on, never followed, never read whole, and never echoing the bytes of a file elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage._format.codec import MANIFEST, header_length
from aiostage._storage.local import LOCAL
from aiostage.errors import CheckpointCorrupt
from aiostage.testing import assert_state_dict_equal

pytestmark = pytest.mark.timeout(30)

DATA = "rank_00000.safetensors"
#: what a private file outside the checkpoint starts with: it must never reach a message
SECRET = b"SECRETS!" + bytes(range(200))
SECRET_NUMBER = str(struct.unpack("<Q", SECRET[:8])[0])
_fifos: list[Path] = []


@pytest.fixture(autouse=True)
def _release_fifos() -> Iterator[None]:
    """Open every FIFO a test made for writing once it ends, so that a reader the code under
    test left blocked in ``open`` (the defect these tests catch) is released, not leaked."""
    yield
    while _fifos:
        _release(_fifos.pop())


def _release(fifo: Path) -> None:
    """Open ``fifo`` for writing and close it: a reader blocked opening it goes on (reading
    nothing); ENXIO if nobody is reading it, which is the case once the code is right."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def make_fifo(path: Path) -> None:
    os.mkfifo(path)
    _fifos.append(path)


def sd() -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4), "step": 3}


async def saved(path: Path) -> Path:
    await aiostage.save(sd(), path)
    return path


def private_file(tmp_path: Path) -> Path:
    """A file outside any checkpoint that the user running aiostage may read."""
    secret = tmp_path / "elsewhere" / "private.bin"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(SECRET)
    return secret


def relist(ckpt: Path, size: int) -> None:
    """Rewrite the manifest to list the data file with ``size`` bytes, as a crafted one would
    (so that the size check passes and the reader goes on to open the file)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][0]["size"] = size
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def plant(file: Path, what: str, tmp_path: Path) -> None:
    """Replace ``file`` with a FIFO, a directory or a link to a private file elsewhere."""
    file.unlink()
    if what == "fifo":
        make_fifo(file)
    elif what == "directory":
        file.mkdir()
    else:
        file.symlink_to(private_file(tmp_path))


KINDS = {"fifo": "a FIFO", "directory": "a directory", "symlink": "a symbolic link"}


def assert_refused(exc: BaseException, file: Path, what: str) -> None:
    """``exc`` names ``file`` and what it is, and echoes nothing of the private file."""
    text = str(exc)
    assert isinstance(exc, CheckpointCorrupt), repr(exc)
    assert f"{file} is not a regular file ({KINDS[what]})" in text
    assert exc.path == file
    assert "SECRETS" not in text
    assert SECRET_NUMBER not in text


# ---------------------------------------------------------------- load and load_metadata


@pytest.mark.parametrize("what", KINDS)
async def test_a_data_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, what: str) -> None:
    ckpt = await saved(tmp_path / "ckpt")
    file = ckpt / DATA
    plant(file, what, tmp_path)
    relist(ckpt, os.stat(file).st_size)  # a FIFO has 0 bytes, a link the private file's size
    with pytest.raises(CheckpointCorrupt) as caught:
        await aiostage.load(ckpt)
    assert_refused(caught.value, file, what)


@pytest.mark.parametrize("what", KINDS)
async def test_a_manifest_that_is_not_a_regular_file_is_refused(tmp_path: Path, what: str) -> None:
    ckpt = await saved(tmp_path / "ckpt")
    file = ckpt / MANIFEST
    if what == "symlink":  # a link to a sound manifest elsewhere: still not followed
        other = await saved(tmp_path / "other")
        file.unlink()
        file.symlink_to(other / MANIFEST)
    else:
        plant(file, what, tmp_path)
    for read in (aiostage.load, aiostage.load_metadata):
        with pytest.raises(CheckpointCorrupt) as caught:
            await read(ckpt)
        assert_refused(caught.value, file, what)


def read_bytes_so_far() -> int:
    """The bytes this process has read through ``read(2)`` and kin (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
async def test_a_huge_sparse_manifest_is_refused_by_its_size_before_any_read(
    tmp_path: Path,
) -> None:
    ckpt = await saved(tmp_path / "ckpt")
    os.truncate(ckpt / MANIFEST, 1 << 40)  # 1 TiB, sparse: nothing on disk
    before = read_bytes_so_far()
    with pytest.raises(CheckpointCorrupt, match="larger than a manifest may be") as caught:
        await aiostage.load_metadata(ckpt)
    assert caught.value.path == ckpt / MANIFEST
    assert str(1 << 40) in str(caught.value)
    assert read_bytes_so_far() - before < 1 << 20  # not the 64 MiB limit, nor the terabyte


async def test_a_checkpointer_over_hostile_steps_does_not_hang(tmp_path: Path) -> None:
    await saved(tmp_path / "step_000000001")
    late = await saved(tmp_path / "step_000000002")
    (late / MANIFEST).unlink()
    make_fifo(late / MANIFEST)
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        assert await ckpt.latest() == 2  # a damaged checkpoint is still the newest one...
        with pytest.raises(CheckpointCorrupt) as caught:  # ...and loading it says why
            await ckpt.load()
        assert_refused(caught.value, late / MANIFEST, "fifo")
        assert_state_dict_equal(await ckpt.load(1), sd())


# ---------------------------------------------------------------- the storage calls themselves


@pytest.mark.parametrize("what", KINDS)
async def test_every_read_of_the_local_backend_refuses_what_is_not_a_regular_file(
    tmp_path: Path, what: str
) -> None:
    file = tmp_path / "ckpt" / DATA
    file.parent.mkdir()
    file.touch()
    plant(file, what, tmp_path)
    with pytest.raises(CheckpointCorrupt) as caught:
        await LOCAL.size(file)
    assert_refused(caught.value, file, what)
    with pytest.raises(CheckpointCorrupt) as caught:
        await LOCAL.read(file, 0, 8)
    assert_refused(caught.value, file, what)
    with pytest.raises(CheckpointCorrupt) as caught:
        await LOCAL.map(file, 8)
    assert_refused(caught.value, file, what)


async def test_reads_never_reach_past_the_end_of_the_file(tmp_path: Path) -> None:
    file = tmp_path / "small"
    file.write_bytes(b"0123456789")
    assert await LOCAL.read(file, 4, 1 << 40) == b"456789"  # never a terabyte buffer
    assert await LOCAL.read(file, 20, 8) == b""
    with pytest.raises(CheckpointCorrupt, match="10 bytes, fewer than the 11") as caught:
        await LOCAL.map(file, 11)  # truncated since its size was checked: not a ValueError
    assert caught.value.path == file


def test_an_absurd_header_length_is_not_echoed() -> None:
    first = SECRET[:8]
    with pytest.raises(CheckpointCorrupt, match="does not fit") as caught:
        header_length(first, 4096, "f.safetensors")
    assert SECRET_NUMBER not in str(caught.value)
    assert "4096 bytes" in str(caught.value)


# ---------------------------------------------------------------- what still works


async def test_a_checkpoint_directory_that_is_a_link_still_loads(tmp_path: Path) -> None:
    ckpt = await saved(tmp_path / "real" / "ckpt")
    link = tmp_path / "link"
    link.symlink_to(ckpt, target_is_directory=True)
    assert_state_dict_equal(await aiostage.load(link), sd())
    assert_state_dict_equal(await aiostage.load(ckpt), sd())
    assert await aiostage.load_metadata(link) == {}


# ---------------------------------------------------------------- aiostage ls


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


async def test_ls_lists_each_hostile_checkpoint_as_corrupt_and_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(1, 8):
        await saved(root / f"step_{step:09d}")
    damaged = {
        1: (MANIFEST, "fifo"),
        2: (MANIFEST, "directory"),
        3: (MANIFEST, "symlink"),
        4: (DATA, "fifo"),
        5: (DATA, "directory"),
        6: (DATA, "symlink"),
    }
    for step, (name, what) in damaged.items():
        ckpt = root / f"step_{step:09d}"
        if what == "symlink" and name == MANIFEST:
            (ckpt / name).unlink()
            (ckpt / name).symlink_to(root / "step_000000007" / MANIFEST)
        else:
            plant(ckpt / name, what, tmp_path)
        if name == DATA:
            relist(ckpt, os.stat(ckpt / name).st_size)
    best = await saved(root / "best")
    os.truncate(best / MANIFEST, 1 << 40)
    out = run_cli("ls", root)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[5]: line for line in out.stdout.splitlines()[1:]}
    assert len(rows) == 8, out.stdout
    for step, (name, what) in damaged.items():
        row = rows[f"step_{step:09d}"]
        assert row.split()[1] == "corrupt", row
        assert f"{name} is not a regular file ({KINDS[what]})" in row
        assert SECRET_NUMBER not in row
    assert rows["step_000000007"].split()[1] == "committed"
    assert rows["best"].split()[1] == "corrupt"
    assert "larger than a manifest may be" in rows["best"]


async def test_ls_of_a_link_to_a_checkpoint_lists_it(tmp_path: Path) -> None:
    ckpt = await saved(tmp_path / "real" / "step_000000010")
    link = tmp_path / "latest"
    link.symlink_to(ckpt, target_is_directory=True)
    out = run_cli("ls", link)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["10", "committed"]


async def test_a_linked_save_directory_inside_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """An object store's layout copied to a disk (``TOKEN/rank_00000.safetensors``) loads; with
    the token directory replaced by a link to a directory elsewhere, it is refused, not read."""
    path, token = tmp_path / "ckpt", "0123456789abcdef0123456789abcdef"
    await aiostage.save(sd(), path)
    (path / token).mkdir()
    (path / "rank_00000.safetensors").rename(path / token / "rank_00000.safetensors")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][0]["name"] = f"{token}/rank_00000.safetensors"
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert_state_dict_equal(await aiostage.load(path), sd())
    elsewhere = tmp_path / "elsewhere"
    (path / token).rename(elsewhere)
    (path / token).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointCorrupt, match="symbolic link") as caught:
        await aiostage.load(path)
    assert token in str(caught.value)
