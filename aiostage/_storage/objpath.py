"""Object-store locations as paths: ``s3://bucket/run7/step_000000100`` as a ``Path`` whose
``str`` is its URL, so that every message, report and ``locate`` call downstream keeps the URL;
and the stores given for URL prefixes (``aiostage.use_store``).

No client and no I/O here (``objstore`` talks to the store).
"""

from __future__ import annotations

import re
from pathlib import PosixPath
from typing import Any

__all__ = ["SCHEMES", "STORES", "ObjectPath", "given_store", "split"]

#: the URL schemes the object-store backend serves
SCHEMES = frozenset({"s3", "gs", "az"})
#: the stores given with ``aiostage.use_store``, by the URL of their root (no trailing ``/``)
STORES: dict[str, Any] = {}
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


class ObjectPath(PosixPath):
    """A location in an object store: joins, ``name`` and ``parent`` work as for any path, and
    ``str()`` (and ``os.fspath``) give the URL back. It is never opened on the local disk:
    ``locate`` sends it to the object-store backend."""

    def __str__(self) -> str:
        text = super().__str__()
        scheme, sep, rest = text.partition(":/")
        return f"{scheme}://{rest}" if sep else text

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"


def split(location: ObjectPath) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of ``location``; the key has no leading or trailing ``/``.

    Raises ``ValueError`` for a URL without a valid bucket name.
    """
    parts = location.parts
    scheme = parts[0].rstrip(":")
    if len(parts) < 2 or not _BUCKET.match(parts[1]):
        raise ValueError(f"{location}: expected {scheme}://BUCKET/PREFIX")
    return scheme, parts[1], "/".join(parts[2:])


def given_store(location: ObjectPath) -> tuple[Any, str] | None:
    """The store given for the longest URL prefix of ``location`` and the key of ``location``
    in it (relative to the store's root), or ``None`` when no store was given for it."""
    url = str(location).rstrip("/")
    for root in sorted(STORES, key=len, reverse=True):
        if url == root or url.startswith(root + "/"):
            return STORES[root], url[len(root) + 1 :]
    return None
