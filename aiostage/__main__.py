"""The ``aiostage`` command line (``python -m aiostage``): parse, run a command, print, exit.

Exit status: 0 success, 1 ``verify`` found the checkpoint corrupt, 2 any other error (a bad
path, not a checkpoint, a corrupt file; an unexpected exception, a bug, as an "internal error"),
printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from ._cli import (
    Found,
    RankFile,
    checkpoint_manifest,
    export,
    plan,
    read_checkpoint,
    scan,
    scan_local,
    verify,
)
from ._core.dtypes import dtype_name
from ._core.tree import Leaf, MapNode, Node, SeqNode, Value, key_str
from ._format.hf import INDEX_NAME, parse_size
from .errors import AiostageError, CheckpointCorrupt, UsageError

__all__ = ["main"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aiostage`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Blocks the calling thread for the whole command. Returns the exit status (0 success, 1
    ``verify`` found corruption, 2 an error, whatever its class, 130 interrupted); raises only
    ``SystemExit``, from argparse, for a bad command line.
    """
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a name the terminal cannot show is escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        with warnings.catch_warnings():
            # torch warns that complex32 is experimental whenever one is made: noise beside the
            # one line a command prints (a checkpoint may hold complex32 tensors)
            warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
            status: int = anyio.run(args.run, args)
    except BrokenPipeError:  # the reader went away (``aiostage ls | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (AiostageError, OSError) as exc:
        print(f"aiostage {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aiostage {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the input's fault: still one line, never a traceback
        why = f"{type(exc).__name__}: {_one_line(exc)}"
        print(f"aiostage {args.command}: internal error: {why} (please report it)", file=sys.stderr)
        return 2
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiostage", description="Look into, check and convert aiostage checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list the checkpoints in a directory")
    ls.add_argument("root", type=Path, metavar="ROOT", nargs="?")
    ls.add_argument(
        "--local", type=Path, metavar="DIR", help="also list a node's local tier (local_dir=)"
    )
    ls.set_defaults(run=_ls)
    inspect = sub.add_parser("inspect", help="show a checkpoint's keys, metadata and files")
    inspect.add_argument("path", type=Path, metavar="PATH")
    inspect.set_defaults(run=_inspect)
    check = sub.add_parser("verify", help="check every file's checksums (reads all data)")
    check.add_argument("path", type=Path, metavar="PATH")
    check.set_defaults(run=_verify)
    _export_parser(sub)
    return parser


def _export_parser(sub: Any) -> None:
    """The ``export`` command's arguments (``sub``: the parser's sub-commands)."""
    out = sub.add_parser(
        "export", help="write a checkpoint (any world size) as whole tensors, for serving"
    )
    out.add_argument("path", type=Path, metavar="PATH")
    out.add_argument("--to", required=True, choices=("safetensors", "torch"), dest="fmt")
    out.add_argument("out", type=Path, metavar="OUT")
    out.add_argument(
        "--only", metavar="KEY", help="export only this sub-tree (dotted key, e.g. model)"
    )
    out.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help="safetensors only: OUT is a directory of shards of at most SIZE (5GB, 500MB) "
        f"and {INDEX_NAME}",
    )
    out.set_defaults(run=_export)


def _size(text: str) -> int:
    """``--max-shard-size``: bytes, or argparse's usage error naming the bad value."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message


# ---------------------------------------------------------------- the commands


async def _ls(args: argparse.Namespace) -> int:
    if args.root is None and args.local is None:
        raise UsageError("give ROOT (a checkpoint root), --local DIR (a local tier) or both")
    found = [("durable", f) for f in await scan(args.root)] if args.root is not None else []
    if args.local is not None:
        found += await scan_local(args.local)
        order = {"durable": 0, "local": 1, "replica": 2}
        found.sort(key=lambda t: (t[1].step is None, t[1].step or 0, order[t[0]], t[1].path))
    now = time.time()
    head = ("STEP", "STATUS", "SIZE", "AGE", *(("TIER",) if args.local else ()), "PATH")
    rows = [head, *(_ls_row(f, tier, args, now) for tier, f in found)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    if not found:
        where = " or ".join(str(p) for p in (args.root, args.local) if p is not None)
        print(f"(no checkpoints in {where})")
    return 0


def _ls_row(f: Found, tier: str, args: argparse.Namespace, now: float) -> tuple[str, ...]:
    """One line of ``ls``; with ``--local``, its tier, and a local copy's rank directory."""
    name = "." if f.path == args.root and tier == "durable" else f.path.name
    if tier != "durable":
        name = f"{f.path.parent.name}/{name}"
    where = f"{name}  ({f.note})" if f.note else name
    step = "-" if f.step is None else str(f.step)
    cells = (step, f.status, human_bytes(f.size), human_age(now - f.mtime))
    return (*cells, tier, where) if args.local is not None else (*cells, where)


