"""Run fuzz cases in a child process under ``RLIMIT_AS``, watched for hangs and crashes.

The parent (``run``) starts ``python _run.py --child SPEC``; the child lays out and judges one
case after another (``_case``), announcing each on its protocol stream (its stdout, one JSON
line at the start and at the end of each case). A case that outlives its time bound is a hang:
the parent kills the child's process group, records the case and starts a new child after it;
a child that dies mid-case (a signal, an abort, the memory limit) is a crash, recorded the same
way. Case ``i`` of run seed ``s`` is always the same checkpoint (seed ``f"{s}:{i}"``).

``python tests/fuzz/_run.py [--long] [--cases N] [--seed S] [--minutes M] [--replay I]`` (or
``scripts/fuzz``) runs and prints a summary; ``--replay I`` runs case ``I`` alone, in-process,
and prints its mutation and failures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MEMORY_LIMIT = 4 << 30
#: after this many hangs of one mutation label its later cases are skipped (they would hang too)
HANG_QUOTA = 2


@dataclass
class Summary:
    """What a run did: cases judged, by mutation kind, and every failure (JSON records)."""

    seed: str
    cases: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def classes(self) -> dict[str, list[dict[str, Any]]]:
        """The failures grouped by class: check, reader, exception type and where raised."""
        out: dict[str, list[dict[str, Any]]] = {}
        for f in self.failures:
            key = f"{f['check']} {f['target']}: {f['type']} at {f.get('where') or '-'}"
            out.setdefault(key, []).append(f)
        return out

    def report(self) -> str:
        """A human summary: counts, kinds and one example (seed, case, label) per class."""
        lines = [
            f"seed {self.seed}: {self.cases} cases in {self.seconds:.0f} s, "
            f"{len(self.failures)} failure(s) in {len(self.classes())} class(es), "
            f"{self.skipped} skipped",
            "by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())),
        ]
        for key, fs in sorted(self.classes().items()):
            first = fs[0]
            lines.append(f"  {len(fs):5d}  {key}")
            lines.append(f"         e.g. case {first['case']} ({first['label']}): "
                         f"{first.get('message', '')[:200]}")  # fmt: skip
        return "\n".join(lines)


# ---------------------------------------------------------------- the parent


def run(
    cases: int,
    seed: str = "0",
    *,
    cli_every: int = 10,
    per_case: float = 20.0,
    minutes: float | None = None,
    work: Path | None = None,
    mode: str = "mutate",
) -> Summary:
    """Run cases ``0..cases-1`` of run ``seed`` (every ``cli_every``-th through the CLI too) in
    child processes; stop early after ``minutes``. ``mode`` "hypothesis" draws the cases from
    ``_strategies.checkpoints`` instead of mutating the bases. Blocks until done."""
    summary = Summary(seed)
    start, deadline = time.monotonic(), time.monotonic() + 60 * minutes if minutes else None
    hangs: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="aiostage-fuzz-", dir=work) as tmp:
        spec = {"seed": seed, "work": tmp, "cli_every": cli_every, "stop": cases, "mode": mode}
        at = 0
        while at < cases and (deadline is None or time.monotonic() < deadline):
            skip = sorted(k for k, n in hangs.items() if n >= HANG_QUOTA)
            at = _child(summary, {**spec, "start": at, "skip": skip}, per_case, deadline, hangs)
    summary.seconds = time.monotonic() - start
    return summary


def _child(
    summary: Summary,
    spec: dict[str, Any],
    per_case: float,
    deadline: float | None,
    hangs: Counter[str],
) -> int:
    """One child from ``spec["start"]``; returns the case to go on from."""
    log = Path(spec["work"]) / "child.err"
    with open(log, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, str(HERE / "_run.py"), "--child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONFAULTHANDLER": "1"},
            start_new_session=True,
        )
    assert child.stdout is not None
    current: dict[str, Any] | None = None
    next_case = spec["start"]
    # the first case also waits for imports and the bases
    bound = {"now": 120.0 + per_case}
    try:
        for msg in _lines(child.stdout.fileno(), lambda: bound["now"], deadline):
            if "start" in msg:
                current, bound["now"] = msg, per_case
            elif "done" in msg:
                _record(summary, msg)
                current, next_case = None, msg["done"] + 1
            elif "skip" in msg:
                summary.skipped, next_case = summary.skipped + 1, msg["skip"] + 1
        code = child.wait()
        tail = log.read_text(errors="replace")[-600:]
        if current is not None:  # the child died inside a case
            _lost(summary, current, "crash", f"exit {code}: {tail}")
            return int(current["start"]) + 1
        if code:  # it died between cases: the fuzzer itself is broken, stop here
            summary.failures.append(
                {"check": "child", "target": "child", "type": f"exit {code}", "where": "",
                 "message": tail, "case": next_case, "label": "-"}
            )  # fmt: skip
        return int(spec["stop"])
    except _OutOfTime:
        return int(spec["stop"])  # the run's time is up: the case in progress does not count
    except TimeoutError:
        if current is None:
            return int(spec["stop"])
        hangs[current["label"]] += 1
        _lost(summary, current, "hang", f"no result within {per_case:.0f} s")
        return int(current["start"]) + 1
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started
        child.wait()
        child.stdout.close()


class _OutOfTime(Exception):
    """The run's ``minutes`` are up."""


