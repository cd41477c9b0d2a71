"""The machine a bench runs on: its description, how busy other processes keep it, the one
output folder (``bench/out``, created on first use) and spawned gloo worlds writing under it."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent.parent
OUT = BENCH / "out"


def out_dir(*parts: str) -> Path:
    """``bench/out/<parts>``, created if missing: every bench writes under it, so each runs from
    a fresh clone (where ``bench/out`` does not exist yet)."""
    path = OUT.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A scratch directory under ``bench/out`` (the real disk, not tmpfs), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=out_dir()) as tmp:
        yield Path(tmp)


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, machine-wide busy CPU seconds and this process's CPU seconds."""

    wall: float
    busy: float
    own: float

    @classmethod
    def now(cls, children: bool = False) -> CpuSnapshot:
        """``children``: count this process's ended children (spawned ranks) as its own."""
        s, p = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = s.user + s.nice + s.system + s.irq + s.softirq + s.steal
        own = p.user + p.system + (p.children_user + p.children_system if children else 0.0)
        return cls(time.perf_counter(), busy, own)

    def others_cores(self, start: CpuSnapshot) -> float:
        """Mean cores other processes kept busy between ``start`` and this snapshot."""
        wall = max(1e-9, self.wall - start.wall)
        return ((self.busy - start.busy) - (self.own - start.own)) / wall

    def others_since(self, start: CpuSnapshot) -> str:
        """How busy other processes kept the CPUs between ``start`` and this snapshot."""
        cores, wall = psutil.cpu_count() or 1, self.wall - start.wall
        return (
            f"other processes used {self.others_cores(start) * wall:.1f} CPU-s over {wall:.1f} s "
            f"(mean {self.others_cores(start):.2f} of {cores} cores); figures are only clean near 0"
        )


def background_before(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the machine is just before a bench: load averages and the cores other processes
    kept busy over ``seconds`` (this process sleeps meanwhile)."""
    start = CpuSnapshot.now()
    time.sleep(seconds)
    busy = CpuSnapshot.now().others_cores(start)
    load = [round(x, 2) for x in os.getloadavg()]
    return {"loadavg": load, "busy_cores": round(busy, 2), "seconds": seconds}


def background_line(before: dict[str, Any]) -> str:
    """The background-CPU line of a report."""
    load = " / ".join(f"{x:.2f}" for x in before["loadavg"])
    return (
        f"background just before: {before['busy_cores']:.2f} cores busy over "
        f"{before['seconds']:g} s, load average {load} (1 / 5 / 15 min)"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _disk(path: Path) -> str:
    """The file system ``path`` lies on: device, type, size and free space."""
    best = None
    for part in psutil.disk_partitions(all=False):
        if str(path).startswith(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    usage = psutil.disk_usage(str(path))
    where = f"{best.device} ({best.fstype}) at {best.mountpoint}" if best else str(path)
    return f"{where}, {usage.total / 2**30:.0f} GiB, {usage.free / 2**30:.0f} GiB free"


def machine() -> dict[str, Any]:
    """Cores, memory, the disk under ``bench/out``, the GPU if any, and the software."""
    import torch  # here, not at the top: ``scripts/bench --compare`` needs no torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB x{torch.cuda.device_count()}"
    return {
        "cpu": _cpu_model(),
        "cores": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "disk": _disk(out_dir()),
        "gpu": gpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """The machine, in one line."""
    return (
        f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB memory, disk "
        f"{m['disk']}, GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}"
    )


def run_spawned(prefix: str, world: int, rank_fn: Any, *args: Any) -> tuple[list[Any], str]:
    """``rank_fn(rank, world, *args, tmp)`` in a spawned gloo world, ``tmp`` a scratch directory
    under bench/out; the ranks' results and the background-CPU line to print."""
    from aiostage.testing import run_world

    with scratch(prefix) as tmp:
        start = CpuSnapshot.now(children=True)
        results = run_world(rank_fn, world, *args, str(tmp), timeout=1200)
    return results, "background: " + CpuSnapshot.now(children=True).others_since(start)
