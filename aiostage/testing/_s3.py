"""A real S3-compatible server for tests: ``moto``'s threaded server on 127.0.0.1, a bucket per
test, and the standard environment pointing at it.

``S3Server`` is started once per session (``start``), ``bucket()`` makes a fresh bucket, and
``environ()`` is what a process needs to reach it (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
test credentials): set it in ``os.environ``, or pass it to a child process. ``sent`` counts the
bytes each object's GETs returned, and ``checking_credentials`` makes moto check them.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["S3Server"]


@dataclass
class S3Server:
    """moto's S3 server in a thread of this process, on a port the kernel picks.

    ``start`` and ``stop`` block (they start and join the server thread): call them from
    fixtures, not from a running loop. Raises ``ImportError`` without ``moto[server]``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    _server: Any = field(default=None, repr=False)
    _counter: _Counting | None = field(default=None, repr=False)

    def start(self) -> S3Server:
        """Start the server (once); ``port`` is then the one it listens on."""
        from moto.server import ThreadedMotoServer

        if self._server is None:
            self._server = ThreadedMotoServer(ip_address=self.host, port=0, verbose=False)
            self._server.start()
            self.host, self.port = self._server.get_host_and_port()
            wsgi = self._server._server  # werkzeug's server: each request calls its .app
            self._counter = wsgi.app = _Counting(wsgi.app)
        return self

    def sent(self, bucket: str, key: str) -> int:
        """The bytes of ``key``'s body that GETs of it returned since the server started."""
        assert self._counter is not None, "start() the server first"
        return self._counter.sent(f"/{bucket}/{key}")

    @contextlib.contextmanager
    def checking_credentials(self) -> Iterator[None]:
        """Inside, moto checks every request's credentials (its ``INITIAL_NO_AUTH_ACTION_COUNT``
        set to 0 through its API): the test ones of ``environ`` are unknown, so each request is
        refused with HTTP 403. Process-wide in moto: nothing else may use a server meanwhile."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, count: str) -> None:
        url = f"{self.endpoint}/moto-api/reset-auth"
        # not a form (urllib's default type), or the server reads no body
        headers = {"Content-Type": "text/plain"}
        request = urllib.request.Request(url, data=count.encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()

    def stop(self) -> None:
        """Stop the server; requests to it then fail to connect."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def environ(self) -> dict[str, str]:
        """The environment that points the AWS clients (obstore's included) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server (to look behind aiostage's back in tests)."""
        import boto3  # type: ignore[import-untyped]

        env = self.environ()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def bucket(self) -> str:
        """Create a new, empty bucket; its name."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))

    def uploads(self, bucket: str, prefix: str = "") -> list[str]:
        """The keys of the multipart uploads begun and neither completed nor aborted."""
        got = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return sorted(u["Key"] for u in got.get("Uploads", ()))


class _Counting:
    """WSGI middleware: the bytes of the bodies GET responses return, by request path."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app, self._lock, self._sent = app, threading.Lock(), Counter[str]()

    def sent(self, path: str) -> int:
        with self._lock:
            return self._sent[path]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return body
        return self._count(environ.get("PATH_INFO", ""), body)

    def _count(self, path: str, body: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for chunk in body:
                with self._lock:
                    self._sent[path] += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
