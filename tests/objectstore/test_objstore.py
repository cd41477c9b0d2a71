"""The object-store backend against a real S3 server (moto on 127.0.0.1): round trips, damage,
crashes, overwrites and racing saves, retention, many ranks and ranged reads, a dead server, a
missing bucket, wrong credentials, a given store and the command line."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

pytest.importorskip("obstore")
import _s3_workers as workers
from obstore.store import S3Store

import aiostage
from aiostage.errors import CheckpointCorrupt, CheckpointNotFound, PersistenceError, UsageError
from aiostage.testing import run_world
from aiostage.testing._s3 import S3Server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def bucket(aiostage_s3_bucket: str) -> str:
    """A fresh bucket, the environment pointing at the server (the plugin's fixture)."""
    return aiostage_s3_bucket


@pytest.fixture
def s3_server(aiostage_s3_server: S3Server) -> S3Server:
    """The session's S3 server (the plugin's fixture)."""
    return aiostage_s3_server


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=gen)
    big = torch.randn(5 << 20, generator=gen)  # 20 MiB: a multipart upload
    return {
        "model": {"w": w, "tied": w, "row": w[3], "t": w.t(), "big": big},
        "opt": {"step": 7, "lr": 0.5, "betas": (0.9, 0.99), "name": "adam", "none": None},
        "empty": torch.empty(0, 3),
        "half": torch.arange(10, dtype=torch.bfloat16),
    }


async def _keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    return await anyio.to_thread.run_sync(server.keys, bucket, prefix)


def _saved(keys: list[str], step: str) -> list[str]:
    """``keys`` of a committed step as ``TOKEN/...`` (one save's objects) and the manifest."""
    out = []
    for k in keys:
        rest = k[len(step) + 1 :]
        out.append(re.sub(r"^[0-9a-f]{32}/", "TOKEN/", rest))
        assert k.startswith(step + "/"), k
    return out


async def _put(server: S3Server, bucket: str, key: str, body: bytes) -> None:
    await anyio.to_thread.run_sync(
        lambda: server.client().put_object(Bucket=bucket, Key=key, Body=body)
    )


async def test_a_round_trip_is_bit_exact(bucket: str, s3_server: S3Server) -> None:
    url = f"s3://{bucket}/run/step_000000001"
    sd = _state()
    report = await aiostage.save(sd, url, metadata={"k": 1})
    assert str(report.path) == url
    keys = await _keys(s3_server, bucket)
    assert _saved(keys, "run/step_000000001") == ["TOKEN/rank_00000.safetensors", "manifest.json"]
    loaded = await aiostage.load(url)
    m = loaded["model"]
    for k in ("w", "row", "t", "big"):
        assert torch.equal(m[k], sd["model"][k]), k
        assert m[k].stride() == sd["model"][k].stride(), k
    assert m["tied"].data_ptr() == m["w"].data_ptr()
    assert m["row"].untyped_storage().data_ptr() == m["w"].untyped_storage().data_ptr()
    assert loaded["opt"] == sd["opt"]
    assert torch.equal(loaded["half"], sd["half"])
    assert loaded["empty"].shape == (0, 3)
    assert await aiostage.load_metadata(url) == {"k": 1}
    into = {"model": {k: torch.zeros_like(v) for k, v in sd["model"].items()}}
    into = {**sd, **into}
    await aiostage.load(url, into=into)
    assert torch.equal(into["model"]["big"], sd["model"]["big"])


async def test_an_overwrite_replaces_the_data_and_a_refused_save_leaves_it(
    bucket: str, s3_server: S3Server
) -> None:
    url = f"s3://{bucket}/step_000000001"
    await aiostage.save({"w": torch.ones(3)}, url)
    first = await _keys(s3_server, bucket)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        await aiostage.save({"w": torch.zeros(3)}, url)
    assert await _keys(s3_server, bucket) == first  # the refused save left nothing
    await aiostage.save({"w": torch.zeros(3)}, url, overwrite=True)
    assert torch.equal((await aiostage.load(url))["w"], torch.zeros(3))
    keys = await _keys(s3_server, bucket)
    assert _saved(keys, "step_000000001") == ["TOKEN/rank_00000.safetensors", "manifest.json"]
    assert keys[0] != first[0]  # the old save's data object went once the new one committed


