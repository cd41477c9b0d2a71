"""Which storage backend serves a location: a plain path or ``file://`` URL is the local disk."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UsageError
from .backend import Storage
from .local import LOCAL

__all__ = ["PathLike", "locate"]

#: what the public API accepts wherever it takes a checkpoint location
PathLike = str | os.PathLike[str]
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def locate(location: PathLike) -> tuple[Storage, Path]:
    """The backend for ``location`` and the location within it.

    Raises ``UsageError`` for a URL scheme no backend serves (``s3://``, ``gs://``, ...), which
    would otherwise become a local directory named ``s3:``.
    """
    text = os.fspath(location)
    m = _SCHEME.match(text)
    if m is None:
        return LOCAL, Path(text)
    if m["scheme"].lower() == "file":
        return LOCAL, Path(text[len(m[0]) :] or "/")
    raise UsageError(
        f"{text}: {m['scheme']}:// storage is not supported by this version of aiostage; give a "
        "local path or a file:// URL"
    )
