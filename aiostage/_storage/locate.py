"""Which storage backend serves a location: a plain path or ``file://`` URL is the local disk,
``s3://``, ``gs://`` and ``az://`` URLs an object store (with the ``s3`` extra installed)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath
from typing import Any

from ..errors import UsageError
from .backend import Storage
from .local import LOCAL
from .objpath import SCHEMES, STORES, ObjectPath, split

__all__ = ["PathLike", "local_dir", "locate", "use_store"]

#: what the public API accepts wherever it takes a checkpoint location
PathLike = str | os.PathLike[str]
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def locate(location: PathLike) -> tuple[Storage, Path]:
    """The backend for ``location`` and the location within it (for a URL, an ``ObjectPath``:
    a ``Path`` whose ``str`` is the URL).

    Raises ``UsageError`` for a URL scheme no backend serves, which would otherwise become a
    local directory named ``s3:``, for a URL without a bucket, and for an object-store URL when
    ``obstore`` is not installed.
    """
    text = os.fspath(location)
    m = _SCHEME.match(text)
    if m is None and isinstance(location, PurePath) and _collapsed(location):
        text = str(ObjectPath(location))  # Path("s3://b/x") collapsed the URL to s3:/b/x
        m = _SCHEME.match(text)
    if m is None:
        return LOCAL, Path(text)
    scheme = m["scheme"].lower()
    if scheme == "file":
        return LOCAL, Path(text[len(m[0]) :] or "/")
    if scheme not in SCHEMES:
        raise UsageError(
            f"{text}: {m['scheme']}:// storage is not supported; give a local path, a file:// "
            f"URL or one of {', '.join(f'{s}://' for s in sorted(SCHEMES))}"
        )
    where = ObjectPath(scheme + text[len(m["scheme"]) :])
    try:
        split(where)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return _object_storage(text), where


def local_dir(location: PathLike, what: str) -> Path:
    """``location`` as a local path, for what stays on a local disk (``what``: the parameter).

    Raises ``UsageError`` naming ``what`` for an object-store URL, and as ``locate`` does.
    """
    m = _SCHEME.match(os.fspath(location))
    if m is None or m["scheme"].lower() not in SCHEMES:
        storage, where = locate(location)
        if storage is LOCAL:
            return where
    raise UsageError(
        f"{what}={os.fspath(location)!r}: this is kept on a local disk only, not in an "
        "object store; give a local path"
    )


def _collapsed(location: PurePath) -> bool:
    """Whether ``location`` is a URL that ``Path`` collapsed (``s3:/bucket/x``)."""
    first = location.parts[0] if location.parts else ""
    return first.endswith(":") and first[:-1].lower() in SCHEMES


def _object_storage(url: str) -> Storage:
    try:
        from .objstore import ObjectStorage
    except ImportError as exc:
        raise UsageError(
            f"{url}: object storage needs obstore: pip install 'aiostage[s3]'"
        ) from exc
    return ObjectStorage()


def use_store(url: str, store: Any) -> None:
    """Serve every location under ``url`` (``s3://BUCKET`` or ``s3://BUCKET/PREFIX``, or a
    ``gs://`` or ``az://`` one) with ``store``, a configured ``obstore`` store whose root is
    ``url``, instead of a client made from the environment: for credentials, endpoints or
    options the environment cannot give. The longest matching URL wins; ``store=None`` forgets
    the one given for ``url``. Process-wide: every save, load and Checkpointer uses it.

    Blocks on nothing. Raises ``UsageError`` for a URL no object store serves and for a
    ``store`` that is not an ``obstore`` store.
    """
    _, where = locate(url)
    if not isinstance(where, ObjectPath):
        raise UsageError(f"{url}: use_store takes an s3://, gs:// or az:// URL")
    root = str(where).rstrip("/")
    if store is None:
        STORES.pop(root, None)
        return
    from obstore import store as stores  # installed: locate() found it

    kinds = (stores.S3Store, stores.GCSStore, stores.AzureStore, stores.LocalStore,
             stores.MemoryStore, stores.HTTPStore)  # fmt: skip
    if not isinstance(store, kinds):
        raise UsageError(
            f"{url}: use_store takes an obstore store (obstore.store.S3Store(...) ...), not a "
            f"{type(store).__qualname__}"
        )
    STORES[root] = store
