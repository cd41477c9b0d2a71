"""One fuzz case: lay a mutated checkpoint out on disk, run every reader on it, judge what
happened.

The readers are ``aiostage.load`` (verified and not), ``load(into=...)``, ``load_metadata`` and,
when asked, each CLI command run in-process through ``aiostage.__main__.main``. A failure is
anything but an ``aiostage.errors`` exception (CLI: exit 0, 1 for ``verify`` or 2, one line on
stderr, no traceback), a loaded tensor torch cannot print, readers that disagree (``verify``
says OK where ``load`` refuses), a file written or changed outside the export's output, code
named by the file resolved or run, or a private file's bytes echoed in a message.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _sentinel
import anyio
from _seal import Ckpt

import aiostage
from aiostage.__main__ import main as cli_main
from aiostage.errors import AiostageError, CheckpointCorrupt

Failure = dict[str, Any]

#: a private file outside the checkpoint; its first 8 bytes as a number must never be echoed
SECRET = b"SECRET!!" + b"private key material\n"
_ECHOES = ("SECRET", str(int.from_bytes(SECRET[:8], "little")), "private key")
CKPT_NAME = "step_000000007"
#: the commands every CLI case runs: (name, arguments after the checkpoint's path)
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ls", ()),
    ("inspect", ()),
    ("verify", ()),
    ("export", ("--to", "safetensors", "{out}/x.safetensors")),
    ("export", ("--to", "torch", "{out}/x.pt")),
    ("export", ("--to", "safetensors", "{out}/shards", "--max-shard-size", "1KB")),
)


# ---------------------------------------------------------------- the case on disk


def lay_out(ck: Ckpt, case: Path) -> Path:
    """Write ``ck`` as ``case/step_000000007`` beside ``case/outside/secret`` and an empty
    ``case/out``; make its special files; return the checkpoint's path."""
    ckpt, outside, out = case / CKPT_NAME, case / "outside", case / "out"
    for d in (ckpt, outside, out):
        d.mkdir(parents=True)
    (outside / "secret").write_bytes(SECRET)
    (outside / "victim").write_bytes(b"must stay as it is\n")
    for name, blob in ck.files.items():
        kind = ck.special.get(name, "")
        path = ckpt / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
            (path / "inside").write_bytes(blob[:64])
        elif kind.startswith("link-"):
            target = {"secret": outside / "secret", "loop": path, "dir": outside}.get(kind[5:])
            if target is None:
                (ckpt / f".{name}.copy").write_bytes(blob)
                target = Path(f".{name}.copy")
            path.symlink_to(target)
        elif kind != "absent":
            path.write_bytes(blob)
            if kind.startswith("sparse:"):
                os.truncate(path, int(kind[7:]))
    if ck.plant:
        for name in (".x.safetensors.partial", ".x.pt.partial", "x.safetensors.partial"):
            (out / name).symlink_to(outside / "victim")
    return ckpt