def _lines(fd: int, bound: Any, deadline: float | None) -> Any:
    """JSON messages from ``fd``; ``TimeoutError`` when none comes within ``bound()`` seconds
    (or by ``deadline``); ends at end of file."""
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            wait = bound()
            if deadline is not None and deadline - time.monotonic() < wait:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise _OutOfTime
            elif not sel.select(wait):
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buf += chunk
            *whole, buf = buf.split(b"\n")
            for line in whole:
                yield json.loads(line)


def _record(summary: Summary, msg: dict[str, Any]) -> None:
    summary.cases += 1
    summary.kinds[msg["kind"]] += 1
    for f in msg["failures"]:
        summary.failures.append({**f, "case": msg["done"], "label": msg["label"]})


def _lost(summary: Summary, current: dict[str, Any], check: str, message: str) -> None:
    summary.cases += 1
    summary.kinds[current["kind"]] += 1
    summary.failures.append(
        {"check": check, "target": "child", "type": check, "where": current["label"],
         "message": message, "case": current["start"], "label": current["label"]}
    )  # fmt: skip


# ---------------------------------------------------------------- the child


def _child_main(spec: dict[str, Any]) -> None:
    """Run ``spec``'s cases, writing the protocol to the inherited stdout."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not break the protocol
    _tripwires()
    import _bases
    import _mutate

    work = Path(spec["work"])
    if spec.get("mode") == "hypothesis":
        _hypothesis_cases(spec, proto, work)
        return
    bases = _bases.build(work / "bases")
    for i in range(spec["start"], spec["stop"]):
        ck, kind, label = _mutate.mutate(bases, f"{spec['seed']}:{i}")
        if label in spec["skip"]:
            proto.write(json.dumps({"skip": i}) + "\n")
            continue
        _one(proto, i, ck, kind, label, work, spec["cli_every"] > 0 and i % spec["cli_every"] == 0)


def _one(proto: Any, i: int, ck: Any, kind: str, label: str, work: Path, cli: bool) -> None:
    """Judge case ``i``, announcing its start and its result on ``proto``."""
    import _bases
    import _case

    proto.write(json.dumps({"start": i, "kind": kind, "label": label}) + "\n")
    template = _bases.TEMPLATES[ck.base]()
    failures = _case.run_case(ck, work / f"case{i}", template, cli)
    proto.write(json.dumps({"done": i, "kind": kind, "label": label, "failures": failures}) + "\n")


def _hypothesis_cases(spec: dict[str, Any], proto: Any, work: Path) -> None:
    """Cases drawn by ``_strategies.checkpoints`` (seeded by the run seed; generation only,
    no shrinking: every failure is reported, none stops the run)."""
    import _strategies
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    drawn = iter(range(spec["stop"]))

    @seeded(zlib.crc32(spec["seed"].encode()))
    @settings(
        max_examples=spec["stop"],
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_strategies.checkpoints())
    def one(ck: Any) -> None:
        i = next(drawn, spec["stop"])
        if spec["start"] <= i < spec["stop"]:
            _one(proto, i, ck, "hypothesis", "hypothesis", work, spec["cli_every"] > 0)

    one()


def _tripwires() -> None:
    """``os.system`` and ``os.popen`` record a call instead of running anything."""
    import _sentinel

    def tripped(*args: Any, **kwargs: Any) -> Any:
        _sentinel.TRIPPED.append(f"os call {args!r:.60}")
        raise PermissionError("the fuzzer's tripwire")

    os.system = tripped
    os.popen = tripped


def replay(seed: str, case: int) -> None:
    """Run case ``case`` of run ``seed`` in this process and print what it is and what failed."""
    import _bases
    import _case
    import _mutate

    with tempfile.TemporaryDirectory(prefix="aiostage-replay-") as tmp:
        bases = _bases.build(Path(tmp) / "bases")
        ck, _kind, label = _mutate.mutate(bases, f"{seed}:{case}")
        print(f"case {case} of seed {seed}: {label} on base {ck.base}, special {ck.special}")
        template = _bases.TEMPLATES[ck.base]()
        for f in _case.run_case(ck, Path(tmp) / "case", template, cli=True):
            print(json.dumps(f))


def main(argv: list[str] | None = None) -> int:
    """The command line of ``scripts/fuzz``: exit 1 if any case failed."""
    p = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--long", action="store_true", help="100,000 cases from a random seed")
    p.add_argument("--cases", type=int)
    p.add_argument("--seed", help="the run seed (default: 0, or random with --long)")
    p.add_argument("--minutes", type=float, help="stop after this long")
    p.add_argument("--cli-every", type=int, default=10, help="every Nth case also runs the CLI")
    p.add_argument("--replay", type=int, metavar="CASE", help="run one case and show it")
    p.add_argument("--json", type=Path, help="write every failure here as JSON")
    args = p.parse_args(argv)
    seed = args.seed or (f"{random.randrange(1 << 32):08x}" if args.long else "0")
    if args.replay is not None:
        replay(seed, args.replay)
        return 0
    cases = args.cases or (100_000 if args.long else 2_000)
    print(f"fuzzing {cases} cases, seed {seed} (replay one: scripts/fuzz --seed {seed} "
          "--replay CASE)", flush=True)  # fmt: skip
    summary = run(cases, seed, cli_every=args.cli_every, minutes=args.minutes)
    print(summary.report())
    if args.json:
        args.json.write_text(json.dumps(summary.failures, indent=1))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
