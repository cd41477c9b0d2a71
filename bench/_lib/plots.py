"""The pictures of a ``scripts/bench`` report, drawn from the benches' JSON with matplotlib (the
``bench`` extra): the event loop's lag over time during a stage and a save, the training step
times with checkpoints marked, and throughput per state-dict shape."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]
THROUGHPUT = (  # panel: (bench, figures group, contenders)
    ("stage, warm", "stage", "stage warm", (
        "aiostage DefaultStager, warm", "raw copy_ loop, one call per tensor, worker thread",
        "DCP DefaultStager(sync), warm, on the loop", "DCP DefaultStager(async), warm",
    )),
    ("save", "persist", "save", (
        "aiostage.save", "torch.save + flush + fsync + rename",
        "dcp.save, FileSystemWriter(thread_count=2)",
    )),
    ("load", "persist", "load", ("aiostage.load", "torch.load", "dcp.load into a template")),
)  # fmt: skip


def available() -> bool:
    """Whether matplotlib is installed (``pip install -e '.[bench]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def draw(results: Sequence[Result], out: Path) -> list[Path]:
    """Every picture ``results`` hold data for, written as PNGs under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    made = [_lag(shape, runs, out) for shape, runs in _by_shape(results, ("stage", "persist"))]
    made += [_steps(r, out) for r in results if r["bench"] == "train_stall"]
    made.append(_throughput(results, out))
    return [p for p in made if p is not None]


def _by_shape(results: Sequence[Result], benches: Sequence[str]) -> list[tuple[str, list[Result]]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        if r["bench"] in benches and r.get("shape"):
            groups.setdefault(r["shape"]["shape"], []).append(r)
    return list(groups.items())


def _sawtooth(trace: list[list[float]]) -> tuple[list[float], list[float]]:
    """A heartbeat's timeline as lines: the loop was blocked from ``t - lag`` until ``t``."""
    xs: list[float] = []
    ys: list[float] = []
    for t, lag in trace:
        xs += [t - lag, t, t]
        ys += [0.0, lag, 0.0]
    return xs, ys


def _lag(shape: str, runs: list[Result], out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    panels = [(r["bench"], what, traces) for r in runs for what, traces in r["traces"].items()]
    panels = [p for p in panels if p[1] in ("stage", "save")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (_, what, traces) in zip(axes[0], panels, strict=True):
        for name, trace in traces.items():
            peak = max((lag for _, lag in trace), default=0.0)
            ax.plot(*_sawtooth(trace), label=f"{name} (max {peak:.1f} ms)", linewidth=1)
        ax.set(title=f"event-loop lag during one {what} (median rep)")
        ax.set_xlabel("ms since the operation began (a climbing line: the loop is blocked)")
        ax.set_ylabel("heartbeat lateness, ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"shape: {shape}")
    return _save(fig, out / f"lag-{shape}.png")


def _steps(result: Result, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in result["figures"]["train"].items():
        times = [1e3 * s for s in r["step_times"]]
        (line,) = ax.plot(range(1, len(times) + 1), times, label=name, linewidth=1, marker=".")
        marks = r["checkpoint_steps"]
        ax.plot(
            marks,
            [times[s - 1] for s in marks],
            "o",
            color=line.get_color(),
            markersize=8,
            fillstyle="none",
        )
    ax.set(
        xlabel="training step (circles: a checkpoint was taken)", ylabel="step time incl. stall, ms"
    )
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    shape = result["shape"]["shape"]
    ax.set_title(f"training step times with checkpoints, shape: {shape}")
    return _save(fig, out / f"train-steps-{shape}.png")


def _throughput(results: Sequence[Result], out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    data = [
        (title, _gbps(results, bench, group, names)) for title, bench, group, names in THROUGHPUT
    ]
    data = [(title, by) for title, by in data if by]
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4), squeeze=False)
    for ax, (title, by) in zip(axes[0], data, strict=True):
        shapes = list(by)
        names = list(dict.fromkeys(n for row in by.values() for n in row))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(shapes))]
            ax.bar(xs, [by[s].get(name, 0.0) for s in shapes], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set(title=title, ylabel="GB/s (median)")
        ax.legend(fontsize=6)
    fig.suptitle("throughput per state-dict shape")
    return _save(fig, out / "throughput.png")


def _gbps(
    results: Sequence[Result], bench: str, group: str, names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{shape: {contender: GB/s}}`` for one group of one bench."""
    by: dict[str, dict[str, float]] = {}
    for r in results:
        figures = r["figures"].get(group, {})
        if r["bench"] == bench and figures:
            by[r["shape"]["shape"]] = {n: figures[n]["gb_per_s"] for n in names if n in figures}
    return by


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