def snapshot(case: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``case`` but ``out/``: its type, size and modification time (never
    opening one: a FIFO would block)."""
    seen: dict[str, tuple[int, ...]] = {}
    for folder, dirs, names in os.walk(case):
        if Path(folder) == case:
            dirs[:] = [d for d in dirs if d != "out"]
        for name in (*dirs, *names):
            st = os.lstat(os.path.join(folder, name))
            seen[os.path.relpath(os.path.join(folder, name), case)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
            )
    return seen


# ---------------------------------------------------------------- judging


def _where(exc: BaseException) -> str:
    """The deepest aiostage frame of ``exc``'s traceback (else its deepest frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}aiostage{os.sep}" in f.filename]
    if not (ours or frames):
        return "?"
    f = (ours or frames)[-1]
    tail = f.filename.split(f"{os.sep}aiostage{os.sep}", 1)[-1]
    return f"{tail}:{f.name}"


def failure(check: str, target: str, what: str, where: str = "") -> Failure:
    """A failure record (JSON)."""
    return {"check": check, "target": target, "type": what[:80], "where": where}


def _judge_exc(target: str, exc: BaseException) -> Failure | None:
    if isinstance(exc, AiostageError):
        return None
    f = failure("exception", target, type(exc).__name__, _where(exc))
    f["message"] = " ".join(str(exc).split())[:300]
    return f


async def _resave(result: Any, out: Path) -> BaseException | None:
    """Save what ``load`` returned again: what a reader accepts, the writer must accept too
    (a quantized dtype, a namedtuple field, an attribute only a forged file can hold...)."""
    try:
        await aiostage.save(result, out)
    except Exception as exc:
        return exc
    return None


# ---------------------------------------------------------------- the readers


async def _outcome(call: Callable[[], Any]) -> Any:
    """What ``await call()`` returns, or the exception it raised."""
    try:
        return await call()
    except Exception as exc:
        return exc


async def _api(ckpt: Path, template: Any) -> dict[str, Any]:
    calls: dict[str, Callable[[], Any]] = {
        "load": lambda: aiostage.load(ckpt),
        "load(verify=False)": lambda: aiostage.load(ckpt, verify=False),
        "load_metadata": lambda: aiostage.load_metadata(ckpt),
        "load(into=...)": lambda: aiostage.load(ckpt, into=template),
    }
    out: dict[str, Any] = {name: await _outcome(call) for name, call in calls.items()}
    if not isinstance(out["load"], BaseException):
        out["resave"] = await _resave(out["load"], ckpt.parent / "out" / "resave")
    return out


def _cli(argv: list[str]) -> tuple[Any, str, str]:
    """``main(argv)`` in-process: (exit status or the exception it let out, stdout, stderr)."""
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc: Any = cli_main(argv)
        except SystemExit as exc:
            rc = f"SystemExit({exc.code})"
        except Exception as exc:
            rc = exc
    return rc, o.getvalue(), e.getvalue()


def _judge_cli(name: str, rc: Any, err: str, out_dir: Path, before: set[str]) -> Failure | None:
    """A CLI failure: an exception let out, an odd status, a traceback or more than one line
    on stderr, or a failed export that left a file in ``out_dir`` (holding ``before``)."""
    if isinstance(rc, BaseException):
        f = failure("cli", name, type(rc).__name__, _where(rc))
        f["message"] = " ".join(str(rc).split())[:300]
        return f
    ok = (0, 2, 1) if name == "verify" else (0, 2)
    if rc not in ok:
        return failure("cli", name, f"exit {rc}")
    one_line = rc == 0 or (rc == 1 and not err) or len(err.strip().splitlines()) == 1
    if "Traceback" in err or not one_line:  # verify's exit 1 reports on stdout
        return failure("cli", name, f"exit {rc} with {len(err.splitlines())} stderr lines")
    if name.startswith("export") and rc != 0 and set(os.listdir(out_dir)) != before:
        return failure("cli", name, "a failed export left files behind")
    return None


def run_cli(ckpt: Path, case: Path) -> tuple[dict[str, Any], list[Failure], list[str]]:
    """Every command of ``COMMANDS`` on ``ckpt``: statuses, failures, everything printed."""
    out_dir = case / "out"
    codes, failures, texts = {}, [], []
    for i, (command, extra) in enumerate(COMMANDS):
        path = case if command == "ls" else ckpt
        argv = [command, str(path), *(a.format(out=out_dir) for a in extra)]
        name = f"{command}#{i}" if command == "export" else command
        before = set(os.listdir(out_dir))
        rc, out, err = _cli(argv)
        codes[name] = rc
        texts += [out, err]
        f = _judge_cli(name, rc, err, out_dir, before)
        if f is not None:
            f["message"] = " ".join(err.split())[-300:] or f.get("message", "")
            failures.append(f)
    return codes, failures, texts


def _agree(api: dict[str, Any], codes: dict[str, Any]) -> list[Failure]:
    """Readers that disagree: ``verify`` or ``inspect`` accepting what ``load`` refuses."""
    out = []
    load, noverify = api["load"], api["load(verify=False)"]
    if isinstance(load, CheckpointCorrupt) and codes.get("verify") == 0:
        out.append(failure("agree", "verify", "OK where load raises CheckpointCorrupt"))
    if isinstance(noverify, CheckpointCorrupt) and codes.get("inspect") == 0:
        out.append(failure("agree", "inspect", "exit 0 where load(verify=False) is corrupt"))
    if not isinstance(load, BaseException) and codes.get("verify") not in (None, 0):
        out.append(failure("agree", "verify", "refuses what load accepts"))
    return out


def run_case(ck: Ckpt, case: Path, template: Any, cli: bool) -> list[Failure]:
    """Lay ``ck`` out under ``case`` (removed after), run the readers, return the failures."""
    ckpt = lay_out(ck, case)
    before = snapshot(case)
    api = anyio.run(_api, ckpt, template)
    failures = [
        f for t, r in api.items() if isinstance(r, BaseException) and (f := _judge_exc(t, r))
    ]
    resaved = api.pop("resave", None)
    if resaved is not None:
        f = failure("resave", "save(load(...))", type(resaved).__name__, _where(resaved))
        failures.append({**f, "message": " ".join(str(resaved).split())[:300]})
    texts = [str(r) for r in api.values() if isinstance(r, BaseException)]
    if cli:
        codes, more, printed = run_cli(ckpt, case)
        failures += more + _agree(api, codes)
        texts += printed
    failures += _trespass(case, before, texts)
    shutil.rmtree(case)
    return failures


def _trespass(case: Path, before: dict[str, tuple[int, ...]], texts: list[str]) -> list[Failure]:
    """Files written outside the output, code resolved, private bytes echoed."""
    out = []
    after = snapshot(case)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        out.append(failure("wrote", "fs", f"changed {changed[:3]}"))
    if _sentinel.TRIPPED or "_tripwire" in sys.modules:
        out.append(failure("code", "import", f"ran {_sentinel.TRIPPED[:3]}"))
        _sentinel.TRIPPED.clear()
        sys.modules.pop("_tripwire", None)
    if any(echo in text for text in texts for echo in _ECHOES):
        out.append(failure("echo", "message", "a private file's bytes appear in a message"))
    return out
