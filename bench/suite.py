"""Run every bench and write a dated report, or compare two reports' raw figures.

Run: ``scripts/bench [--quick] [--only stage,persist,...]`` writes
``bench/out/reports/<date>/``: ``report.md`` (the machine, the background-CPU line, a summary of
every ratio against its target, each bench's tables), ``results.json`` (the raw figures),
``log.txt`` and, with matplotlib (the ``bench`` extra), PNG pictures. ``scripts/bench --compare
OLD.json NEW.json`` prints how the medians and ratios moved between two reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from _lib import machine, plots
from _lib.report import Ratio, table

BENCHES = ("stage", "persist", "train_stall", "replicate", "weight_sync", "restore", "object_store")
SHAPES = ("flat", "small", "transformer", "moe")
Run = tuple[str, list[str]]


def plan(mode: str) -> list[Run]:
    """The runs of a mode: ``full`` (the documented sizes), ``quick`` (a few minutes on 2
    cores) or ``tiny`` (seconds: the test-suite's smoke run)."""
    if mode == "tiny":
        bg = ["--background-s", "0.2"]
        few = ["--tensors", "64", "--tensor-kib", "4", *bg]
        return [
            ("stage", [*few, "--reps", "1", "--flat-reps", "1"]),
            ("persist", [*few, "--reps", "1"]),
            ("train_stall", [*bg, "--tensors", "8", "--tensor-kib", "4", "--every", "1", "--checkpoints", "1"]),
            ("replicate", [*bg, "--gib", "0.002", "--reps", "1"]),
            ("weight_sync", [*bg, "--gib", "0.002", "--reps", "1", "--idle-s", "0.2"]),
            ("restore", ["--gib", "0.002", "--reps", "1", "--no-s3"]),
            ("object_store", ["--gib", "0.002", "--reps", "1"]),
        ]  # fmt: skip
    quick = mode == "quick"

    def sized(shape: str, *rest: str) -> list[str]:
        gib = [] if shape == "small" or not quick else ["--gib", "0.05"]
        return ["--shape", shape, *gib, *rest]

    stage = ["--reps", "3", "--flat-reps", "5"] if quick else []
    persist = ["--reps", "2"] if quick else []
    train = ["--every", "3", "--checkpoints", "2"] if quick else []
    rest = ["--gib", "0.05", "--reps", "2"] if quick else []
    runs = [("stage", sized(s, *stage)) for s in SHAPES]
    runs += [("persist", sized(s, *persist)) for s in SHAPES]
    runs += [("train_stall", sized(s, *train)) for s in ("flat", "transformer", "moe")[quick:]]
    runs += [("replicate", rest), ("weight_sync", [*rest, "--idle-s", "1"] if quick else [])]
    runs += [("restore", rest), ("object_store", ["--gib", "0.05", "--reps", "2"] if quick else [])]
    return runs


def run_one(bench: str, argv: list[str], log: TextIO) -> dict[str, Any]:
    """One bench in its own process, its output echoed and logged; its report's JSON, or a
    failure record naming the exit status and the output's last lines."""
    command = [sys.executable, str(machine.BENCH / f"{bench}.py"), *argv]
    header = f"\n=== {bench} {' '.join(argv)}\n"
    print(header, flush=True)
    log.write(header)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        began = time.perf_counter()
        proc = subprocess.Popen(
            [*command, "--json", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = [*tail[-19:], line]
        code = proc.wait()
        if code == 0 and out.exists():
            result: dict[str, Any] = json.loads(out.read_text())
            result["wall_s"] = time.perf_counter() - began
            return result
    return {"bench": bench, "argv": argv, "failed": code, "tail": "".join(tail)}


def git_state() -> str:
    """The commit the benches ran at, and whether the work tree had changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=machine.BENCH,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            cwd=machine.BENCH,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (f" with {len(dirty)} changed files" if dirty else "")


def summary(runs: Sequence[dict[str, Any]]) -> str:
    """Every ratio of every run in one table, and the count of PASS and MISS."""
    rows = []
    for r in runs:
        shape = r.get("shape", {}).get("shape", "")
        if "failed" in r:
            rows.append([r["bench"], shape, f"FAILED (exit {r['failed']})", "", "", "MISS"])
        for q in r.get("ratios", []):
            target = (
                ""
                if q["target"] is None
                else f"{'>=' if q['at_least'] else '<='} {q['target']:.3g}"
            )
            rows.append(
                [r["bench"], shape, q["what"], f"{q['value']:.2f}{q['unit']}", target, q["verdict"]]
            )
    verdicts = [row[-1] for row in rows]
    count = f"{verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS"
    return table(["bench", "shape", "figure", "value", "target", "verdict"], rows) + f"\n\n{count}"


def markdown(meta: dict[str, Any], runs: Sequence[dict[str, Any]], pictures: Sequence[Path]) -> str:
    parts = [
        f"# aiostage benchmarks, {meta['date']} ({meta['mode']})",
        f"{meta['git']}; `{meta['command']}`",
        machine.machine_line(meta["machine"]),
        machine.background_line(meta["before"]),
        "## summary: ratios against their targets\n\n" + summary(runs),
    ]
    if pictures:
        parts.append("## pictures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures))
    elif not plots.available():
        parts.append("(no pictures: matplotlib is not installed; `pip install -e '.[bench]'`)")
    for r in runs:
        if "failed" in r:
            parts.append(
                f"## {r['bench']} {' '.join(r['argv'])}\n\nFAILED (exit {r['failed']}):\n\n```\n{r['tail']}```"
            )
        else:
            parts.append(_markdown_of(r))
    return "\n\n".join(parts) + "\n"


def _markdown_of(r: dict[str, Any]) -> str:
    """One run's section, as its bench printed it (machine line aside: it is at the top)."""
    parts = [f"## {r['bench']} {' '.join(r['argv'])} ({r['wall_s']:.0f} s)"]
    parts.append(machine.background_line(r["before"]))
    parts += [f"### {s['title']}\n\n{s['markdown']}" for s in r["sections"]]
    parts.append("### ratios\n\n" + "\n".join(_ratio_line(q) for q in r["ratios"]))
    parts += [*r["notes"], r["background"]]
    return "\n\n".join(p for p in parts if p)


def _ratio_line(q: dict[str, Any]) -> str:
    return Ratio(q["what"], q["value"], q["target"], q["at_least"], q["unit"]).line()


def run_all(args: argparse.Namespace) -> Path:
    """Every run of the plan; the report folder."""
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    runs = [r for r in plan(mode) if not args.only or r[0] in args.only.split(",")]
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    folder = Path(args.out) if args.out else machine.out_dir("reports", f"{stamp}-{mode}")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mode": mode,
        "git": git_state(),
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "machine": machine.machine(),
        "before": machine.background_before(0.2 if mode == "tiny" else 1.0),
    }
    with (folder / "log.txt").open("w") as log:
        results = [run_one(bench, argv, log) for bench, argv in runs]
    (folder / "results.json").write_text(json.dumps({**meta, "runs": results}))
    pictures = (
        plots.draw([r for r in results if "failed" not in r], folder) if plots.available() else []
    )
    (folder / "report.md").write_text(markdown(meta, results, pictures))
    print(f"\nreport: {folder / 'report.md'}")
    return folder


# ---------------------------------------------------------------- comparing two reports


def _key(run: dict[str, Any]) -> str:
    return f"{run['bench']} {run.get('shape', {}).get('shape', '')}".strip()


def _median_s(figure: Any) -> float | None:
    """A contender's median seconds (the training bench: its median stall)."""
    if not isinstance(figure, dict):
        return None
    if figure.get("median_s"):
        return float(figure["median_s"])
    stalls = figure.get("stalls")
    return float(statistics.median(stalls)) if stalls else None


def _moved(was: dict[str, Any], run: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The rows of one run found in both reports: median times, and ratios."""
    key, times, ratios = _key(run), [], []
    for group, by in run["figures"].items():
        for name, figure in by.items():
            a, b = _median_s(was["figures"].get(group, {}).get(name)), _median_s(figure)
            if a and b:
                times.append(
                    [key, group, name, f"{1e3 * a:.1f}", f"{1e3 * b:.1f}", f"{b / a:.2f}x"]
                )
    then = {q["what"]: q for q in was["ratios"]}
    for q in run["ratios"]:
        if q["what"] in then:
            p = then[q["what"]]
            ratios.append(
                [
                    key,
                    q["what"],
                    f"{p['value']:.2f} {p['verdict']}",
                    f"{q['value']:.2f} {q['verdict']}",
                ]
            )
    return times, ratios


def compare(old_path: Path, new_path: Path) -> str:
    """How each contender's median time and each ratio moved from ``old`` to ``new``."""
    old, new = (json.loads(Path(p).read_text()) for p in (old_path, new_path))
    before = {_key(r): r for r in old["runs"] if "failed" not in r}
    times, ratios = [], []
    for run in new["runs"]:
        if _key(run) in before and "failed" not in run:
            t, r = _moved(before[_key(run)], run)
            times += t
            ratios += r
    head = [
        f"{name}: {r['date']} ({r['mode']}), {r['git']}" for name, r in (("old", old), ("new", new))
    ]
    head += [
        f"{name} {machine.machine_line(r['machine'])}; {machine.background_line(r['before'])}"
        for name, r in (("old", old), ("new", new))
    ]
    return "\n\n".join([
        "\n".join(head),
        "## median times (ms; the training bench: median stall)\n\n"
        + table(["run", "group", "contender", "old", "new", "new / old"], times),
        "## ratios against their targets\n\n" + table(["run", "figure", "old", "new"], ratios),
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 cores")
    p.add_argument("--tiny", action="store_true", help="the smallest sizes: a smoke test")
    p.add_argument("--only", help=f"comma-separated benches, of {','.join(BENCHES)}")
    p.add_argument("--out", help="the report folder (default bench/out/reports/<date>-<mode>)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two results.json files")
    args = p.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(BENCHES):
        p.error(f"--only takes benches of {','.join(BENCHES)}")
    if args.compare:
        print(compare(*map(Path, args.compare)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