async def test_a_cancelled_overwrite_keeps_the_checkpoint(bucket: str, s3_server: S3Server) -> None:
    url = f"s3://{bucket}/run/step_000000002"
    await aiostage.save({"w": torch.arange(5.0)}, url)
    before = await _keys(s3_server, bucket)
    big = {f"t{i}": torch.full((2 << 20,), float(i)) for i in range(8)}  # 64 MiB: multipart
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: aiostage.save(big, url, overwrite=True))
        deadline = time.monotonic() + 60
        while not await anyio.to_thread.run_sync(s3_server.uploads, bucket, "run/"):
            assert time.monotonic() < deadline, "no upload began"
            await anyio.sleep(0.01)  # polling the server for the upload, not a synchronisation
        tg.cancel_scope.cancel()
    assert torch.equal((await aiostage.load(url))["w"], torch.arange(5.0))
    assert await _keys(s3_server, bucket) == before  # the cancelled save's objects are gone


async def test_of_two_racing_saves_one_commits_and_the_other_leaves_nothing(
    bucket: str, s3_server: S3Server
) -> None:
    url = f"s3://{bucket}/step_000000003"
    slow = {f"t{i}": torch.full((2 << 20,), float(i)) for i in range(8)}  # 64 MiB
    fast = {"t0": torch.full((4,), -1.0)}
    outcomes: dict[str, BaseException | None] = {}

    async def save(name: str, sd: dict[str, Any]) -> None:
        try:
            await aiostage.save(sd, url)
            outcomes[name] = None
        except FileExistsError as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(save, "slow", slow)
        deadline = time.monotonic() + 60
        while not await anyio.to_thread.run_sync(s3_server.uploads, bucket, "step_"):
            assert time.monotonic() < deadline, "no upload began"
            await anyio.sleep(0.01)  # polling the server for the upload, not a synchronisation
        tg.start_soon(save, "fast", fast)  # checks the step while the slow save uploads
    losers = [name for name, exc in outcomes.items() if exc is not None]
    assert len(losers) == 1, outcomes
    (winner,) = {"slow", "fast"} - set(losers)
    assert "overwrite=True" in str(outcomes[losers[0]])
    loaded = await aiostage.load(url)
    assert torch.equal(loaded["t0"], (slow if winner == "slow" else fast)["t0"])
    keys = await _keys(s3_server, bucket)
    assert _saved(keys, "step_000000003") == ["TOKEN/rank_00000.safetensors", "manifest.json"]


class _Gets:
    """WSGI middleware around the test server's app: the GET requests, by request path (the
    server's own counter counts bytes, which one GET or two of an object return alike)."""

    def __init__(self, app: Any) -> None:
        self.app, self.paths = app, Counter[str]()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") == "GET":
            self.paths[environ.get("PATH_INFO", "")] += 1
        return self.app(environ, start_response)


@pytest.fixture
def gets(s3_server: S3Server) -> Iterator[_Gets]:
    """The GETs the server answers while the test runs."""
    wsgi = s3_server._server._server  # werkzeug's server, as ``S3Server.start`` wraps it
    counter = wsgi.app = _Gets(wsgi.app)
    try:
        yield counter
    finally:
        wsgi.app = counter.app


async def test_a_whole_load_gets_each_data_object_once(
    bucket: str, s3_server: S3Server, gets: _Gets
) -> None:
    url = f"s3://{bucket}/whole"
    sd = {"a": torch.randn(3 << 20), "b": torch.arange(10.0)}  # 12 MiB: several chunks
    await aiostage.save(sd, url)
    (key,) = [k for k in await _keys(s3_server, bucket) if k.endswith(".safetensors")]
    path = f"/{bucket}/{key}"
    loaded = await aiostage.load(url)
    assert torch.equal(loaded["a"], sd["a"])
    assert gets.paths[path] == 1  # the header comes from the first bytes of the data's GET
    into = {"a": torch.zeros(3 << 20), "b": torch.zeros(10)}
    await aiostage.load(url, into=into)
    assert torch.equal(into["a"], sd["a"])
    assert gets.paths[path] == 2


