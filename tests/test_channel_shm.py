"""The subscriber's side of shared memory without a world: which objects it reads, and how it
reads them (read-only, by ``preadv``, never mapped, grown or written)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

from aiostage._channel import shm
from aiostage._channel.shm import PeerRegion, Region, fill_region, region_token
from aiostage._replication.frames import plan_cpu_frame

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")


@pytest.mark.parametrize(
    "name",
    [
        b"/torch_12_34_0",
        b"/torch_4294967295_18446744073709551615_7",
    ],
)
def test_torch_region_names_are_read_and_name_their_process(name: bytes) -> None:
    assert region_token(name) == name.split(b"_")[1]


@pytest.mark.parametrize(
    "name",
    [
        b"/aiostage-victim",  # another object of /dev/shm
        b"/tmp/torch-shm-dir-x/manager.sock\n/torch_1_2_3",  # a name as 4ae8ad0 sent them
        b"/torch_1_2_3/../../etc/passwd",
        b"torch_1_2_3",
        b"/torch_1_2",
        b"/torch_a_2_3",
        b"/torch_1_2_3\x00",
        b"",
    ],
)
def test_anything_else_is_not_a_region_name(name: bytes) -> None:
    with pytest.raises(ValueError, match="is not the name of a shared-memory region"):
        region_token(name)


@pytest.fixture
def shm_object() -> Iterator[tuple[bytes, Path]]:
    """A file of /dev/shm named as torch names regions (no process of that pid made it): 64
    bytes of reference count, then 10,000 bytes counting 0..255; removed afterwards."""
    name = f"/torch_999999999_{uuid.uuid4().int % 10**9}_0".encode()
    path = Path("/dev/shm" + name.decode())
    path.write_bytes(bytes(64) + bytes(i % 256 for i in range(10_000)))
    try:
        yield name, path
    finally:
        path.unlink(missing_ok=True)


async def test_a_region_of_the_announced_size_is_read_without_being_touched(
    shm_object: tuple[bytes, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, path = shm_object
    before = path.stat()
    region = await anyio.to_thread.run_sync(PeerRegion.open, name, 10_000)
    monkeypatch.setattr(shm, "_READ_CHUNK", 4096)  # three reads, in three worker threads
    dst = torch.zeros(9_000, dtype=torch.uint8)
    await region.read_into(dst)
    region.close()
    region.close()  # once
    assert torch.equal(dst, torch.arange(9_000) % 256)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("announced", [9_999, 10_001, 1 << 40])
def test_a_region_of_another_size_is_refused_and_not_grown(
    shm_object: tuple[bytes, Path], announced: int
) -> None:
    name, path = shm_object
    with pytest.raises(ValueError, match=f"holds 10000 bytes, not the {announced} announced"):
        PeerRegion.open(name, announced)
    assert path.stat().st_size == 10_064


async def test_a_region_that_shrinks_is_a_short_read_not_a_crash(
    shm_object: tuple[bytes, Path],
) -> None:
    name, path = shm_object
    region = await anyio.to_thread.run_sync(PeerRegion.open, name, 10_000)
    os.truncate(path, 64 + 100)  # the publisher's to do: mapped, this would be a SIGBUS
    try:
        with pytest.raises(ValueError, match="ends before the 10000 bytes announced"):
            await region.read_into(torch.zeros(10_000, dtype=torch.uint8))
    finally:
        region.close()


def test_what_is_not_a_regular_file_is_not_read(shm_object: tuple[bytes, Path]) -> None:
    name, path = shm_object
    link = Path("/dev/shm" + name.decode().replace("_0", "_1"))
    link.symlink_to(path)  # a link to a region: not followed
    try:
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            PeerRegion.open(b"/" + link.name.encode(), 10_000)
    finally:
        link.unlink()
    with pytest.raises(FileNotFoundError):
        PeerRegion.open(b"/torch_999999999_1_404", 10_000)  # not on this host


async def test_a_publishers_region_is_read_back_as_it_was_filled() -> None:
    planned = await anyio.to_thread.run_sync(plan_cpu_frame, {"w": torch.arange(1000.0)})
    region = await anyio.to_thread.run_sync(Region.create, planned.header.data_bytes)
    await anyio.to_thread.run_sync(fill_region, region, planned.header, planned.sources)
    opened = await anyio.to_thread.run_sync(PeerRegion.open, region.name, region.nbytes)
    dst = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    try:
        await opened.read_into(dst)
    finally:
        opened.close()
    assert torch.equal(dst.view(torch.float32), torch.arange(1000.0))
