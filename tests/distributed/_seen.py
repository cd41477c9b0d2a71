"""What a rank saw, as plain data its test body can assert on (no assertion runs in a rank).

A rank returns these from ``run_world``; the test body compares them, so a failure names what
differed in the test's own report.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiostage.testing import assert_state_dict_equal


def differs(got: Any, want: Any) -> str | None:
    """``None`` when ``assert_state_dict_equal(got, want)`` passes (tensors byte for byte, NaNs
    included), else its message, which names the first differing key."""
    try:
        assert_state_dict_equal(got, want)
    except AssertionError as exc:
        return str(exc) or "differs"
    return None


def error_seen(exc: BaseException | None) -> dict[str, Any] | None:
    """An exception as plain data: ``type``, ``classes`` (its own first), ``message``, and the
    attributes ``peer``, ``phase``, ``problems``, ``key`` where it has them."""
    if exc is None:
        return None
    attrs = {a: getattr(exc, a) for a in ("peer", "phase", "problems", "key") if hasattr(exc, a)}
    classes = [c.__name__ for c in type(exc).__mro__]
    return {"type": classes[0], "classes": classes, "message": str(exc), **attrs}


async def raised(call: Awaitable[Any], expected: type[BaseException]) -> dict[str, Any]:
    """Await ``call``, which must raise ``expected``: ``error_seen`` of what it raised, or
    ``type`` None if it returned. Another exception propagates and fails the rank with its
    traceback, as under ``pytest.raises``."""
    try:
        await call
    except expected as exc:
        seen = error_seen(exc)
        assert seen is not None
        return seen
    return {"type": None, "classes": [], "message": "returned without raising"}