async def test_a_flipped_byte_is_corrupt_naming_the_key(bucket: str, s3_server: S3Server) -> None:
    url = f"s3://{bucket}/c"
    await aiostage.save({"a": torch.ones(1000), "b": torch.zeros(1000)}, url)
    (key,) = [k for k in await _keys(s3_server, bucket) if k.endswith(".safetensors")]

    def flip() -> None:
        client = s3_server.client()
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[-1] ^= 0x40  # the last byte: inside the data of the last entry
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    await anyio.to_thread.run_sync(flip)
    with pytest.raises(CheckpointCorrupt, match=f"s3://{bucket}/{key}") as caught:
        await aiostage.load(url)
    assert caught.value.key in ("a", "b")


@pytest.mark.parametrize("where", ["a piece", "the last"])
async def test_a_flipped_byte_in_a_streamed_entry_stops_the_load_there(
    bucket: str, s3_server: S3Server, where: str
) -> None:
    # entries of 24 MiB are checked as they stream in, piece by piece (batches of 16 MiB): a
    # flip names its entry (in the first, the download stops there; moto's counter cannot show
    # it, as it counts a response's whole body)
    url = f"s3://{bucket}/c"
    sd = {"first": torch.ones(6 << 20), "mid": torch.zeros(6 << 20), "last": torch.ones(6 << 20)}
    await aiostage.save(sd, url)
    (key,) = [k for k in await _keys(s3_server, bucket) if k.endswith(".safetensors")]

    def flip() -> None:
        client = s3_server.client()
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        # 20 MiB into the data of "first" (the header is far smaller than 4 MiB), or the end
        at = len(data) - 3 * (24 << 20) + (20 << 20) if where == "a piece" else len(data) - 1
        data[at] ^= 0x40
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    await anyio.to_thread.run_sync(flip)
    with pytest.raises(CheckpointCorrupt, match=f"s3://{bucket}/{key}") as caught:
        await aiostage.load(url)
    assert caught.value.key == ("first" if where == "a piece" else "last")
    loaded = await aiostage.load(url, verify=False)  # salvage: no checksum compared
    assert torch.equal(loaded["mid"], sd["mid"])


async def test_a_killed_save_leaves_nothing_committed_and_sweep_clears_it(
    bucket: str, s3_server: S3Server
) -> None:
    root = f"s3://{bucket}/run"
    url = f"{root}/step_000000005"
    await aiostage.save({"w": torch.ones(2)}, f"{root}/step_000000003")
    committed = await _keys(s3_server, bucket)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=workers.save_forever, args=(url, s3_server.environ()))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not await anyio.to_thread.run_sync(s3_server.uploads, bucket, "run/"):
            assert child.is_alive(), "the save ended before its upload began"
            assert time.monotonic() < deadline, "no upload began"
            await anyio.sleep(0.05)  # polling the server for the upload, not a synchronisation
        os.kill(child.pid or 0, signal.SIGKILL)
    finally:
        await anyio.to_thread.run_sync(child.join, 30)
    assert child.exitcode == -signal.SIGKILL
    # the data objects of other killed saves: of a step never committed, and beside a committed
    # step's own (a save that lost its race, or an overwrite that never committed)
    orphan = "0123456789abcdef0123456789abcdef/rank_00000.safetensors"
    await _put(s3_server, bucket, f"run/step_000000004/{orphan}", b"x" * 100)
    await _put(s3_server, bucket, f"run/step_000000003/{orphan}", b"x" * 100)
    with pytest.raises(CheckpointNotFound):
        await aiostage.load(url)
    with pytest.raises(CheckpointNotFound):
        await aiostage.load(f"{root}/step_000000004")
    removed = sorted(str(p) for p in await aiostage.sweep(root))
    assert removed == [
        f"{root}/step_000000003/{orphan[:32]}",
        f"{root}/step_000000004/{orphan[:32]}",
    ]
    assert await _keys(s3_server, bucket) == committed
    await _put(s3_server, bucket, f"run/step_000000004/{orphan}", b"x" * 100)
    async with aiostage.Checkpointer(root) as ckpt:  # sweeps on entry
        assert await ckpt.latest() == 3
    assert await _keys(s3_server, bucket) == committed
    assert torch.equal((await aiostage.load(f"{root}/step_000000003"))["w"], torch.ones(2))
    # obstore cannot list or abort multipart uploads: the killed one stays for a lifecycle rule
    assert await anyio.to_thread.run_sync(s3_server.uploads, bucket, "run/") != []


