"""Object-store benchmark: aiostage.save / load to a local S3 server, against the raw client's
multipart puts and gets of the same bytes (the limit) and DCP's fsspec path over s3fs.

Run: ``.venv/bin/python bench/object_store.py [--gib 1] [--reps 3] [--json PATH]`` (the shape
flags of the other benches work too; the default is ``flat``: 1 GiB in ~200 tensors). The
server is moto's S3 server (``aiostage.testing._s3``) in a child process on 127.0.0.1, so its
Python work does not share this process's GIL; it is slow itself, so the raw client's figures
are the limit the ratios are taken against. Every contender writes a fresh key prefix per rep
(the last rep's objects are deleted, untimed, before the next); contenders run round-robin.
GB/s is unique tensor bytes per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.to_thread
import obstore
import torch
from _lib import shapes
from _lib.report import GB, Ratio, Report, add_report_arguments, speedup, start
from _lib.timing import Case, Timing, run_rounds, timings
from obstore.store import S3Store, from_url
from torch.distributed.checkpoint import load as dcp_load_into
from torch.distributed.checkpoint import save as dcp_save_to
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import aiostage
from aiostage.testing import assert_state_dict_equal

HEADER = ("contender", "min", "median", "GB/s (median; best)", "loop max lag, median rep")
AIO_SAVE, AIO_LOAD = "aiostage.save", "aiostage.load"
RAW_PUT = "obstore multipart put, 16 MiB parts x 8 (limit)"
RAW_GET = "obstore streamed GET (limit)"
RAW_RANGES = "obstore ranged GETs, 64 MiB x 8"
DCP_SAVE = "dcp.save, FsspecWriter over s3fs"
DCP_LOAD = "dcp.load, FsspecReader over s3fs, into a template"
_MiB = 1 << 20
_SERVER = (
    "import sys\nfrom aiostage.testing._s3 import S3Server\n"
    "server = S3Server().start()\nprint(server.port, flush=True)\nsys.stdin.read()\n"
)
Op = Callable[[], Awaitable[Any]]


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in a child process; the environment that reaches it (set here too)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
        os.environ.update(env)
        yield env
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)


class Bucket:
    """The bench's bucket: a fresh key per contender and rep; the last one deleted before the
    next (untimed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.store: S3Store = from_url(f"s3://{name}")
        self.count: dict[str, int] = {}

    def key(self, contender: str, new: bool) -> str:
        """The contender's current key prefix (``new``: the next one)."""
        if new:
            self.count[contender] = self.count.get(contender, 0) + 1
        return f"{contender}/{self.count.get(contender, 0):04d}"

    async def clear(self, prefix: str) -> None:
        keys = [o["path"] async for chunk in obstore.list(self.store, prefix) for o in chunk]
        if keys:
            await obstore.delete_async(self.store, keys)


def storage_views(sd: Any) -> list[memoryview]:
    """The bytes of each unique storage of ``sd``, no copy."""
    out = []
    for s in shapes.unique_storages(sd):
        flat = torch.empty(0, dtype=torch.uint8).set_(s)
        out.append(memoryview(flat.numpy()).cast("B"))
    return out


async def raw_put(store: S3Store, key: str, views: list[memoryview]) -> None:
    """One object of the same bytes: multipart, 16 MiB parts, 8 in flight (aiostage's setting)."""
    await obstore.put_async(store, key, iter(views), chunk_size=16 * _MiB, max_concurrency=8)


async def raw_get(store: S3Store, key: str, size: int) -> bytearray:
    """The object streamed into preallocated memory, each chunk copied in a worker thread."""
    out = await anyio.to_thread.run_sync(bytearray, size)
    got = await obstore.get_async(store, key)
    pos = 0
    async for chunk in got.stream(min_chunk_size=16 * _MiB):
        n = len(chunk)
        await anyio.to_thread.run_sync(out.__setitem__, slice(pos, pos + n), memoryview(chunk))
        pos += n
    return out


async def raw_ranges(store: S3Store, key: str, size: int) -> bytearray:
    """The object by ranged GETs of 64 MiB, 8 at once."""
    out, limit = await anyio.to_thread.run_sync(bytearray, size), anyio.Semaphore(8)

    async def fetch(begin: int) -> None:
        end = min(begin + 64 * _MiB, size)
        async with limit:
            got = await obstore.get_range_async(store, key, start=begin, end=end)
        await anyio.to_thread.run_sync(out.__setitem__, slice(begin, end), memoryview(got))

    async with anyio.create_task_group() as tg:
        for begin in range(0, size, 64 * _MiB):
            tg.start_soon(fetch, begin)
    return out


def dcp_save(sd: Any, url: str) -> None:
    """``dcp.save`` through its fsspec writer (s3fs), no process group, on the loop thread."""
    dcp_save_to(sd, storage_writer=FsspecWriter(url, sync_files=False, thread_count=2))


def dcp_load(sd: Any, url: str) -> Any:
    template = shapes.tree_map(torch.empty_like, sd)
    dcp_load_into(template, storage_reader=FsspecReader(url))
    return template


def cases(sd: Any, bucket: Bucket, nbytes: int) -> tuple[list[Case], list[Case]]:
    """The save contenders (a fresh prefix each rep) and the load ones (each reads what its
    saver wrote last)."""
    views, url, store = storage_views(sd), f"s3://{bucket.name}", bucket.store

    def case(name: str, op: Callable[[str], Awaitable[Any]], reads: str | None = None) -> Case:
        async def before() -> None:
            if reads is None:
                await bucket.clear(bucket.key(name, False))
                bucket.key(name, True)
            await anyio.to_thread.run_sync(gc.collect)

        async def after(result: Any) -> None:
            del result
            gc.collect()

        return Case(name, lambda: op(bucket.key(reads or name, False)), before, after)

    async def on_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)  # synchronous, on the loop thread: how DCP is called

    saves = [
        case(AIO_SAVE, lambda k: aiostage.save(sd, f"{url}/{k}")),
        case(RAW_PUT, lambda k: raw_put(store, f"{k}/all.bin", views)),
        case(DCP_SAVE, lambda k: on_loop(dcp_save, sd, f"{url}/{k}")),
    ]
    loads = [
        case(AIO_LOAD, lambda k: aiostage.load(f"{url}/{k}"), AIO_SAVE),
        case(RAW_GET, lambda k: raw_get(store, f"{k}/all.bin", nbytes), RAW_PUT),
        case(RAW_RANGES, lambda k: raw_ranges(store, f"{k}/all.bin", nbytes), RAW_PUT),
        case(DCP_LOAD, lambda k: on_loop(dcp_load, sd, f"{url}/{k}"), DCP_SAVE),
    ]
    return saves, loads


