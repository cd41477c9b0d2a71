"""``aiostage export`` on one-rank checkpoints, through the real command line: the Hugging Face
layouts (one file, shards and their index), sub-trees, file modes, and every refusal.

Sharded (multi-rank) checkpoints: ``tests/distributed/test_export_sharded.py``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import aiostage
from aiostage._format.hf import parse_size, split_shards
from aiostage._storage.export import plan_export, write_export
from aiostage.testing import assert_state_dict_equal

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str | Path, umask: int = -1) -> subprocess.CompletedProcess[str]:
    """``python -m aiostage ARGS`` (with ``umask`` set in the child): status and output."""
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, umask=umask)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


class Tiny(torch.nn.Module):
    """A model whose state dict has Hugging Face-style names (``layers.0.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))
        self.norm = torch.nn.LayerNorm(32).to(torch.bfloat16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


def train_state() -> dict[str, Any]:
    model = Tiny()
    return {"model": model.state_dict(), "step": 3, "optim": {"lr": 0.5, "betas": (0.9, 0.99)}}


def save(path: Path, sd: Any) -> Path:
    anyio.run(lambda: aiostage.save(sd, path, metadata={"step": 3}))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("export") / "ckpt", train_state())


def load_sharded(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What ``from_pretrained`` reads: the index, then every shard it names."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = load_file(directory / name)
        assert all(index["weight_map"][k] == name for k in shard)
        tensors.update(shard)
    return tensors, index


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype, key
        assert torch.equal(
            got[key].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), key


# ---------------------------------------------------------------- layouts


def test_only_model_gives_the_names_hugging_face_loads(ckpt: Path, tmp_path: Path) -> None:
    out = run_cli("export", ckpt, "--to", "safetensors", "--only", "model", tmp_path / "m.st")
    assert out.returncode == 0, out.stderr
    got = load_file(tmp_path / "m.st")
    assert list(got)[:2] == ["layers.0.weight", "layers.0.bias"]
    assert_same_tensors(got, Tiny().state_dict())
    with safe_open(tmp_path / "m.st", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # transformers refuses a file without it
    assert json.loads(meta["aiostage.metadata"]) == {"step": 3}


def test_the_whole_state_keeps_values_as_json_metadata(ckpt: Path, tmp_path: Path) -> None:
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "all.st")
    assert out.returncode == 0, out.stderr
    want = {f"model.{k}": t for k, t in Tiny().state_dict().items()}
    assert_same_tensors(load_file(tmp_path / "all.st"), want)
    with safe_open(tmp_path / "all.st", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["step"]) == 3
    assert json.loads(meta["optim.betas.1"]) == 0.99  # a tuple is a container: one per item


def test_shards_of_max_shard_size_with_an_index(ckpt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "hf"
    args = ("export", ckpt, "--to", "safetensors", "--only", "model", "--max-shard-size", "10KB")
    out = run_cli(*args, out_dir)
    assert out.returncode == 0, out.stderr
    want = Tiny().state_dict()
    names = sorted(p.name for p in out_dir.iterdir())
    n = len(names) - 1
    assert n > 1
    assert names == [
        *(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)),
        "model.safetensors.index.json",
    ]
    got, index = load_sharded(out_dir)
    assert_same_tensors(got, want)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
    for name in names[:-1]:  # 10 kB each, unless one tensor alone is larger
        shard = load_file(out_dir / name)
        data = sum(t.nbytes for t in shard.values())
        assert data <= 10_000 or len(shard) == 1, (name, data)


def test_one_shard_is_model_safetensors_without_an_index(ckpt: Path, tmp_path: Path) -> None:
    args = ("export", ckpt, "--to", "safetensors", "--only", "model", "--max-shard-size", "5GB")
    out = run_cli(*args, tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"]
    assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), Tiny().state_dict())


def test_torch_exports_a_sub_tree_nested(ckpt: Path, tmp_path: Path) -> None:
    out = run_cli("export", ckpt, "--to", "torch", "--only", "optim", tmp_path / "o.pt")
    assert out.returncode == 0, out.stderr
    assert torch.load(tmp_path / "o.pt", weights_only=True) == {"lr": 0.5, "betas": (0.9, 0.99)}
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "all.pt")
    assert out.returncode == 0, out.stderr
    assert_state_dict_equal(torch.load(tmp_path / "all.pt", weights_only=True), train_state())


def test_safetensors_needs_no_safetensors_package(ckpt: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['safetensors'] = None; from aiostage.__main__ import main; "
        f"sys.exit(main(['export', {str(ckpt)!r}, '--to', 'safetensors', 'out.st']))"
    )
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "model.layers.0.weight" in load_file(tmp_path / "out.st")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_and_directories_follow_the_umask(ckpt: Path, tmp_path: Path, umask: int) -> None:
    # safetensors' own writer made 0600 files whatever the umask (issue 17, item 11)
    wrote = []
    for fmt, out, extra in [
        ("safetensors", tmp_path / "m.st", ()),
        ("torch", tmp_path / "m.pt", ()),
        ("safetensors", tmp_path / "hf", ("--max-shard-size", "10KB")),
    ]:
        done = run_cli("export", ckpt, "--to", fmt, "--only", "model", *extra, out, umask=umask)
        assert done.returncode == 0, done.stderr
        wrote += [out, *(out.iterdir() if out.is_dir() else ())]
    for path in wrote:
        base = 0o777 if path.is_dir() else 0o666
        assert stat.S_IMODE(path.stat().st_mode) == base & ~umask, path