async def test_the_checkpointer_keeps_the_last_two_steps(bucket: str, s3_server: S3Server) -> None:
    root = f"s3://{bucket}/run7"
    async with aiostage.Checkpointer(root, keep_last=2) as ckpt:
        for step in range(6):
            handle = await ckpt.save(step, {"w": torch.full((8,), float(step)), "step": step})
            await handle.committed
        assert ckpt.steps() == [4, 5]
        assert await ckpt.latest() == 5
        loaded = await ckpt.load()
    assert loaded["step"] == 5
    assert torch.equal(loaded["w"], torch.full((8,), 5.0))
    names = {k.split("/")[1] for k in await _keys(s3_server, bucket)}
    assert names == {"step_000000004", "step_000000005"}
    async with aiostage.Checkpointer(root) as again:
        assert again.steps() == [4, 5]


@pytest.mark.distributed
@pytest.mark.timeout(120)
async def test_two_ranks_save_dtensors_into_one_prefix_and_it_reshards_by_ranges(
    bucket: str, s3_server: S3Server
) -> None:
    step = "world/step_000000001"
    url = f"s3://{bucket}/{step}"
    results = await anyio.to_thread.run_sync(
        lambda: run_world(workers.save_and_load, 2, url, s3_server.environ(), timeout=100)
    )
    assert [(r["big"], r["shard"], r["into"]) for r in results] == [(True, True, True)] * 2
    assert results[0]["files"] == ("rank_00000.safetensors", "manifest.json")
    keys = await _keys(s3_server, bucket)
    assert _saved(keys, step) == [
        "TOKEN/rank_00000.safetensors", "TOKEN/rank_00001.safetensors", "manifest.json"
    ]  # fmt: skip
    # one process: rank 0's tensors and the whole DTensor, of which rank 1's object holds half
    other = keys[1]
    size = (await anyio.to_thread.run_sync(lambda: s3_server.client().head_object(
        Bucket=bucket, Key=other)))["ContentLength"]  # fmt: skip
    before = s3_server.sent(bucket, other)
    into = {**workers.rank_state(0), "d": torch.zeros(16, 8)}
    loaded = await aiostage.load(url, into=into)
    assert torch.equal(loaded["d"], workers.FULL)
    assert torch.equal(loaded["big"], workers.rank_state(0)["big"])
    fetched = s3_server.sent(bucket, other) - before
    assert 0 < fetched < size // 8, (fetched, size)  # its first MiB (header) and the shard


async def test_a_stopped_server_fails_the_save_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    server = await anyio.to_thread.run_sync(lambda: S3Server().start())
    for name, value in server.environ().items():
        monkeypatch.setenv(name, value)
    bucket = await anyio.to_thread.run_sync(server.bucket)
    url = f"s3://{bucket}/step_000000001"
    await anyio.to_thread.run_sync(server.stop)
    began = time.monotonic()
    with pytest.raises(PersistenceError, match=f"s3://{bucket}.*no response.*reachable"):
        await aiostage.save({"w": torch.ones(4)}, url)
    assert time.monotonic() - began < 30


async def test_a_missing_bucket_names_the_url_and_the_status(bucket: str) -> None:
    url = "s3://no-such-bucket-here/step_000000001"
    with pytest.raises(PersistenceError, match=r"no-such-bucket-here.*404 NoSuchBucket"):
        await aiostage.save({"w": torch.ones(4)}, url)
    with pytest.raises(aiostage.errors.PersistenceError, match=r"404 NoSuchBucket"):
        await aiostage.load(url)
    with pytest.raises(UsageError, match="no-such-bucket-here"):
        async with aiostage.Checkpointer("s3://no-such-bucket-here/run"):
            pass


async def test_the_command_line_reads_an_s3_checkpoint(bucket: str) -> None:
    root = f"s3://{bucket}/run"
    await aiostage.save({"w": torch.arange(6.0)}, f"{root}/step_000000003")
    cmd = [sys.executable, "-m", "aiostage"]
    listed = await anyio.run_process([*cmd, "ls", root], check=False)
    assert listed.returncode == 0, listed.stderr
    assert b"step_000000003" in listed.stdout
    assert b"committed" in listed.stdout
    shown = await anyio.run_process([*cmd, "inspect", f"{root}/step_000000003"], check=False)
    assert shown.returncode == 0, shown.stderr
    assert b"w" in shown.stdout
    checked = await anyio.run_process([*cmd, "verify", f"{root}/step_000000003"], check=False)
    assert checked.returncode == 0, checked.stderr