def row(name: str, t: Timing, nbytes: int) -> list[str]:
    return [
        name,
        f"{t.min * 1e3:.0f} ms",
        f"{t.median * 1e3:.0f} ms",
        f"{nbytes / GB / t.median:.2f} ({nbytes / GB / t.min:.2f})",
        f"{t.lag_ms:.1f} ms",
    ]


def ratios(by: dict[str, Timing]) -> list[Ratio]:
    """Issue 14's targets: >= 0.9x the raw client, >= 1.5x DCP's fsspec path, lag <= 5 ms."""
    get = min(by[RAW_GET], by[RAW_RANGES], key=lambda t: t.median)
    return [
        speedup("save vs the raw multipart put", by[AIO_SAVE], by[RAW_PUT], 0.9),
        speedup("load vs the faster raw GET", by[AIO_LOAD], get, 0.9),
        speedup("save vs dcp.save over s3fs", by[AIO_SAVE], by[DCP_SAVE], 1.5),
        speedup("load vs dcp.load over s3fs", by[AIO_LOAD], by[DCP_LOAD], 1.5),
        Ratio("aiostage.save loop max lag (median rep)", by[AIO_SAVE].lag_ms, 5, False, " ms"),
        Ratio("aiostage.load loop max lag (median rep)", by[AIO_LOAD].lag_ms, 5, False, " ms"),
    ]


async def measure(sd: Any, bucket: Bucket, reps: int, report: Report) -> None:
    nbytes = shapes.unique_bytes(sd)
    gc.collect()
    gc.freeze()
    saves, loads = cases(sd, bucket, nbytes)
    await run_rounds(saves, reps)
    loaded = await aiostage.load(f"s3://{bucket.name}/{bucket.key(AIO_SAVE, False)}")
    assert_state_dict_equal(loaded, sd, check_aliasing=True)
    print("aiostage round trip: equal, aliasing kept", flush=True)
    del loaded
    await run_rounds(loads, reps)
    by_save, by_load = timings(saves), timings(loads)
    title = f"save, {reps} reps round-robin, a fresh prefix each"
    report.add(title, HEADER, [row(n, t, nbytes) for n, t in by_save.items()])
    title = f"load, {reps} reps round-robin"
    report.add(title, HEADER, [row(n, t, nbytes) for n, t in by_load.items()])
    report.add_timings("save", by_save, nbytes)
    report.add_timings("load", by_load, nbytes)
    report.ratios += ratios(by_save | by_load)


async def main(args: argparse.Namespace, shape: shapes.Shape, report: Report) -> None:
    sd = shape.state_dict()
    report.shape = shape.describe()
    with s3_server() as env:
        name = "bench"
        await anyio.to_thread.run_sync(_create_bucket, env, name)
        report.notes.append(
            f"server: moto {_moto_version()} in a child process at {env['AWS_ENDPOINT_URL']} "
            "(a Python server: its own limit is the raw client's figures); the host's cores are "
            "shared with other work (see the background line)"
        )
        await measure(sd, Bucket(name), args.reps, report)


def _create_bucket(env: dict[str, str], name: str) -> None:
    import boto3  # type: ignore[import-untyped]

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    ).create_bucket(Bucket=name)


def _moto_version() -> str:
    import moto

    return str(moto.__version__)


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, shapes.Shape]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    shapes.add_arguments(p)
    p.add_argument("--reps", type=int, default=3, help="timed reps per contender (default 3)")
    add_report_arguments(p)
    return shapes.parse(p, argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP without a process group
    args, shape = parse()
    report = start("object_store", args)
    asyncio.run(main(args, shape, report))
    report.finish(args.json)
    sys.exit(0)