async def test_export_never_blocks_the_event_loop(ckpt: Path, tmp_path: Path) -> None:
    # in process, under the suite's blockbuster: every blocking call runs in a worker thread
    for fmt, shard in (("safetensors", 10_000), ("torch", None)):
        out = tmp_path / fmt
        plan = await plan_export(ckpt, fmt, out, only="model", max_shard_size=shard)
        done: list[int] = []
        files = await write_export(plan, done.append)
        assert sum(done) == plan.nbytes == sum(t.nbytes for t in Tiny().state_dict().values())
        assert [f for f, _ in files] == ([out] if shard is None else sorted(out.iterdir()))


# ---------------------------------------------------------------- refusals


def test_an_existing_output_is_never_replaced(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.st").write_bytes(b"mine")
    (tmp_path / "taken").mkdir()
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "taken.st")
    assert_one_line_error(out, f"{tmp_path / 'taken.st'} exists")
    args = ("--max-shard-size", "1MB")
    out = run_cli("export", ckpt, "--to", "safetensors", *args, tmp_path / "taken")
    assert_one_line_error(out, f"{tmp_path / 'taken'} exists")
    assert (tmp_path / "taken.st").read_bytes() == b"mine"
    assert list((tmp_path / "taken").iterdir()) == []


@pytest.mark.parametrize(
    ("only", "words"),
    [
        ("nope", ["no sub-tree 'nope'", "top-level keys: model, step, optim"]),
        ("model.layers", ["no sub-tree 'model.layers'"]),  # the key is "layers.0.weight"
        ("model.norm.weight", ["model.norm.weight is a tensor, not a sub-tree"]),
        ("step", ["step is a value, not a sub-tree"]),
    ],
)
def test_a_sub_tree_that_is_not_there(ckpt: Path, tmp_path: Path, only: str, words: Any) -> None:
    out = run_cli("export", ckpt, "--to", "safetensors", "--only", only, tmp_path / "x.st")
    assert_one_line_error(out, str(ckpt), *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("sd", "words"),
    [
        ({"m": {"w": torch.ones(2), "blob": b"\x00"}}, ["m.blob:", "bytes value", "--to torch"]),
        ({"m": {"w": torch.ones(2, dtype=torch.complex128)}}, ["m.w:", "complex128"]),
        (
            {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
            ["['a.b'] and ['a', 'b'] both export as 'a.b'"],
        ),
        ({"format": "mine", "w": torch.ones(1)}, ["format:", "reserves"]),
    ],
    ids=["bytes-value", "dtype", "collision", "reserved-name"],
)
def test_what_safetensors_cannot_hold_is_named(tmp_path: Path, sd: Any, words: Any) -> None:
    ckpt = save(tmp_path / "ckpt", sd)
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "x.st")
    assert_one_line_error(out, *words)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    out = run_cli("export", ckpt, "--to", "torch", tmp_path / "x.pt")
    assert out.returncode == 0, out.stderr  # --to torch holds all of these
    assert_state_dict_equal(torch.load(tmp_path / "x.pt", weights_only=True), sd)


def test_bad_sizes_and_options(ckpt: Path, tmp_path: Path) -> None:
    out = run_cli("export", ckpt, "--to", "safetensors", "--max-shard-size", "5XB", tmp_path / "x")
    assert out.returncode == 2
    assert "'5XB' is not a size" in out.stderr
    out = run_cli("export", ckpt, "--to", "torch", "--max-shard-size", "5GB", tmp_path / "x")
    assert_one_line_error(out, "--max-shard-size cuts safetensors files only")


def test_a_corrupt_tensor_leaves_nothing_behind(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt", train_state())
    file = ckpt / "rank_00000.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of data: in the last entry written
    file.write_bytes(bytes(raw))
    out = run_cli("export", ckpt, "--to", "safetensors", tmp_path / "x.st")
    assert_one_line_error(out, str(file), "checksum mismatch")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no output, no temporary directory


# ---------------------------------------------------------------- docs/cli.md

DOCS = Path(__file__).resolve().parent.parent / "docs"


def bash_blocks(page: str) -> list[list[str]]:
    """The commands of each ```bash block of ``docs/page``, comments cut."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M)
    return [[ln.split("#")[0].strip() for ln in b.splitlines() if ln.strip()] for b in blocks]


def test_the_command_blocks_of_the_cli_page_run_as_written(tmp_path: Path) -> None:
    first, exports = bash_blocks("cli.md")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for n, block in enumerate((first, exports)):
        cwd = tmp_path / str(n)
        save(cwd / "ckpts" / "step_000001000", train_state())
        for command in block:
            out = subprocess.run(
                command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, (command, out.stderr)
    got = load_file(tmp_path / "0" / "model.safetensors")
    assert_same_tensors(got, {f"model.{k}": t for k, t in Tiny().state_dict().items()})
    assert_state_dict_equal(
        torch.load(tmp_path / "0" / "model.pt", weights_only=True), train_state()
    )
    assert_same_tensors(load_file(tmp_path / "1" / "model.safetensors"), Tiny().state_dict())
    assert_same_tensors(
        load_file(tmp_path / "1" / "hf-model" / "model.safetensors"), Tiny().state_dict()
    )
    state = torch.load(tmp_path / "1" / "train-state.pt", weights_only=True)
    assert_state_dict_equal(state, train_state())


# ---------------------------------------------------------------- the layout rules


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 << 30),
        ("1000", 1000),
        ("1.5kb", 1500),
    ],
)
def test_sizes_read_as_hugging_face_reads_them(text: str, n: int) -> None:
    assert parse_size(text) == n


def test_shards_cut_before_the_tensor_that_would_overflow() -> None:
    assert split_shards([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert split_shards([], 8) == [[]]
