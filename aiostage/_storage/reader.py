"""``aiostage.load``: open a checkpoint, verify it, and rebuild the state dict or fill one in place.

The manifest says which files make the checkpoint and how big they are; a data file's header is
validated against its real size before anything is allocated. The data is mapped copy-on-write
and paged in by hashing it in worker threads (faster here than reading into fresh memory, and no
copy); every stored entry becomes one storage, every tensor a view into it, so aliasing survives.
Loading into another layout (``reshard``) maps the files of other ranks too, and reads only the
entries (verified) or pages (``verify=False``) of the saved shards it needs.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch
import xxhash

from .._core import cuda, dist, gc_pause
from .._core.buffers import run_whole
from .._core.storages import View, view_tensor
from .._core.tree import (
    NO_DATA,
    KeyPath,
    Node,
    TensorLeaf,
    Tree,
    Wrap,
    flatten,
    unflatten,
)
from .._format.codec import (
    MANIFEST,
    FileInfo,
    Header,
    Manifest,
    Record,
    decode_header,
    decode_manifest,
    header_length,
)
from .._format.records import check_attrs
from .._format.structure import decode_skeleton
from .._train_state import TrainState
from ..errors import CheckpointCorrupt, CheckpointNotFound, PersistenceError, UsageError
from .backend import MapsLanding, ReadsWhole, Storage
from .digests import ArrivalCheck, entry_keys, mismatched_entries
from .locate import PathLike, locate
from .reshard import Piece, Saved, check_local, copy_pieces, into_result, needs_reshard, plan_pieces

__all__ = ["load", "load_metadata", "read_header", "read_manifest"]

_MAX_MANIFEST = 64 << 20
_T = TypeVar("_T")


async def load(
    path: PathLike,
    *,
    into: Any = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    pg: Any = None,
) -> Any:
    """Read the checkpoint at ``path`` and return its state dict.

    Tensors that shared storage when saved share it again; DTensors come back as their local
    tensor. With ``into`` (a state dict of existing tensors, e.g. ``model.state_dict()``),
    every tensor is first checked against the checkpoint, then copied in place, and the result
    holds ``into``'s own tensor objects (and the checkpoint's non-tensor values);
    ``map_location`` is then ignored. With ``pg``, each rank reads the file it wrote. When
    ``into`` holds DTensors or the world or a layout differs, the checkpoint is resharded: each
    rank reads only the saved shards that overlap its part of each tensor, from any rank's file.
    A failed or cancelled load leaves ``into`` untouched or fully loaded, never half: nothing is
    copied before every check passed, and a copy once begun ends before a cancellation is raised.

    Blocks on nothing: reads, hashing and copies run in worker threads. Raises
    ``CheckpointNotFound`` (no manifest at ``path``), ``CheckpointCorrupt`` naming the file and
    key (a missing file; a checksum, size or header that does not match; ``verify=False``
    skips the checksum comparison, to salvage a damaged checkpoint), ``StateDictMismatch``
    listing every difference from ``into`` (before anything is copied) and ``UsageError`` when
    the world size differs from the saving one and there is no ``into``, or (before reading
    anything) when ``map_location`` is a CUDA device this process does not have.
    """
    if isinstance(into, TrainState):  # load into its state dict, then put that back
        loaded = await load(
            path, into=await into.state_dict(), map_location=map_location, verify=verify, pg=pg
        )
        await into.load_state_dict(loaded)
        return loaded
    after = cuda.current_streams()  # what copies into ``into`` wait for: noted before any await
    asked = torch.device(map_location)
    device = cuda.resolve(asked)  # a bare "cuda": this thread's device, noted before any await
    if into is None and device.type == "cuda":  # asking the driver may take a while
        await anyio.to_thread.run_sync(cuda.check_device, asked, "map_location")
    storage, target = locate(path)
    manifest = await read_manifest(storage, target)
    rank, world = dist.rank_and_size(pg) if pg is not None else (0, 1)
    if into is None and manifest.world_size != world:
        raise UsageError(
            f"{target} was saved by {manifest.world_size} rank(s); load it from a process group "
            f"of that size (pg=...), not from {world}, or pass into=... to reshard it"
        )
    where = _Where(
        storage, target, manifest, rank if rank < manifest.world_size else 0, rank, after
    )
    file, info = where.file(where.home)
    # no automatic collection until the per-tensor objects (header, key paths, leaves) are
    # freed: only the loaded state dict is left for the young collection that follows
    with gc_pause.paused(), contextlib.ExitStack() as whole:
        # the home file is read whole, unless resharding (known for sure only from its header:
        # then ``_load_into`` drops the download before reading other files)
        if (into is None or manifest.world_size == world) and isinstance(storage, ReadsWhole):
            whole.enter_context(storage.reading_whole(file))
        header, root, paths = await read_header(storage, file, info, verify, where.home)
        if into is None:
            data = await _verified_data(storage, file, info, header, paths, verify)
            parts: list[Any] = [header, root, paths]
            del header, root, paths  # freed by _build's worker thread, not on the loop
            build = cuda.bound(device, _build)
            return await anyio.to_thread.run_sync(build, data, parts, file, device)
        home: list[Any] = [header, root, paths]
        del header, root, paths  # _load_into frees them in a worker thread, not on the loop
        return await _load_into(where, home, verify, into, world, whole.close)


async def load_metadata(path: PathLike) -> dict[str, Any]:
    """The ``metadata`` the checkpoint at ``path`` was saved with (its manifest's copy).

    Reads only ``manifest.json``; raises ``CheckpointNotFound`` and ``CheckpointCorrupt``.
    """
    return (await read_manifest(*locate(path))).metadata


async def read_manifest(storage: Storage, target: Path) -> Manifest:
    """Read and validate ``target/manifest.json`` (``CheckpointNotFound`` if there is none).

    Its size is asked first, so a huge (or sparse) manifest is refused before a byte is read;
    one that is not a regular file (a link, a FIFO) is refused by the storage as corrupt."""
    file = target / MANIFEST
    try:
        size = await storage.size(file)
        if size > _MAX_MANIFEST:
            raise CheckpointCorrupt(
                f"{file}: {size} bytes, larger than a manifest may be ({_MAX_MANIFEST} bytes)",
                path=file,
            )
        raw = await storage.read(file, 0, size)
    except (FileNotFoundError, NotADirectoryError) as exc:
        hint = await _recoverable(storage, target)
        raise CheckpointNotFound(
            f"no checkpoint at {target} (no {MANIFEST}){hint}", path=target
        ) from exc
    except OSError as exc:
        raise PersistenceError(f"cannot read {file}: {exc}", path=file) from exc
    return decode_manifest(raw, str(file))


async def _recoverable(storage: Storage, target: Path) -> str:
    """A hint when an interrupted overwrite left the checkpoint under a temporary name."""
    try:
        names = [name for name, _ in await storage.scan(target.parent, leftovers=True)]
    except OSError:
        return ""
    for name in names:
        left = storage.leftover(name)
        if left is not None and left.name == target.name and left.interrupted == "overwrite":
            root = str(target.parent)
            return f"; an interrupted overwrite left it beside: run aiostage.sweep({root!r})"
    return ""


async def read_header(
    storage: Storage, file: Path, info: FileInfo, verify: bool, rank: int
) -> tuple[Header, Node, list[KeyPath]]:
    """Read, check and decode the header of ``file``, rank ``rank``'s data file as the manifest
    lists it in ``info`` (decoding in a worker thread). Raises ``CheckpointCorrupt``."""
    try:
        size = await storage.size(file)
        if size != info.size:
            raise CheckpointCorrupt(
                f"{file}: {size} bytes on disk but the manifest says {info.size} (truncated or "
                "replaced)",
                path=file,
            )
        first = await storage.read(file, 0, 8)
        body = await storage.read(file, 8, header_length(first, size, str(file)))
    except FileNotFoundError as exc:
        raise CheckpointCorrupt(f"{file}: listed in the manifest but missing", path=file) from exc
    except OSError as exc:
        raise PersistenceError(f"cannot read {file}: {exc}", path=file) from exc
    expect = info.header_xxh3 if verify else None
    return await anyio.to_thread.run_sync(_decode, first, body, size, file, rank, expect)


def _decode(
    first: bytes, body: bytes, size: int, file: Path, rank: int, expect: int | None
) -> tuple[Header, Node, list[KeyPath]]:
    """Check the header against its checksum ``expect`` (unless ``None``) and decode it (worker
    thread: both take time in proportion to the tensors it lists)."""
    if expect is not None:
        digest = xxhash.xxh3_64(first)
        digest.update(body)
        if digest.intdigest() != expect:
            raise CheckpointCorrupt(f"{file}: the header does not match its checksum", path=file)
    with gc_pause.paused():
        header = decode_header(body, size - len(first) - len(body), str(file))
        if header.rank != rank:
            raise CheckpointCorrupt(f"{file}: written by rank {header.rank}, not {rank}", path=file)
        root, paths = decode_skeleton(header.skeleton, len(header.records), str(file))
        return header, root, paths


async def _map_data(
    storage: Storage,
    file: Path,
    header: Header,
    start: int,
    verify: bool,
    only: Collection[int] | None = None,
) -> tuple[memoryview, list[int]]:
    """Map ``file`` copy-on-write and return its data (from byte ``start``), paged in.

    Every entry (or each of ``only``) is hashed chunk by chunk in worker threads, which is also
    what brings its pages in: afterwards touching a tensor never blocks on the disk. Returns the
    entries whose bytes do not match their checksums (none unless ``verify``). With ``only`` and
    not ``verify`` nothing is touched: only the pages a copy later reads come in. A storage
    that downloads the whole file in order (an object store) has each entry checked as soon as
    its bytes are in, while the rest is still on its way.
    """
    if only is None and isinstance(storage, MapsLanding):
        check = await anyio.to_thread.run_sync(ArrivalCheck, header, start) if verify else None
        try:
            got = await storage.map_landing(
                file, start + header.data_bytes, None if check is None else check.landed
            )
        except OSError as exc:
            raise PersistenceError(f"cannot map {file}: {exc}", path=file) from exc
        return got[start:], [] if check is None else check.mismatches()
    ranges = None
    if only is not None:  # the bytes of these entries only (an object store fetches just those)
        ranges = [(start + header.entries[e].begin, start + header.entries[e].end) for e in only]
    try:
        data = (await storage.map(file, start + header.data_bytes, ranges))[start:]
    except OSError as exc:
        raise PersistenceError(f"cannot map {file}: {exc}", path=file) from exc
    if only is not None and not verify:
        return data, []
    bad = await _mismatched(data, header, only)
    return data, bad if verify else []


#: bytes below which the entries are paged in and hashed by one thread, not two
_SPLIT = 64 << 20


async def _mismatched(data: memoryview, header: Header, only: Collection[int] | None) -> list[int]:
    """``mismatched_entries``, the entries cut in two runs of about equal bytes hashed at once:
    two threads page in (and hash) where one would leave the disk or a core idle."""
    halves = await anyio.to_thread.run_sync(_halves, header, only)
    if len(halves) == 1:
        return await mismatched_entries(data, header, halves[0])
    found: list[list[int]] = [[], []]

    async def check(k: int) -> None:
        found[k] = await mismatched_entries(data, header, halves[k])

    async with anyio.create_task_group() as tg:
        tg.start_soon(check, 0)
        tg.start_soon(check, 1)
    return found[0] + found[1]  # each in file order, the first half before the second


def _halves(header: Header, only: Collection[int] | None) -> list[Collection[int] | None]:
    """The entries (of ``only``, or all) in file order, cut where half their bytes lie before
    (worker thread); one run when they are few bytes."""
    entries = header.entries
    with gc_pause.paused():
        order = sorted(
            range(len(entries)) if only is None else only, key=lambda i: entries[i].begin
        )
        total = sum(entries[i].end - entries[i].begin for i in order)
        if total < _SPLIT or len(order) < 2:
            return [only]
        at, half = 0, total // 2
        for k, i in enumerate(order):
            at += entries[i].end - entries[i].begin
            if at >= half:
                return [order[: k + 1], order[k + 1 :]] if k + 1 < len(order) else [only]
    return [only]


async def _verified_data(
    storage: Storage,
    file: Path,
    info: FileInfo,
    header: Header,
    paths: Sequence[KeyPath],
    verify: bool,
    only: Collection[int] | None = None,
) -> memoryview:
    """``_map_data`` of ``file``, its checksums compared when ``verify``."""
    start = info.size - header.data_bytes
    data, bad = await _map_data(storage, file, header, start, verify, only)
    if bad:
        _check_sums(bad[0], header, paths, file)
    return data


def _check_sums(entry: int, header: Header, paths: Sequence[KeyPath], file: Path) -> None:
    """Raise ``CheckpointCorrupt`` for ``entry``, whose bytes do not match its checksum, naming
    the tensors stored in it."""
    keys = entry_keys(header, paths, entry)
    raise CheckpointCorrupt(
        f"{file}: checksum mismatch in entry {header.entries[entry].name!r} (tensor "
        f"{', '.join(keys)}): the data is corrupt; load an earlier checkpoint",
        path=file,
        key=keys[0] if keys else header.entries[entry].name,
    )


def _tensors(data: memoryview, header: Header, device: torch.device) -> list[torch.Tensor]:
    """One storage per entry (moved to ``device``), one view per record (worker thread)."""
    if device.type == "cpu":
        return _mapped_tensors(data, header)
    flats = [
        torch.frombuffer(data[e.begin : e.end], dtype=torch.uint8)
        if e.end > e.begin
        else torch.empty(0, dtype=torch.uint8)
        for e in header.entries
    ]
    if device.type != "cpu":
        flats = [t.to(device) for t in flats]
    storages = [t.untyped_storage() for t in flats]
    out = []
    for r in header.records:
        view = View(r.entry if r.numel else -1, r.offset, r.shape, r.stride, r.dtype)
        t = view_tensor(view, storages)
        out.append(t if t.device == device else t.to(device))
    return out


def _mapped_tensors(data: memoryview, header: Header) -> list[torch.Tensor]:
    """The records as CPU tensors over the mapped ``data``, no copy (worker thread).

    Each entry is its own storage, so tensors alias exactly as they did when saved. An entry
    that one record uses (most of them) becomes that tensor in two calls and one Python object
    (the collection after a load walks each); the storage of an entry that several records
    share is made once and viewed by each.
    """
    entries, records = header.entries, header.records
    users = Counter(r.entry for r in records)
    shared: dict[int, torch.UntypedStorage] = {}
    out = []
    for r in records:
        if users[r.entry] > 1 and r.numel:
            if r.entry not in shared:
                e = entries[r.entry]
                flat = torch.frombuffer(data[e.begin : e.end], dtype=torch.uint8)
                shared[r.entry] = flat.untyped_storage()
            view = View(0, r.offset, r.shape, r.stride, r.dtype)
            out.append(view_tensor(view, [shared[r.entry]]))
        elif r.numel:  # one Tensor object, over ``data`` itself (no memoryview per tensor)
            e, size = entries[r.entry], r.dtype.itemsize
            t = torch.frombuffer(
                data, dtype=r.dtype, count=(e.end - e.begin) // size, offset=e.begin
            )
            out.append(t.as_strided_(r.shape, r.stride, r.offset))
        else:
            out.append(torch.empty_strided(r.shape, r.stride, dtype=r.dtype))
        if not len(out) % _BREATHE:
            gc_pause.hand_over()
    return out


#: tensors built between two hand-overs of the GIL (well under a millisecond)
_BREATHE = 256


def _build(data: memoryview, parts: list[Any], file: Path, device: torch.device) -> Any:
    """The loaded state dict (worker thread). ``parts``: ``[header, root, paths]``, taken out of
    the list so that they are freed here, not on the loop (they hold thousands of objects)."""
    header, root, paths = parts
    parts.clear()
    with gc_pause.paused():
        leaves = []
        for p, r in zip(paths, header.records, strict=True):
            leaves.append(_leaf(p, r))
            if not len(leaves) % _BREATHE:
                gc_pause.hand_over()
        tensors = _tensors(data, header, device)
        out = unflatten(Tree(root, tuple(leaves)), tensors, copy_values=False)
        doomed = [*_parts(header), paths, leaves, tensors]
        del header, paths, leaves, tensors
        gc_pause.dismantle(doomed)
        return out


def _parts(header: Header) -> list[Any]:
    """The large parts of ``header``, for ``gc_pause.dismantle`` once the header is gone."""
    return [header.entries, header.records, header.skeleton, header.checksums]


def _leaf(path: KeyPath, r: Record) -> TensorLeaf:
    """How to wrap record ``r``: a DTensor comes back as its local shard (a Parameter if it was)."""
    was_param = r.wrap == "dtensor" and isinstance(r.dtensor, dict) and r.dtensor.get("param")
    wrap: Wrap = "parameter" if r.wrap == "parameter" or was_param else "tensor"
    attrs = check_attrs(r.attrs) if r.attrs is not None else {}  # checked as it was decoded
    return TensorLeaf(path, NO_DATA, wrap, r.requires_grad, attrs)


# ---------------------------------------------------------------- loading in place


def _after_caller(
    after: dict[torch.device, list[Any]], targets: Sequence[torch.Tensor], copy: Callable[[], _T]
) -> _T:
    """``copy()`` (copies into ``targets``, worker thread), on side streams that first wait for
    the caller's streams ``after`` on every CUDA device a target is on, and done when it
    returns: a caller's kernels still queued on a target are never overtaken, and nothing is
    left queued behind ``load``."""
    devices = {t.device for t in targets if t.is_cuda}
    if not devices:
        return copy()
    return cuda.SideStreams().ordered(devices, after, copy)


def _fill_into(
    data: memoryview,
    header: Header,
    targets: Sequence[torch.Tensor],
    root: Node,
    paths: list[KeyPath],
    into: Any,
) -> Any:
    """Copy each loaded tensor into its target (worker thread); ``into_result``."""
    sources = _tensors(data, header, torch.device("cpu"))
    with torch.no_grad():
        for i, dst in enumerate(targets):
            dst.copy_(sources[i])
            sources[i] = dst  # the loaded tensor is freed here, one at a time
    return into_result(root, paths, into)


async def _load_into(
    where: _Where,
    home: list[Any],
    verify: bool,
    into: Any,
    world: int,
    partly: Callable[[], None] = lambda: None,
) -> Any:
    """Check ``into`` against the checkpoint and copy into it, resharding when needed.
    ``home``: ``[header, root, paths]`` of this rank's file, taken out of the list; ``partly``
    is called once it is plain that the home file is not read whole (resharding)."""
    header, root, paths = home
    home.clear()
    file, info = where.file(where.home)
    same_world = where.manifest.world_size == world
    leaves, targets = await anyio.to_thread.run_sync(
        _local_targets, into, header, paths, str(file), same_world
    )
    if targets is None:
        partly()
        return await _load_resharded(where, leaves, header, verify, into, (root, paths))
    data = await _verified_data(where.storage, file, info, header, paths, verify)
    fill = functools.partial(_fill_into, data, header, targets, root, paths, into)
    out = await run_whole(_after_caller, where.after, targets, fill)
    doomed = [*_parts(header), paths, leaves, targets]
    del header, paths, leaves, targets, fill
    await anyio.to_thread.run_sync(gc_pause.dismantle, doomed)  # never on the loop thread
    return out


def _local_targets(
    into: Any, header: Header, paths: list[KeyPath], file: str, same_world: bool
) -> tuple[tuple[TensorLeaf, ...], list[torch.Tensor] | None]:
    """``into``'s leaves, and the tensors to copy the saved ones into (``check_local``), or
    ``None`` when the checkpoint must be resharded (a worker thread: both walk every tensor)."""
    with gc_pause.paused():
        leaves = flatten(into).leaves
        if not same_world or needs_reshard(leaves, paths, header.records):
            return leaves, None
        return leaves, check_local(leaves, paths, header.records, file)


# ---------------------------------------------------------------- loading into another layout


@dataclass(frozen=True, slots=True)
class _Where:
    """A checkpoint being loaded: its directory and manifest, this rank's home file and rank."""

    storage: Storage
    target: Path
    manifest: Manifest
    home: int
    rank: int
    #: the caller's CUDA streams by device, noted at ``load``'s entry (empty without CUDA)
    after: dict[torch.device, list[Any]]

    def file(self, rank: int) -> tuple[Path, FileInfo]:
        """The path and manifest entry of the file ``rank`` saved."""
        info = self.manifest.files[rank]
        return self.target / info.name, info


_Headers = list[tuple[Header, list[KeyPath]]]


async def _load_resharded(
    where: _Where,
    leaves: Sequence[TensorLeaf],
    home: Header,
    verify: bool,
    into: Any,
    tree: tuple[Node, list[KeyPath]],
) -> Any:
    """Fill ``into`` from the saved shards that overlap this rank's part of each tensor.

    Every file's header is read (to learn its shards); data is mapped only from the files
    that hold an overlapping shard, and only the entries read are verified.
    """
    root, paths = tree
    headers = await _read_headers(where, verify, home, paths)
    saved = [Saved(r, p, h.records, str(where.file(r)[0])) for r, (h, p) in enumerate(headers)]
    pieces, targets = await anyio.to_thread.run_sync(_plan_reads, leaves, saved, where)
    datas = await _map_needed(where, headers, pieces, verify)
    source = functools.partial(_record_tensor, datas, headers)
    await run_whole(
        _after_caller, where.after, targets, functools.partial(copy_pieces, pieces, targets, source)
    )
    return await anyio.to_thread.run_sync(into_result, root, paths, into)


def _plan_reads(
    leaves: Sequence[TensorLeaf], saved: list[Saved], where: _Where
) -> tuple[list[Piece], list[torch.Tensor]]:
    """``plan_pieces``, and the tensors the pieces fill (worker thread)."""
    with gc_pause.paused():
        pieces = plan_pieces(leaves, saved, where.home, where.rank)
        return pieces, [leaf.data for leaf in leaves]


async def _read_headers(
    where: _Where, verify: bool, home: Header, paths: list[KeyPath]
) -> _Headers:
    """Header and key paths of every saving rank's file (the home one is already read)."""
    out: _Headers = []
    for r in range(where.manifest.world_size):
        if r == where.home:
            out.append((home, paths))
            continue
        header, _, p = await read_header(where.storage, *where.file(r), verify, r)
        out.append((header, p))
    return out


async def _map_needed(
    where: _Where, headers: _Headers, pieces: Sequence[Piece], verify: bool
) -> dict[int, memoryview]:
    """Map the files the pieces read from; verify the entries they read (when ``verify``)."""
    needed = await anyio.to_thread.run_sync(_needed, headers, pieces)
    out: dict[int, memoryview] = {}
    for f, entries in sorted(needed.items()):
        out[f] = await _verified_data(where.storage, *where.file(f), *headers[f], verify, entries)
    return out


def _needed(headers: _Headers, pieces: Sequence[Piece]) -> dict[int, set[int]]:
    """The entries the pieces read, by file (worker thread)."""
    needed: dict[int, set[int]] = {}
    for p in pieces:  # a piece has elements, so its record has an entry
        needed.setdefault(p.file, set()).add(headers[p.file][0].records[p.record].entry)
    return needed


def _record_tensor(datas: dict[int, memoryview], headers: _Headers, f: int, i: int) -> torch.Tensor:
    """Record ``i`` of file ``f`` as a tensor over the mapped data (no page touched yet)."""
    header = headers[f][0]
    r = header.records[i]
    e = header.entries[r.entry]
    flat = torch.frombuffer(datas[f][e.begin : e.end], dtype=torch.uint8)
    return view_tensor(View(0, r.offset, r.shape, r.stride, r.dtype), [flat.untyped_storage()])
