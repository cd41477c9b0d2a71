"""The command line on hostile and odd checkpoints: every command answers with an exit status
and one line, never a traceback; export assembles nothing larger than the checkpoint and writes
nothing through a planted symlink.

The checkpoints are real ones written by ``aiostage.save``, some with header records rewritten
(and the manifest's header checksum made to match, as a crafted file would). A few cases run
``python -m aiostage`` as a real process; the matrix calls ``main`` in this process (what
``python -m aiostage`` runs), to stay quick.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import xxhash

import aiostage
from aiostage.__main__ import main
from aiostage._format.codec import MANIFEST, rank_file
from aiostage._storage import export, localfs

pytestmark = pytest.mark.timeout(120)

Json = Any
P = collections.namedtuple("P", "a b")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m aiostage ARGS``: its exit status and output."""
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def assert_one_line(out: subprocess.CompletedProcess[str], *words: str) -> None:
    """Refused: status 1 or 2, one line on stderr holding ``words``, no traceback."""
    assert out.returncode in (1, 2), out
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def save(path: Path, sd: Any) -> Path:
    anyio.run(lambda: aiostage.save(sd, path))
    return path


def rewrite_header(ckpt: Path, edit: Callable[[dict[str, Json]], None]) -> Path:
    """Let ``edit`` change the aiostage metadata of rank 0's header (its ``tensors`` and
    ``tree``), write it back in the same length and give the manifest its new checksum."""
    file = ckpt / rank_file(0)
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    top = json.loads(raw[8 : 8 + n])
    meta = json.loads(top["__metadata__"]["aiostage"])
    edit(meta)
    top["__metadata__"]["aiostage"] = json.dumps(meta)
    body = json.dumps(top).encode()
    assert len(body) <= n, "the edit does not fit the header's padding"
    raw[8 : 8 + n] = body.ljust(n, b" ")
    file.write_bytes(bytes(raw))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][0]["header_xxh3"] = f"{xxhash.xxh3_64(bytes(raw[: 8 + n])).intdigest():016x}"
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return ckpt


def set_record(i: int, **fields: Json) -> Callable[[dict[str, Json]], None]:
    def edit(meta: dict[str, Json]) -> None:
        meta["tensors"][i].update(fields)

    return edit


def replace_in_tree(old: str, new: str) -> Callable[[dict[str, Json]], None]:
    def edit(meta: dict[str, Json]) -> None:
        text = json.dumps(meta["tree"])
        assert old in text
        meta["tree"] = json.loads(text.replace(old, new))

    return edit


def hostile(root: Path) -> dict[str, Path]:
    """The checkpoints of issue 13 item 4 and their kin, by name."""
    sizes = save(root / "size", {"w": torch.ones(2), "v": torch.Size([3])})
    repeated = save(root / "repeated", {"w": torch.ones(1)})  # 4 bytes, viewed as 2**40 floats
    whole = save(root / "whole", {"w": torch.ones(1)})  # a DTensor whose whole is 4 TiB
    overflow = save(root / "overflow", {"w": torch.ones(1)})
    return {
        "size": rewrite_header(sizes, replace_in_tree('{"size": [3]}', f'{{"size": [{2**70}]}}')),
        "repeated": rewrite_header(repeated, set_record(0, shape=[2**40], stride=[0])),
        "whole": rewrite_header(
            whole,
            set_record(
                0,
                shape=[2**40],
                stride=[0],
                wrap="dtensor",
                dtensor={"shape": [2**40], "placements": [["replicate"]], "mesh": [0]},
            ),
        ),
        "overflow": rewrite_header(overflow, set_record(0, shape=[2**32, 2**32], stride=[0, 0])),
        "qint8": rewrite_header(
            save(root / "qint8", {"w": torch.ones(4)}), set_record(0, dtype="qint8")
        ),
    }


# ---------------------------------------------------------------- the cases, as processes


def test_inspect_of_a_size_too_large_is_one_line(tmp_path: Path) -> None:
    ckpt = hostile(tmp_path)["size"]
    assert_one_line(run_cli("inspect", ckpt), str(ckpt))


def test_export_to_torch_writes_namedtuples_as_plain_tuples(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "nt", {"w": torch.ones(2), "nt": P(1, torch.arange(3))})
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "out.pt")
    assert out.returncode == 0, out
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert type(got["nt"]) is tuple
    assert got["nt"][0] == 1
    assert torch.equal(got["nt"][1], torch.arange(3))
    assert torch.equal(got["w"], torch.ones(2))


def test_a_repeated_view_is_refused_by_safetensors_before_allocating(tmp_path: Path) -> None:
    ckpt = hostile(tmp_path)["repeated"]
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "out.safetensors")
    assert_one_line(out, "w:", "4398046511104 bytes", "--to torch")
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # no staging left


def test_names_the_terminal_cannot_show_are_escaped(tmp_path: Path) -> None:
    ckpt = Path(os.fsdecode(bytes(tmp_path) + b"/\xffckpt"))  # not UTF-8: a surrogate in str
    save(ckpt, {"w": torch.ones(2), "ключ": torch.ones(1)})
    cmd: list[str | bytes] = [sys.executable, "-m", "aiostage", "inspect", os.fsencode(ckpt)]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out
    assert "\\udcffckpt: world size 1" in out.stdout
    assert "\\u043a\\u043b\\u044e\\u0447  float32 [1]" in out.stdout


# ---------------------------------------------------------------- every command, in process


