"""The benches run from a fresh clone, at the tiny sizes of ``bench/suite.py --tiny``: the
report, its raw figures and the comparison of two reports; and the shapes they measure at."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SMOKE = ("stage", "persist", "train_stall")


@pytest.fixture(scope="module")
def shapes() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("_lib.shapes")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench/`` as a fresh clone has it: no ``bench/out``, nothing built."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(BENCH, root / "bench", ignore=shutil.ignore_patterns("out", "__pycache__"))
    return root / "bench"


@pytest.fixture(scope="module")
def smoke(clone: Path) -> Path:
    """The report folder of ``suite.py --tiny`` over the benches that take a shape, run in the
    clone from another working directory."""
    done = subprocess.run(
        [sys.executable, str(clone / "suite.py"), "--tiny", "--only", ",".join(SMOKE)],
        cwd=clone.parent.parent,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = (clone / "out" / "reports").iterdir()
    return folder


def test_every_bench_runs_in_a_fresh_clone(smoke: Path) -> None:
    runs = json.loads((smoke / "results.json").read_text())["runs"]
    assert [r["bench"] for r in runs] == list(SMOKE)
    assert all("failed" not in r for r in runs), [r.get("tail") for r in runs]


def test_the_report_names_the_machine_and_the_anchors_against_their_targets(smoke: Path) -> None:
    report = (smoke / "report.md").read_text()
    assert "machine: " in report
    assert " cores" in report
    assert "background just before: " in report
    for anchor in (
        "raw copy_ loop, one call per tensor",
        "DCP DefaultStager(sync), warm",
        "torch.save + flush + fsync + rename",
        "dcp.save",
        "torch.load",
        "DCP async_save (default)",
    ):
        assert anchor in report, anchor
    summary = report.split("## summary", 1)[1].split("\n## ", 1)[0]
    verdicts = [
        line.rsplit("|", 2)[-2].strip()
        for line in summary.splitlines()
        if line.startswith("| stage")
    ]
    assert verdicts
    assert set(verdicts) <= {"PASS", "MISS", "info"}


def test_the_raw_figures_hold_every_rep(smoke: Path) -> None:
    runs = {r["bench"]: r for r in json.loads((smoke / "results.json").read_text())["runs"]}
    warm = runs["stage"]["figures"]["stage warm"]["aiostage DefaultStager, warm"]
    assert len(warm["seconds"]) == len(warm["max_lag_ms"]) == 1
    assert warm["seconds"][0] > 0
    assert runs["stage"]["shape"]["tensors"] == 64
    trace = runs["persist"]["traces"]["save"]["aiostage.save"]
    assert trace
    assert all(lag >= 0 for _, lag in trace)
    train = runs["train_stall"]["figures"]["train"]["aiostage Checkpointer.save"]
    assert len(train["stalls"]) == 1
    assert train["checkpoint_steps"] == [1]
    ratios = {q["what"] for q in runs["persist"]["ratios"]}
    assert {"save vs torch.save + fsync", "save vs dcp.save", "load vs torch.load"} <= ratios


def test_two_reports_compare(smoke: Path, clone: Path) -> None:
    results = str(smoke / "results.json")
    done = subprocess.run(
        [sys.executable, str(clone / "suite.py"), "--compare", results, results],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "| stage 64x4KiB | stage warm | aiostage DefaultStager, warm |" in done.stdout
    assert "1.00x |" in done.stdout


def test_pictures_sit_next_to_the_report(smoke: Path) -> None:
    pytest.importorskip("matplotlib")
    pictures = sorted(p.name for p in smoke.glob("*.png"))
    assert pictures == ["lag-64x4KiB.png", "throughput.png", "train-steps-8x4KiB.png"]
    assert all((smoke / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    assert "![throughput](throughput.png)" in (smoke / "report.md").read_text()


@pytest.mark.parametrize("name", ["flat", "small", "transformer", "moe"])
def test_a_shape_is_the_state_dict_it_describes(shapes: Any, name: str) -> None:
    shape = shapes.build(name, 0.004)
    sd = shape.state_dict()
    assert shape.describe() | shapes.layout(sd) == shape.describe()
    assert shape.describe()["unique_bytes"] == pytest.approx(0.004 * 2**30, rel=0.6)


def test_the_transformer_is_a_train_state_as_get_state_dict_makes_it(shapes: Any) -> None:
    sd = shapes.build("transformer", 0.004).state_dict()
    assert set(sd) == {"model", "optim"}
    assert set(sd["optim"]) == {"state", "param_groups"}
    assert (
        list(sd["optim"]["state"]) == list(sd["model"]) == sd["optim"]["param_groups"][0]["params"]
    )
    first = sd["optim"]["state"]["layers.0.attn.q.weight"]
    assert set(first) == {"step", "exp_avg", "exp_avg_sq"}
    assert first["step"].dim() == 0


def test_moe_has_tens_of_thousands_of_tensors(shapes: Any) -> None:
    described = shapes.build("moe", 0.004).describe()
    assert described["tensors"] >= 19_000
    assert "64 experts" in described["detail"]


def test_small_is_8192_tensors_of_2_kib(shapes: Any) -> None:
    assert shapes.build("small", None).describe() | {"detail": ""} == {
        "shape": "small",
        "detail": "",
        "params": 8192,
        "tensors": 8192,
        "unique_bytes": 8192 * 2048,
    }


@pytest.mark.parametrize(
    "argv",
    [["--tensors", "4"], ["--tensors", "4", "--tensor-kib", "2", "--shape", "moe"], ["--gib", "0"]],
)
def test_contradictory_shape_arguments_are_refused(shapes: Any, argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    shapes.add_arguments(p)
    with pytest.raises(SystemExit):
        shapes.from_args(p, p.parse_args(argv))
