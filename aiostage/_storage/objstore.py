"""The object-store backend of the storage seam: checkpoints as key prefixes in S3, GCS or Azure.

No rename exists on an object store. A save's private staging location is a prefix of its own
under the checkpoint's, named by its token (``step_000000100/<token>/rank_00000.safetensors``),
and the commit is one PUT of ``manifest.json`` listing those objects: a conditional create
(``If-None-Match: *``), so two racing saves never both commit a step and neither can touch the
other's data; or, to overwrite, a plain PUT that replaces the old manifest at once, after which
the old data objects are deleted. A prefix without a manifest is invisible to ``load``,
``latest`` and the Checkpointer; ``sweep`` removes the data objects no manifest lists.
Retention deletes the manifest first, then the data. Stores come from ``obstore``'s
``from_url``, which reads the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
credentials ...), or from ``aiostage.use_store``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import timedelta
from pathlib import PurePath
from typing import Any, Literal

import anyio
import anyio.to_thread
import obstore

from .._format.codec import MANIFEST, FileInfo, Manifest, decode_manifest, encode_manifest
from ..errors import CheckpointCorrupt
from .backend import Kind, Leftover, Sink
from .objpath import ObjectPath, given_store, split
from .objsink import (
    Incoming,
    Landed,
    Upload,
    call,
    download,
    download_begun,
    download_ranges,
    gather,
)

__all__ = ["ObjectStorage"]

#: retries of a failed request (5xx, connection errors, throttling), within ``retry_timeout``
_RETRY: Any = {
    "max_retries": 5,
    "retry_timeout": timedelta(seconds=60),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5)},
}
#: how long the process waits at exit, once it used a store (see ``_settle``)
_SETTLE_SECONDS = 0.05
_used: list[bool] = []
#: what a save puts under a checkpoint's prefix before its commit: its token's prefix, and in it
#: the data objects (a LIST without recursion shows the prefix alone, ``<token>/``)
_STAGED = re.compile(r"^(?P<token>[0-9a-f]{32})/(rank_\d{5}\.safetensors)?$")
#: a data object straight under the checkpoint's prefix (a checkpoint copied from a disk)
_PLAIN = re.compile(r"^rank_\d{5}\.safetensors$")
#: a read from an object's first byte fetches at least this many, kept for the reads and the
#: ``map`` that follow (a data file's header, then its data): about what one request costs
_HEAD_BYTES = 1 << 20
#: the objects whose first bytes are kept (the oldest read is dropped)
_KEPT = 4
#: the objects the current task reads whole (``reading_whole``), each with its GET once begun:
#: per task, so that two loads of one object at once never share a download
_WHOLE: ContextVar[dict[PurePath, Incoming | None]] = ContextVar("aiostage_whole")


def _settle() -> None:
    """At exit, give the client's threads a moment to finish the requests already answered.

    obstore 0.12 (through pyo3-async-runtimes) completes each request on a tokio thread that
    attaches to Python just after the awaiting coroutine resumed; if the interpreter is being
    finalized by then, the process aborts (SIGABRT: 2 of 12 runs of ``aiostage ls s3://...``;
    none of 60 short scripts with a wait of 20 ms, none of 20 ``ls`` runs with this one).
    """
    if _used:
        time.sleep(_SETTLE_SECONDS)


atexit.register(_settle)


class ObjectStorage:
    """Checkpoints as prefixes of an object store; one client per bucket, made on first use."""

    ordered = True  #: a file's bytes must be written in order (the writer sends the header first)

    def __init__(self) -> None:
        self._stores: dict[tuple[str, str], Any] = {}
        #: the manifest of each save, by its staging location, kept for ``commit`` to put
        self._manifests: dict[PurePath, bytes] = {}
        #: the first bytes of the objects last read from their start (see ``read``)
        self._heads: dict[PurePath, bytes] = {}

    def _where(self, location: PurePath) -> tuple[Any, str, str]:
        """The store, the key, and the URL of ``location``."""
        where = ObjectPath(location)
        given = given_store(where)
        _used[:] = [True]
        if given is not None:
            return given[0], given[1], str(where)
        scheme, bucket, key = split(where)
        store = self._stores.get((scheme, bucket))
        if store is None:
            # client options are left to the environment (AWS_ALLOW_HTTP ...): passing any
            # replaces those the environment gives
            store = obstore.store.from_url(f"{scheme}://{bucket}", retry_config=_RETRY)
            self._stores[scheme, bucket] = store
        return store, key, str(where)

    async def _list(self, location: PurePath, *, nested: bool) -> list[Mapping[str, Any]]:
        """Every object under ``location/`` (one level unless ``nested``; sub-prefixes as
        ``{"path": prefix + "/"}``)."""
        store, key, url = self._where(location)
        prefix = f"{key}/" if key else ""
        if not nested:
            got = await call(url, "LIST", obstore.list_with_delimiter_async(store, prefix or None))
            return [*got["objects"], *({"path": f"{p}/"} for p in got["common_prefixes"])]
        out: list[Mapping[str, Any]] = []
        stream = obstore.list(store, prefix or None, chunk_size=1000)
        while True:
            try:
                chunk = await call(url, "LIST", stream.__anext__())
            except StopAsyncIteration:
                return out
            out.extend(chunk)

    async def _names(self, location: PurePath, *, nested: bool = True) -> list[str]:
        """The keys under ``location/``, relative to it."""
        start = len(self._where(location)[1])
        return [
            o["path"][start + 1 if start else 0 :]
            for o in await self._list(location, nested=nested)
        ]

    async def _head(self, location: PurePath) -> Mapping[str, Any]:
        """The object's metadata. A HEAD's 404 has no body: a LIST then tells a missing bucket
        (its own error) from a missing object (``FileNotFoundError``)."""
        store, key, url = self._where(location)
        try:
            meta = await call(url, "HEAD", obstore.head_async(store, key))
        except FileNotFoundError:
            await self._list(location.parent, nested=False)
            raise
        return meta

    # ------------------------------------------------------------ reading and inspecting
    async def kind(self, location: PurePath) -> Kind:
        """A prefix holding a manifest is a checkpoint; one holding only the objects of
        unfinished saves is as good as absent; anything else there is "other"."""
        names = await self._names(location, nested=False)
        if not names:
            with contextlib.suppress(FileNotFoundError):
                await self._head(location)
                return "file"
            return "absent"
        return _kind(names)

    async def scan(self, root: PurePath, *, leftovers: bool = False) -> list[tuple[str, Kind]]:
        """``(name, kind)`` of every prefix and object directly under ``root`` (one LIST)."""
        groups = _group(await self._names(root))
        return sorted(
            (name, "file" if names is None else _kind(names)) for name, names in groups.items()
        )

    def leftover(self, name: str) -> Leftover | None:
        """None: an interrupted save leaves no temporary name, only a prefix with no manifest."""
        return None

    async def size(self, file: PurePath) -> int:
        """The object's size (a HEAD request)."""
        return int((await self._head(file))["size"])

    async def usage(self, location: PurePath) -> tuple[int, float]:
        """The bytes under ``location`` (or of the object) and the latest modification."""
        found = await self._list(location, nested=True)
        if not found:
            found = [await self._head(location)]
        return sum(o["size"] for o in found), max(o["last_modified"].timestamp() for o in found)

    async def read(self, file: PurePath, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of the object from ``offset`` (one ranged GET).

        A read of fewer than ``_HEAD_BYTES`` from the first byte fetches that many and keeps
        them when the object is longer: the read of a data file's header that follows the read
        of its length, and the ``map`` of its data, take them from there (two GETs of the object
        where three were; each costs a round trip, and moto reads the whole object for each).
        Anything this storage writes or deletes drops what it kept. Inside ``reading_whole``
        the bytes come from the object's one GET instead.
        """
        whole = _WHOLE.get({})
        if n > 0 and file in whole:
            begun = whole[file]
            if begun is None and offset == 0:
                begun = whole[file] = await self._get_whole(file)
            if begun is not None and offset >= begun.begin:
                return await begun.read(offset, n)
        store, key, url = self._where(file)
        head = self._heads.get(file)
        if n <= 0 or (head is not None and offset + n <= len(head)):
            await anyio.lowlevel.checkpoint()
            return head[offset : offset + n] if n > 0 and head is not None else b""
        keep = offset == 0 and n < _HEAD_BYTES
        got = await call(
            url,
            "GET",
            obstore.get_async(
                store, key, options={"range": (offset, offset + (_HEAD_BYTES if keep else n))}
            ),
        )
        body = bytes(await call(url, "GET", got.bytes_async()))
        if not keep or len(body) >= int(got.meta["size"]):  # no more to come: nothing to keep
            return body[:n]
        self._heads[file] = body
        while len(self._heads) > _KEPT:
            del self._heads[next(iter(self._heads))]
        return body[:n]

    @contextlib.contextmanager
    def reading_whole(self, file: PurePath) -> Iterator[None]:
        """Within (in this task): the first ``read`` of ``file`` from byte 0 starts one streamed
        GET of the whole object; reads take their bytes from it as they come, and the ``map``
        of ``file`` lands it, checked meanwhile (one GET of a data object, not two). On exit a
        GET nothing mapped is dropped, and its connection with it."""
        mine = {**_WHOLE.get({}), file: None}
        reset = _WHOLE.set(mine)
        try:
            yield
        finally:
            _WHOLE.reset(reset)
            got = mine.pop(file, None)
            if got is not None:
                got.close()

    async def _get_whole(self, file: PurePath) -> Incoming:
        """One streamed GET of the whole object, begun."""
        store, key, url = self._where(file)
        got = await call(url, "GET", obstore.get_async(store, key))
        return Incoming(got, url, 0, int(got.meta["size"]))

    def _begun(self, file: PurePath) -> Incoming | None:
        """The GET of ``file`` a read began (``reading_whole``), now the caller's to land."""
        whole = _WHOLE.get({})
        return whole.pop(file, None) if file in whole else None

    async def map(
        self, file: PurePath, size: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> memoryview:
        """The first ``size`` bytes in private memory: one streamed GET (after the first bytes,
        when a read kept them), or with ``ranges`` only those bytes (parallel ranged GETs; zeros
        elsewhere)."""
        if ranges is None:
            return await self.map_landing(file, size, None)
        begun = self._begun(file)
        if begun is not None:  # only some ranges after all: the whole object is not wanted
            begun.close()
        store, key, url = self._where(file)
        head = self._heads.pop(file, b"")
        return await download_ranges(store, key, url, size, ranges, head)

    async def map_landing(self, file: PurePath, size: int, landed: Landed | None) -> memoryview:
        """``map(file, size)``, telling ``landed`` (in a worker thread) each time the bytes
        before an offset have come in, in order: the caller checks them meanwhile."""
        begun = self._begun(file)
        if begun is not None:
            return await download_begun(begun, size, landed)
        store, key, url = self._where(file)
        return await download(store, key, url, size, self._heads.pop(file, b""), landed)

    # ------------------------------------------------------------ writing a checkpoint
    def staging(self, target: PurePath, token: str) -> PurePath:
        """``target/token``: the save's own prefix, which no other save writes into."""
        return target / token

    async def begin(self, target: PurePath, token: str) -> PurePath:
        """Nothing to create: the first upload makes the prefix."""
        await anyio.lowlevel.checkpoint()
        return self.staging(target, token)

    @contextlib.asynccontextmanager
    async def _create(self, file: PurePath) -> AsyncIterator[Sink]:
        store, key, url = self._where(file)
        self._heads.clear()
        hold = None
        if file.name == MANIFEST:  # kept for commit, which puts it beside the staging prefix
            hold = functools.partial(self._manifests.__setitem__, file.parent)
        async with anyio.create_task_group() as tg:
            upload = Upload(store, key, url, tg, hold=hold)
            try:
                yield upload
            except BaseException:
                upload.close()
                tg.cancel_scope.cancel()
                raise

    def create(
        self, file: PurePath, *, direct: bool
    ) -> contextlib.AbstractAsyncContextManager[Sink]:
        """A new object (the manifest is kept until ``commit``)."""
        return self._create(file)

    async def seal(self, staging: PurePath) -> None:
        """Nothing to do: a finished upload is durable."""
        await anyio.lowlevel.checkpoint()

    async def commit(self, staging: PurePath, target: PurePath, *, overwrite: bool) -> None:
        """Put the manifest, listing the objects under ``staging``, at ``target``: the commit.

        Shielded: once sent, the PUT may land, so it is seen through (a cancellation is
        delivered afterwards). A PUT that fails after it may have landed (a lost response, a
        retried conditional PUT refused) is checked by reading the manifest back.
        """
        body = await anyio.to_thread.run_sync(_rebased, self._manifests.pop(staging), staging.name)
        self._heads.clear()
        with anyio.CancelScope(shield=True):
            old = await self._listed(target) if overwrite else []
            store, key, url = self._where(target / MANIFEST)
            mode: Literal["create", "overwrite"] = "overwrite" if overwrite else "create"
            try:
                await call(
                    url, "the manifest's PUT", obstore.put_async(store, key, body, mode=mode)
                )
            except OSError as exc:
                if await self._committed(target, body):
                    return
                if isinstance(exc, FileExistsError):
                    why = "another save committed it first; pass overwrite=True to replace it"
                    raise FileExistsError(
                        errno.EEXIST, f"cannot save to {target}: {why}", str(target)
                    ) from exc
                raise
            with contextlib.suppress(OSError):  # committed: sweep finds what is left
                await self._delete(target, [f"{self._where(target)[1]}/{n}" for n in old])

    async def _committed(self, target: PurePath, body: bytes) -> bool:
        """Whether the manifest at ``target`` is ``body`` (names carry a save's token: only
        that save's manifest has these bytes)."""
        try:
            return await self.read(target / MANIFEST, 0, len(body) + 1) == body
        except OSError:
            return False

    async def _listed(self, target: PurePath) -> list[str]:
        """The data objects the manifest at ``target`` lists (none if it is missing or bad)."""
        file = target / MANIFEST
        try:
            raw = await self.read(file, 0, 64 << 20)
            manifest = await anyio.to_thread.run_sync(decode_manifest, raw, str(file))
        except (OSError, CheckpointCorrupt):
            return []
        return [f.name for f in manifest.files]

    async def discard(self, staging: PurePath) -> None:
        """Delete what a failed save wrote: everything under its own prefix."""
        self._manifests.pop(staging, None)
        with contextlib.suppress(OSError):
            found = await self._list(staging, nested=True)
            await self._delete(staging, [o["path"] for o in found])

    # ------------------------------------------------------------ retention and clean-up
    async def make_root(self, root: PurePath) -> None:
        """Nothing to create; one LIST checks that the bucket exists and the credentials work."""
        await self._list(root, nested=False)

    async def delete(self, location: PurePath, token: str) -> None:
        """Delete the manifest (the checkpoint vanishes), then the data objects."""
        store, key, url = self._where(location / MANIFEST)
        await call(url, "DELETE", obstore.delete_async(store, key))
        await self._delete(location, [o["path"] for o in await self._list(location, nested=True)])

    async def sweep(
        self, root: PurePath, on_stuck: Callable[[PurePath, OSError], None] | None = None
    ) -> list[PurePath]:
        """Delete the data objects under ``root`` that no manifest lists: those of saves that
        were interrupted, failed or overwritten. Returns each save prefix removed. Incomplete
        multipart uploads are invisible to this client: a bucket lifecycle rule aborts them."""
        removed: list[PurePath] = []
        for name, names in _group(await self._names(root)).items():
            for token, doomed in (await self._unlisted(root / name, names or [])).items():
                try:
                    await self._delete(
                        root / name, [f"{self._where(root / name)[1]}/{n}" for n in doomed]
                    )
                except OSError as exc:
                    if on_stuck is None:
                        raise
                    on_stuck(root / name / token, exc)
                    continue
                removed.append(root / name / token)
        return removed

    async def _unlisted(self, step: PurePath, names: list[str]) -> dict[str, list[str]]:
        """The objects of ``names`` (under ``step``) of saves its manifest does not list, by
        save token. The manifest is read only when that is not plain from the names: a
        committed step has one save's objects, or (copied from a disk) data objects of none."""
        staged: dict[str, list[str]] = {}
        for n in names:
            if (m := _STAGED.match(n)) is not None:
                staged.setdefault(m["token"], []).append(n)
        if MANIFEST in names and staged:
            if len(staged) == 1 and not any(_PLAIN.match(n) for n in names):
                return {}
            listed = await self._listed(step)
            if not listed:  # unreadable or damaged: leave it for a person to look at
                return {}
            for n in listed:
                staged.pop(n.partition("/")[0], None)
        return staged

    async def _delete(self, location: PurePath, keys: list[str]) -> None:
        store, _, url = self._where(location)
        self._heads.clear()
        batches = [keys[i : i + 1000] for i in range(0, len(keys), 1000)]
        await gather(
            [lambda b=b: call(url, "DELETE", obstore.delete_async(store, b)) for b in batches]  # type: ignore[misc]
        )


def _rebased(raw: bytes, token: str) -> bytes:
    """The manifest ``raw`` with every data file named under the save's prefix ``token/``."""
    m = decode_manifest(raw, MANIFEST)
    files = tuple(FileInfo(f"{token}/{f.name}", f.size, f.header_xxh3) for f in m.files)
    return encode_manifest(Manifest(m.world_size, files, m.metadata))


def _kind(names: list[str]) -> Kind:
    """What a prefix holding ``names`` (a trailing ``/``: a sub-prefix) is."""
    if MANIFEST in names:
        return "checkpoint"
    return "absent" if all(_STAGED.match(n) for n in names) else "other"


def _group(names: list[str]) -> dict[str, list[str] | None]:
    """``names`` by their first part: the names below it, ``None`` for a name without one."""
    out: dict[str, list[str] | None] = {}
    for name in names:
        head, sep, rest = name.partition("/")
        if not sep:
            out[head] = None
        elif out.get(head, []) is not None:
            out.setdefault(head, []).append(rest)  # type: ignore[union-attr]
    return out