COMMANDS: list[list[str]] = [
    ["ls", "{root}"],
    ["inspect", "{ckpt}"],
    ["verify", "{ckpt}"],
    ["export", "{ckpt}", "--to", "torch", "{out}.pt"],
    ["export", "{ckpt}", "--to", "safetensors", "{out}.safetensors"],
    ["export", "{ckpt}", "--to", "safetensors", "--max-shard-size", "1KB", "{out}.d"],
]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)`` in this process: its status and stderr (nothing may escape it)."""
    status = main(argv)
    return status, capsys.readouterr().err


#: what each hostile checkpoint makes each command (by its name, or export's format) refuse
REFUSED = {
    "size": {"inspect", "verify", "torch", "safetensors"},  # not a size torch can hold
    "overflow": {"inspect", "verify", "torch", "safetensors"},  # more elements than an int64
    "qint8": {"inspect", "verify", "torch", "safetensors"},  # a dtype save never writes
    "repeated": {"safetensors"},  # 4 TiB whole; a torch file keeps the 4-byte view
    "whole": {"torch", "safetensors"},  # a DTensor whose whole is 4 TiB
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_no_command_shows_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    ckpt = hostile(tmp_path / "root")[name]
    for k, command in enumerate(COMMANDS):
        argv = [a.format(root=ckpt.parent, ckpt=ckpt, out=tmp_path / f"out{k}") for a in command]
        status, err = run_main(argv, capsys)
        assert len(err.strip().splitlines()) <= 1, (argv, err)
        if (argv[3] if command[0] == "export" else command[0]) not in REFUSED[name]:
            assert status == 0, (argv, err)
            continue
        assert status in (1, 2), (argv, status, err)
        if command[0] != "verify":  # verify lists what it finds on stdout
            assert err.startswith(f"aiostage {command[0]}: error: "), err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_what_torch_save_cannot_hold_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints aiostage itself writes, which ``torch.save`` cannot hold as they are."""
    x = torch.ones(4)
    dual = save(tmp_path / "dual", {"a": x, "b": x.view(torch.int32)})
    odd = torch.ones(3)
    odd.__dict__["shape"] = 5  # an attribute torch.load would have to set, and cannot
    attr = save(tmp_path / "attr", {"t": odd})
    status, err = run_main(["export", str(dual), "--to", "torch", str(tmp_path / "a.pt")], capsys)
    assert status == 2
    assert "b: it views the storage of a as torch.int32" in err
    status, err = run_main(["export", str(attr), "--to", "torch", str(tmp_path / "b.pt")], capsys)
    assert status == 2
    assert "t: its attribute 'shape'" in err
    for ckpt in (dual, attr):  # safetensors copies each tensor: both export
        status, err = run_main(["export", str(ckpt), "--to", "safetensors", f"{ckpt}.st"], capsys)
        assert status == 0, err
    assert not (tmp_path / "a.pt").exists()
    assert not (tmp_path / "b.pt").exists()


def test_an_unexpected_exception_is_one_line_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The backstop: a bug (here a write hook raising what no writer expects) is still one line."""
    ckpt = save(tmp_path / "ckpt", {"w": torch.ones(2)})

    def broken(name: str, offset: int, n: int) -> None:
        raise ZeroDivisionError("a bug")

    localfs.write_hooks.append(broken)
    try:
        status, err = run_main(["export", str(ckpt), "--to", "torch", str(tmp_path / "o")], capsys)
    finally:
        localfs.write_hooks.remove(broken)
    assert status == 2
    assert err == "aiostage export: internal error: ZeroDivisionError: a bug (please report it)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the staging went too


# ---------------------------------------------------------------- temporaries


def plant(at: Path, target: Path) -> None:
    at.symlink_to(target, target_is_directory=target.is_dir())


def test_symlinks_planted_at_every_guessable_name_are_never_written_through(
    tmp_path: Path,
) -> None:
    ckpt = save(tmp_path / "ckpt", {"w": torch.ones(2), "n": 3})
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    exports = tmp_path / "exports"
    exports.mkdir()
    guesses = [".{}.partial", ".{}.tmp", "{}.tmp", ".{}.aiostage-tmp-" + "0" * 32]
    for name in ("model.pt", "model.safetensors", "shards"):
        for guess in guesses:
            plant(exports / guess.format(name), victim)
        plant(exports / f".{name}.aiostage-tmp-{'1' * 32}", outside)
    for fmt, name in (("torch", "model.pt"), ("safetensors", "model.safetensors")):
        out = run_cli("export", ckpt, "--to", fmt, exports / name)
        assert out.returncode == 0, out
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert torch.equal(torch.load(exports / "model.pt", weights_only=True)["w"], torch.ones(2))


async def test_the_staging_directory_is_created_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the random name guessed, ``mkdir`` fails on what was planted there: nothing is
    written through it, and what it points to is left alone."""
    ckpt = tmp_path / "ckpt"
    await aiostage.save({"w": torch.ones(2)}, ckpt)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "model.pt"
    token = "ab" * 16
    plant(localfs.temp_path(out, token), outside)
    plan = await export.plan_export(ckpt, "torch", out)
    monkeypatch.setattr(secrets, "token_hex", lambda n: token)
    with pytest.raises(FileExistsError):
        await export.write_export(plan, lambda n: None)
    assert list(outside.iterdir()) == []
    assert not out.exists()
    assert localfs.temp_path(out, token).is_symlink()  # never removed: it is not ours