async def _inspect(args: argparse.Namespace) -> int:
    manifest, files = await read_checkpoint(args.path)
    total = sum(rf.size for rf in files)
    n = len(files)
    print(f"{args.path}: world size {manifest.world_size}, {n} file(s), {human_bytes(total)}")
    print(f"metadata: {json.dumps(manifest.metadata, sort_keys=True)}")
    for rf in files:
        count, data = len(rf.header.records), human_bytes(rf.header.data_bytes)
        print(f"\n{rf.path.name} (rank {rf.header.rank}): {count} tensor(s), {data} of data")
        rows = tree_rows(rf)
        width = max((len(label) for label, _ in rows), default=0)
        for label, info in rows:
            print(f"  {label.ljust(width)}  {info}".rstrip())
    return 0


async def _verify(args: argparse.Namespace) -> int:
    try:
        manifest = await checkpoint_manifest(args.path)
    except CheckpointCorrupt as exc:
        print(f"CORRUPT {_one_line(exc)}")
        return 1
    with ProgressBar("verify", sum(f.size for f in manifest.files), sys.stderr) as bar:
        files, problems = await verify(args.path, bar)
    for problem in problems:
        print(f"CORRUPT {_one_line(problem)}")
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) in {manifest.world_size} file(s)")
        return 1
    tensors = sum(len(rf.header.records) for rf in files)
    print(f"{args.path}: OK ({len(files)} file(s), {tensors} tensor(s) verified)")
    return 0


async def _export(args: argparse.Namespace) -> int:
    todo = await plan(
        args.path, args.fmt, args.out, only=args.only, max_shard_size=args.max_shard_size
    )
    with ProgressBar("export", todo.nbytes, sys.stderr) as bar:
        files = await export(todo, bar)
    total = human_bytes(sum(size for _, size in files))
    if todo.directory:
        print(f"{args.out}: {len(files)} file(s), {total} ({args.fmt})")
    else:
        print(f"{args.out}: {total} ({args.fmt})")
    return 0


# ---------------------------------------------------------------- rendering


def tree_rows(rf: RankFile) -> list[tuple[str, str]]:
    """(indented key, description) for every node of ``rf``'s state dict, in order."""
    owner: dict[int, str] = {}
    rows: list[tuple[str, str]] = []

    def walk(node: Node, label: str, depth: int, path: tuple[Any, ...]) -> None:
        pad = "  " * depth
        if isinstance(node, Leaf):
            rows.append((pad + label, _tensor_info(rf, node.index, key_str(path), owner)))
        elif isinstance(node, Value):
            rows.append((pad + label, f"= {node.value!r:.60}"))
        elif isinstance(node, MapNode | SeqNode):
            keys = node.keys if isinstance(node, MapNode) else range(len(node.children))
            if depth >= 0:
                rows.append((pad + label, f"{len(node.children)} item(s)"))
            for k, child in zip(keys, node.children, strict=True):
                walk(child, str(k), depth + 1, (*path, k))

    walk(rf.root, "", -1, ())
    return rows


def _tensor_info(rf: RankFile, index: int, key: str, owner: dict[int, str]) -> str:
    r = rf.header.records[index]
    info = f"{dtype_name(r.dtype)} {list(r.shape)} {human_bytes(r.numel * r.dtype.itemsize)}"
    if r.entry < 0 or not r.numel:
        return info
    first = owner.setdefault(r.entry, key)
    shared = sum(1 for o in rf.header.records if o.entry == r.entry and o.numel) > 1
    return f"{info}  (shares storage with {first})" if shared and first != key else info


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_age(seconds: float) -> str:
    """``90`` -> ``"1m"``: the largest whole unit of an age."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


class ProgressBar:
    """A one-line progress bar on ``stream``, drawn only when it is a terminal.

    Call it with the bytes just done; ``with`` ends the line. Blocks on nothing but the write.
    """

    def __init__(self, label: str, total: int, stream: TextIO, width: int = 30) -> None:
        self.label, self.total, self.stream, self.width = label, max(total, 1), stream, width
        self.done, self._drawn = 0, 0.0
        self.enabled = stream.isatty()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None and self.done < self.total:
            self(self.total - self.done)  # headers are counted in the total, not reported
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __call__(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or self.done == self.total):
            self._drawn = now
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            pct = 100 * self.done // self.total
            size = f"{human_bytes(self.done)} / {human_bytes(self.total)}"
            self.stream.write(f"\r{self.label} [{bar}] {pct:3d}% {size}")
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
