"""The ``aiostage`` command line, run as a real subprocess on checkpoints written by ``save``."""

from __future__ import annotations

import json
import os
import pty
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist

import aiostage
from aiostage._storage import localfs
from aiostage.testing import assert_state_dict_equal, run_world

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str | Path, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m aiostage ARGS``: its exit status and output."""
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60)


def make_sd() -> dict[str, Any]:
    """A nested state dict with aliasing (a tied weight, a view) and non-tensor leaves."""
    w = torch.arange(48.0).reshape(6, 8)
    return {
        "model": {
            "weight": w,
            "bias": torch.linspace(0, 1, 8),
            "mask": torch.ones(3, dtype=torch.bool),
        },
        "head": {"tied": w, "row": w[2]},
        "optim": {"state": {0: {"step": 7, "exp_avg": torch.full((6, 8), 0.5)}}, "lr": 0.01},
    }


def save(path: Path, sd: Any = None, metadata: dict[str, Any] | None = None) -> Path:
    anyio.run(lambda: aiostage.save(make_sd() if sd is None else sd, path, metadata=metadata))
    return path


def flip_byte_of(ckpt: Path, key: str) -> Path:
    """Flip the first data byte of the first safetensors entry whose name starts with ``key``."""
    file = ckpt / "rank_00000.safetensors"
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + n])
    begin = next(v for k, v in entries.items() if k.startswith(key))["data_offsets"][0]
    raw[8 + n + begin] ^= 0xFF
    file.write_bytes(bytes(raw))
    return file


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr


# ---------------------------------------------------------------- ls


def test_ls_lists_step_directories_by_step_with_their_state(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (200, 30):
        save(root / f"step_{step:09d}", metadata={"step": step})
    save(root / "best")
    (root / "step_000000500").mkdir()  # no manifest
    tmp = localfs.temp_path(root / "step_000000400", "0" * 32)
    tmp.mkdir()
    (tmp / "rank_00000.safetensors").write_bytes(b"partial")  # an interrupted save
    (root / "logs").mkdir()
    (root / "logs" / "a.txt").write_text("not a checkpoint")
    out = run_cli("ls", root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "AGE", "PATH"]
    rows = [[*line.split()[:2], line.split()[5]] for line in lines[1:]]  # size: 2 words
    assert rows == [
        ["30", "committed", "step_000000030"],
        ["200", "committed", "step_000000200"],
        ["400", "incomplete", tmp.name],
        ["500", "incomplete", "step_000000500"],
        ["-", "committed", "best"],
    ]
    assert "KiB" in lines[1]
    assert "interrupted save" in lines[3]


def test_ls_of_a_checkpoint_lists_itself_and_flags_a_damaged_one(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "step_000000010")
    with (ckpt / "rank_00000.safetensors").open("ab") as f:
        f.write(b"x")
    out = run_cli("ls", ckpt)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["10", "corrupt"]
    assert "the manifest says" in out.stdout


def test_the_console_script_reports_a_missing_directory_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "aiostage"  # [project.scripts], installed by pip
    cmd = [str(script), "ls", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert_one_line_error(out, f"aiostage ls: error: {tmp_path / 'nope'}: No such file")


# ---------------------------------------------------------------- inspect


def test_inspect_shows_keys_dtypes_shapes_aliases_and_metadata(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt", metadata={"step": 7, "note": "hi"})
    flip_byte_of(ckpt, "optim.state.0.exp_avg")  # inspect reads headers only: still fine
    out = run_cli("inspect", ckpt)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'metadata: {"note": "hi", "step": 7}' in text
    assert "world size 1, 1 file(s)" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "float32 [6, 8] 192 B" in rows["weight"]
    assert "bool [3] 3 B" in rows["mask"]
    assert "shares storage with model.weight" in rows["tied"]
    assert "float32 [8] 32 B  (shares storage with model.weight)" in rows["row"]
    assert "= 7" in rows["step"]
    assert "= 0.01" in rows["lr"]
    assert text.index("model") < text.index("weight") < text.index("head") < text.index("optim")


@pytest.mark.parametrize("damage", ["missing", "not a checkpoint", "bad manifest", "a file"])
def test_inspect_refuses_what_is_not_a_checkpoint(tmp_path: Path, damage: str) -> None:
    target = tmp_path / "ckpt"
    if damage == "not a checkpoint":
        target.mkdir()
    elif damage == "bad manifest":
        save(target)
        (target / "manifest.json").write_text("{not json")
    elif damage == "a file":
        target.write_text("hello")
    words = {"bad manifest": "manifest.json"}.get(damage, str(target))
    assert_one_line_error(run_cli("inspect", target), words)


# ---------------------------------------------------------------- verify


def test_verify_passes_a_sound_checkpoint(tmp_path: Path) -> None:
    out = run_cli("verify", save(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    assert "OK (1 file(s), 6 tensor(s) verified)" in out.stdout
    assert out.stderr == ""  # no progress bar when stderr is not a terminal


def test_verify_names_the_file_and_key_of_a_flipped_byte(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt")
    file = flip_byte_of(ckpt, "model.bias")
    flip_byte_of(ckpt, "__aiostage__/span/")  # the storage shared by three tensors
    out = run_cli("verify", ckpt)
    assert out.returncode == 1, out
    assert f"CORRUPT {file}: checksum mismatch in tensor model.bias" in out.stdout
    shared = "checksum mismatch in tensor model.weight, head.tied, head.row"
    assert f"CORRUPT {file}: {shared}" in out.stdout
    assert "2 problem(s)" in out.stdout
    assert "Traceback" not in out.stderr


def test_verify_reports_a_truncated_file_and_a_missing_path(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt")
    file = ckpt / "rank_00000.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    out = run_cli("verify", ckpt)
    assert out.returncode == 1, out
    assert f"CORRUPT {file}:" in out.stdout
    assert_one_line_error(run_cli("verify", tmp_path / "nope"), "no checkpoint")


def test_verify_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt", {"w": torch.randn(1 << 20)})
    leader, follower = pty.openpty()
    try:
        out = run_cli("verify", ckpt, stderr=follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert out.returncode == 0
    assert b"verify [" in drawn
    assert b"100%" in drawn


# ---------------------------------------------------------------- export


def test_export_to_safetensors_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    ckpt = save(tmp_path / "ckpt", metadata={"step": 7})
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "model.safetensors")
    assert out.returncode == 0, out.stderr
    got = load_file(tmp_path / "model.safetensors")
    sd = make_sd()
    want = {
        "model.weight": sd["model"]["weight"],
        "model.bias": sd["model"]["bias"],
        "model.mask": sd["model"]["mask"],
        "head.tied": sd["head"]["tied"],
        "head.row": sd["head"]["row"],
        "optim.state.0.exp_avg": sd["optim"]["state"][0]["exp_avg"],
    }
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert torch.equal(got[key], t), key
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["aiostage.metadata"]) == {"step": 7}
    assert json.loads(meta["optim.state.0.step"]) == 7
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.safetensors"]


def test_export_to_torch_round_trips_with_aliasing(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt")
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "model.pt")
    assert out.returncode == 0, out.stderr
    got = torch.load(tmp_path / "model.pt", weights_only=True)
    assert_state_dict_equal(got, make_sd(), check_aliasing=True)


def test_export_refuses_a_corrupt_checkpoint_and_an_existing_output(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt")
    (tmp_path / "taken.pt").write_bytes(b"mine")
    assert_one_line_error(run_cli("export", ckpt, "--to", "torch", tmp_path / "taken.pt"), "exists")
    assert (tmp_path / "taken.pt").read_bytes() == b"mine"
    flip_byte_of(ckpt, "model.bias")
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "x.pt")
    assert_one_line_error(out, "checksum mismatch in entry 'model.bias' (tensor model.bias)")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "taken.pt"]  # nor a temporary left


# ---------------------------------------------------------------- many ranks


async def save_rank(rank: int, world: int, path: str) -> None:
    """Rank function: every rank saves its part of one checkpoint."""
    sd = {"w": torch.full((4, 4), float(rank)), "rank": rank}
    await aiostage.save(sd, path, pg=dist.group.WORLD, metadata={"world": world})


@pytest.mark.distributed
def test_a_multi_rank_checkpoint_is_inspected_verified_and_exported(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_world(save_rank, 2, str(ckpt), timeout=90)
    out = run_cli("inspect", ckpt)
    assert out.returncode == 0, out.stderr
    assert "world size 2, 2 file(s)" in out.stdout
    assert "rank_00001.safetensors (rank 1): 1 tensor(s)" in out.stdout
    out = run_cli("verify", ckpt)
    assert out.returncode == 0, out.stderr
    assert "OK (2 file(s), 2 tensor(s) verified)" in out.stdout
    # plain (not DTensor) values differ per rank: the export holds rank 0's, as load does
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "x.pt")
    assert out.returncode == 0, out.stderr
    got = torch.load(tmp_path / "x.pt", weights_only=True)
    assert_state_dict_equal(got, {"w": torch.zeros(4, 4), "rank": 0})
