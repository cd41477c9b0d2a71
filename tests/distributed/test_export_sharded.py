"""``aiostage export`` of sharded checkpoints (FSDP2 on 4 ranks, HSDP-like DTensors on a 2-D
mesh), run as the real command line; the results are read back by ``safetensors`` and
``torch.load`` and compared bit for bit with the unsharded state. Peak memory is measured as
the export process's peak resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import _export_workers as workers
import anyio
import pytest
import torch
from safetensors.torch import load_file

import aiostage
from aiostage._core.tree import flatten
from aiostage.testing import assert_state_dict_equal, run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

WORLD_TIMEOUT = 120.0
MiB = 1 << 20


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m aiostage ARGS``: its exit status and output."""
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def export(*args: str | Path) -> None:
    out = run_cli("export", *args)
    assert out.returncode == 0, out.stderr


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert (got[key].dtype, got[key].shape) == (t.dtype, t.shape), key
        assert torch.equal(
            got[key].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), key


def load_index(directory: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What ``from_pretrained`` reads: the index, then every shard it names."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(directory / name))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    return tensors, files


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The FSDP2 world: its two checkpoints and rank 0's whole trained state."""
    root = tmp_path_factory.mktemp("fsdp")
    whole = run_world(workers.save_fsdp, 4, str(root), timeout=WORLD_TIMEOUT)[0]
    manifest = json.loads((root / "init" / "manifest.json").read_text())
    assert manifest["world_size"] == 4  # really sharded: one file per rank
    return {"root": root, "whole": whole, **{n: root / n for n in ("init", "trained", "ragged")}}


def test_an_fsdp2_model_exports_as_the_unsharded_state_dict(
    fsdp: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "model.safetensors"
    export(fsdp["init"], "--to", "safetensors", "--only", "model", out)
    want = workers.Model().state_dict()  # the same model, never sharded
    assert_same_tensors(load_file(out), dict(want))
    export(
        fsdp["init"],
        "--to",
        "safetensors",
        "--only",
        "model",
        "--max-shard-size",
        "200B",
        tmp_path / "hf",
    )
    got, files = load_index(tmp_path / "hf")
    assert len(files) > 2
    assert_same_tensors(got, dict(want))


def test_the_trained_state_exports_whole(fsdp: dict[str, Any], tmp_path: Path) -> None:
    export(fsdp["trained"], "--to", "torch", tmp_path / "state.pt")
    assert_state_dict_equal(torch.load(tmp_path / "state.pt", weights_only=True), fsdp["whole"])
    export(fsdp["trained"], "--to", "safetensors", tmp_path / "state.st")
    want = {leaf.key: leaf.data for leaf in flatten(fsdp["whole"]).leaves}
    assert "optim.state.layers.1.weight.exp_avg" in want
    assert_same_tensors(load_file(tmp_path / "state.st"), want)


def test_keys_rank_0_did_not_save_are_named(fsdp: dict[str, Any], tmp_path: Path) -> None:
    out = run_cli("export", fsdp["ragged"], "--to", "safetensors", tmp_path / "x.st")
    assert out.returncode == 2, out
    assert f"{fsdp['ragged'] / 'rank_00001.safetensors'}: rank 1 saved stage1.w" in out.stderr
    assert "Traceback" not in out.stderr
    export(fsdp["ragged"], "--to", "torch", "--only", "model", tmp_path / "x.pt")  # rank 0's
    assert_state_dict_equal(torch.load(tmp_path / "x.pt", weights_only=True), {"w": torch.ones(2)})


# ---------------------------------------------------------------- memory

COUNT, ROWS, COLS = 32, 1024, 1024  # 32 tensors of 4 MiB: a 128 MiB model


def peak_rss(*args: str | Path) -> int:
    """The peak resident set size, in bytes, of ``python -m aiostage export ARGS``."""
    code = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "aiostage", "export", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1]) * 1024  # KiB on Linux


def test_export_holds_about_one_tensor_at_a_time(tmp_path: Path) -> None:
    big, tiny = tmp_path / "big", tmp_path / "tiny"
    run_world(workers.save_big, 4, str(big), COUNT, ROWS, COLS, timeout=WORLD_TIMEOUT)
    anyio.run(lambda: aiostage.save({"model": {"w": torch.zeros(4)}}, tiny))
    tensor = ROWS * COLS * 4
    for fmt, suffix in (("safetensors", "st"), ("torch", "pt")):
        base = peak_rss(tiny, "--to", fmt, "--only", "model", tmp_path / f"tiny.{suffix}")
        out = tmp_path / f"big.{suffix}"
        grew = peak_rss(big, "--to", fmt, "--only", "model", out) - base
        # the whole model is 32 tensors: holding it would grow the peak by 128 MiB or more;
        # one tensor's shards, mapped, and its assembled copy are 2 (measured: 11-12 MiB)
        assert grew < 4 * tensor, f"{fmt}: the peak grew by {grew / MiB:.1f} MiB"
        got = load_file(out) if fmt == "safetensors" else torch.load(out, weights_only=True)
        for key, want in workers.big_tensors(COUNT, ROWS, COLS):
            assert torch.equal(got[key], want), key
        del got