def test_a_url_without_obstore_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['obstore'] = None\n"
        "from aiostage._storage.locate import locate\n"
        "try:\n    locate('s3://bkt/x')\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "UsageError" in out.stdout, out
    assert "pip install 'aiostage[s3]'" in out.stdout, out


@pytest.fixture
def checked_credentials(bucket: str, s3_server: S3Server) -> Iterator[None]:
    """moto checks credentials meanwhile (once ``bucket`` exists): the test ones are unknown."""
    with s3_server.checking_credentials():
        yield


@pytest.mark.usefixtures("checked_credentials")
async def test_wrong_credentials_name_the_url_and_the_status(bucket: str) -> None:
    url = f"s3://{bucket}/step_000000001"
    with pytest.raises(PersistenceError, match=rf"s3://{bucket}.*HTTP 403.*credentials"):
        await aiostage.save({"w": torch.ones(4)}, url)
    with pytest.raises(PersistenceError, match=rf"s3://{bucket}.*HTTP 403"):
        await aiostage.load(url)


async def test_a_given_store_serves_its_prefix(
    bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = s3_server.environ()
    for name in env:  # the environment no longer reaches the server: only the store does
        monkeypatch.delenv(name)
    store = S3Store(
        bucket,
        endpoint=s3_server.endpoint,
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_REGION"],
        client_options={"allow_http": True},
    )
    aiostage.use_store("s3://models/run7", store)
    try:
        await aiostage.save({"w": torch.arange(3.0)}, "s3://models/run7/step_000000001")
        loaded = await aiostage.load("s3://models/run7/step_000000001")
    finally:
        aiostage.use_store("s3://models/run7", None)
    assert torch.equal(loaded["w"], torch.arange(3.0))
    keys = await _keys(s3_server, bucket)
    assert _saved(keys, "step_000000001") == ["TOKEN/rank_00000.safetensors", "manifest.json"]
    with pytest.raises(PersistenceError, match="s3://models/run7"):  # forgotten: no credentials
        await aiostage.load("s3://models/run7/step_000000001")


def test_use_store_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="obstore store"):
        aiostage.use_store("s3://models", object())
    with pytest.raises(UsageError, match="s3://"):
        aiostage.use_store(str(tmp_path), S3Store("b"))


def test_the_replica_store_stays_on_a_local_disk() -> None:
    with pytest.raises(UsageError, match=r"storage_dir='s3://bkt/replicas'.*local disk"):
        aiostage.ReplicationStager(storage_dir="s3://bkt/replicas")


async def test_a_checkpoint_copied_from_a_disk_loads(
    bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    await aiostage.save({"w": torch.arange(7.0)}, tmp_path / "step_000000009")

    def copy() -> None:
        for file in (tmp_path / "step_000000009").iterdir():
            key = f"run/step_000000009/{file.name}"
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=file.read_bytes())

    await anyio.to_thread.run_sync(copy)
    loaded = await aiostage.load(f"s3://{bucket}/run/step_000000009")
    assert torch.equal(loaded["w"], torch.arange(7.0))
    assert await aiostage.sweep(f"s3://{bucket}/run") == []


async def test_ls_of_one_checkpoint_url_never_resolves_it_on_the_local_disk(
    bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/run/step_000000003"
    await aiostage.save({"w": torch.arange(2.0)}, url)
    # what a local realpath of the URL would follow: s3:/BUCKET/run/step_000000003 -> elsewhere
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s3:" / bucket / "run").mkdir(parents=True)
    (tmp_path / "s3:" / bucket / "run" / "step_000000003").symlink_to(tmp_path / "elsewhere")
    cmd = [sys.executable, "-m", "aiostage", "ls", url]
    listed = await anyio.run_process(cmd, cwd=tmp_path, check=False)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.decode().splitlines()
    assert rows[1].split()[:2] == ["3", "committed"], rows
