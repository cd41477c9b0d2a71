"""``torch.save``'s file with the tensor bytes left out: the bytes around them, and where each
storage's bytes go, so that a writer can stream the storages in one at a time.

``torch.save`` under ``torch.serialization.skip_data`` pickles the object and writes the zip
records, seeking past each storage's bytes instead of writing them; ``_Sink`` keeps what it wrote
(kilobytes) and ``_Source`` serves it back to ``torch.load(map_location="meta")``, which sets each
storage's ``_checkpoint_offset`` (as PyTorch's own GPUDirect Storage recipe reads it). No I/O.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["ZipLayout", "torch_layout"]


@dataclass(frozen=True, slots=True)
class ZipLayout:
    """A ``torch.save`` file of ``size`` bytes: what was written (``chunks``, by offset) and
    where the bytes of each probed storage start (``offsets``); the rest is storage bytes."""

    size: int
    chunks: tuple[tuple[int, bytes], ...]
    offsets: tuple[int, ...]


class _Sink:
    """A file object for ``torch.save``: keeps the bytes written, records the seeks past data."""

    def __init__(self) -> None:
        self.pos = 0
        self.chunks: list[tuple[int, bytes]] = []
        self.holes: list[tuple[int, int]] = []

    def write(self, data: Any) -> int:
        raw = bytes(data)
        self.chunks.append((self.pos, raw))
        self.pos += len(raw)
        return len(raw)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_CUR or offset < 0:
            raise io.UnsupportedOperation("torch.save seeks only forward, past storage bytes")
        self.holes.append((self.pos, offset))
        self.pos += offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        """Nothing is buffered."""


class _Source(io.RawIOBase):
    """The file a ``_Sink`` describes, readable: its chunks, zeros in the holes."""

    def __init__(self, sink: _Sink) -> None:
        self._chunks, self._size, self._pos = sink.chunks, sink.pos, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        view[:n] = bytes(n)
        for at, raw in self._chunks:
            lo, hi = max(at, self._pos), min(at + len(raw), self._pos + n)
            if lo < hi:
                view[lo - self._pos : hi - self._pos] = raw[lo - at : hi - at]
        self._pos += n
        return n


def torch_layout(obj: Any, probes: Sequence[tuple[tuple[Hashable, ...], int]]) -> ZipLayout:
    """Lay out ``torch.save(obj)`` without its storages' bytes (CPU work: a worker thread).

    ``probes`` names, per storage to be streamed in, the key path of a tensor on it and the
    storage's bytes; ``offsets`` follow their order. The tensors' memory is never read (it may
    be uninitialised). Raises ``UsageError`` when this torch cannot say where storages go, or
    when ``torch.save`` (or reading its output back) fails: the export's checks come first, this
    one names torch's own complaint.
    """
    sink = _Sink()
    try:
        with torch.serialization.skip_data():
            torch.save(obj, sink)  # type: ignore[arg-type]
        with io.BufferedReader(_Source(sink)) as source:
            meta = torch.load(source, map_location="meta", weights_only=False)
    except (pickle.PicklingError, RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise UsageError(
            f"torch.save cannot write this state dict ({type(exc).__name__}: {exc}); "
            "export --to safetensors"
        ) from exc
    offsets = []
    for path, n in probes:
        found = getattr(_at(meta, path).untyped_storage(), "_checkpoint_offset", None)
        if found is None and n:
            raise UsageError(
                f"torch {torch.__version__} does not say where torch.save puts tensor data "
                "(PyTorch 2.7 or later does): export --to safetensors, or upgrade torch"
            )
        offsets.append(int(found or 0))
    want = sorted((o, n) for o, (_, n) in zip(offsets, probes, strict=True) if n)
    if want != sorted(h for h in sink.holes if h[1]):
        raise AssertionError(f"torch.save left {sink.holes} for storages at {want}")
    return ZipLayout(sink.pos, tuple(sink.chunks), tuple(offsets))


def _at(obj: Any, path: tuple[Hashable, ...]) -> torch.Tensor:
    """The tensor at ``path`` in a loaded object (dict keys, sequence indices)."""
    for k in path:
        obj = obj[k]
    assert isinstance(obj, torch.Tensor)
    return obj
