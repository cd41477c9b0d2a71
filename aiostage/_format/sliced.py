"""JSON text read and written in slices, so a worker thread never holds the GIL for long.

``json.loads`` and ``json.dumps`` of a header listing tens of thousands of tensors are single C
calls of tens of milliseconds, during which no other thread (an event loop) runs. ``loads``
parses at most about ``SLICE`` characters per C call: a container too large for one call has its
members parsed one by one until two in a row are small, then a run at a time (a run ends at a
guessed separator, and a wrong guess never parses); a long string is unescaped piece by piece.
``dumps`` writes a large container member by member. The GIL is handed over after each slice's
worth of work. Results equal ``json``'s own.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Callable
from typing import Any

from .._core import gc_pause

__all__ = ["NODES", "SLICE", "compact", "dumps", "escape", "loads", "weight"]

Json = Any
#: characters parsed (or written) by one C call, about a quarter of a millisecond of work
SLICE = 1 << 15
#: the C scanner ``json.loads`` uses: ``_scan(text, at)`` -> (value, end)
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
#: ``_scanstring(text, at)``: the string whose characters start at ``at``, and its end
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = re.compile(r"[ \t\n\r]*")
#: the separator that most likely ends a member of a list (or a value of an object) whose members
#: start with this character: a guess, checked by parsing
_LIST_SEP = {"{": "},{", "[": "],[", '"': '","'}
_DICT_SEP = {"{": '},"', "[": '],"', '"': '","'}


def loads(text: str | bytes) -> Json:
    """``json.loads(text)``, parsed a slice at a time (see the module docstring).

    Raises ``json.JSONDecodeError`` (a ``ValueError``) for text that is not one JSON value.
    """
    if not isinstance(text, str):
        text = _decoded(text)
    p = _Parser(text)
    at = p.ws(0)
    value, end = p.value(at)
    end = p.ws(end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _decoded(raw: bytes) -> str:
    """``raw`` as ``json.loads`` decodes it: ASCII text (what aiostage writes) a slice at a
    time, anything else in one call."""
    encoding = json.detect_encoding(raw)
    piece = 8 * SLICE
    if len(raw) <= piece or encoding != "utf-8" or not raw.isascii():
        return raw.decode(encoding, "surrogatepass")
    parts = []
    for at in range(0, len(raw), piece):
        parts.append(raw[at : at + piece].decode("ascii"))
        gc_pause.hand_over()
    return "".join(parts)


class _Parser:
    """One ``loads``: the text, and a parse position handed around."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pending = 0  # characters parsed since the GIL was last handed over

    def ws(self, at: int) -> int:
        """The position of the first non-whitespace character from ``at``."""
        m = _WS.match(self.text, at)
        return m.end() if m else at

    def value(self, at: int) -> tuple[Json, int]:
        """The value starting at ``at`` (no whitespace before it) and where it ends."""
        text = self.text
        c = text[at : at + 1]
        if c == '"':
            return self.string(at + 1)
        if c == "{" or c == "[":
            for size in (SLICE >> 3, SLICE):  # a small window first: most members are small
                found = _window(text, at, size)
                self.parsed(size if found is None else found[1])
                if found is not None:  # it fits in one call
                    return found[0], at + found[1]
            return self.members(at, c == "{")
        try:
            value, end = _scan(text, at)  # a number or a literal: short
        except StopIteration as exc:
            raise json.JSONDecodeError("Expecting value", text, exc.value) from None
        return value, end

    def parsed(self, n: int) -> None:
        """Count ``n`` characters parsed; hand the GIL over once a slice's worth has been."""
        self.pending += n
        if self.pending >= SLICE:
            self.pending = 0
            gc_pause.hand_over()

    def string(self, at: int) -> tuple[str, int]:
        """The string whose characters start at ``at`` (after its quote). A long one is
        unescaped a piece at a time: a piece ends where an escape starts."""
        text = self.text
        quote = text.find('"', at, at + SLICE)
        if quote >= 0 and text[quote - 1] != "\\":  # it surely ends there: one short call
            return _scanstring(text, at)
        parts = []
        while True:
            cut = _escape_start(text, at + SLICE, at + 2 * SLICE)
            if cut < 0:  # no place to cut (a pathological string): the rest in one call
                part, end = _scanstring(text, at)
                parts.append(part)
                return "".join(parts), end
            part, end = _scanstring(text[at:cut] + '"', 0)
            parts.append(part)
            gc_pause.hand_over()
            if end < cut - at + 1:  # the string ended inside this piece
                return "".join(parts), at + end
            at = cut

    def members(self, at: int, is_dict: bool) -> tuple[Json, int]:
        """The object or array opening at ``at``, parsed a run of members at a time once two
        members in a row were small (a run of guessed length cannot hold a larger one)."""
        text = self.text
        out: Any = {} if is_dict else []
        closing = "}" if is_dict else "]"
        s = self.ws(at + 1)
        if text[s : s + 1] == closing:
            return out, s + 1
        small = 0  # members in a row shorter than a small window
        while True:
            if text[s : s + 1] == closing:  # after a comma
                raise json.JSONDecodeError("Illegal trailing comma", text, s)
            run = self._run(s, is_dict) if small >= 2 else None
            if run is not None:
                part, s, ended = run
                if is_dict:
                    out.update(part)
                else:
                    out.extend(part)
                if ended:
                    return out, s
                continue
            begin, small = s, small if small < 2 else 0  # a failed run: member by member
            s = self._member(s, out, is_dict)
            small = small + 1 if s - begin < SLICE >> 3 else 0
            c = text[s : s + 1]
            if c == closing:
                return out, s + 1
            if c != ",":
                raise json.JSONDecodeError(f"Expecting ',' delimiter or '{closing}'", text, s)
            s = self.ws(s + 1)

    def _run(self, s: int, is_dict: bool) -> tuple[Json, int, bool] | None:
        """Members from ``s`` parsed in one C call, cut at a guessed separator within a slice:
        (members, where parsing goes on, whether the container ended); ``None`` if no guess
        parses (a member larger than a slice)."""
        text = self.text
        opening, closing = ("{", "}") if is_dict else ("[", "]")
        at = text.find('":', s, s + SLICE) + 2 if is_dict else s  # a dict: its first value
        sep = (_DICT_SEP if is_dict else _LIST_SEP).get(text[at : at + 1], ",")
        limit = s + SLICE
        for _ in range(3):
            found = text.rfind(sep, s + 1, limit)
            cut = found + len(sep) // 2 if found >= 0 else s + SLICE
            candidate = opening + text[s:cut] + closing
            try:
                part, end = _scan(candidate, 0)
            except (StopIteration, ValueError):
                part, end = None, -1
            self.parsed(len(candidate))
            if 0 <= end < len(candidate):  # the container closed inside the text
                return part, s + end - 1, True
            if end == len(candidate):  # the guessed cut holds if a member boundary follows
                after = self.ws(cut)
                c = text[after : after + 1]
                if c == ",":
                    return part, self.ws(after + 1), False
                if c == closing:
                    return part, after + 1, True
            if found < 0:
                return None
            limit = found
        return None

    def _member(self, s: int, out: Any, is_dict: bool) -> int:
        """Parse one member at ``s`` into ``out``; the position after it and its whitespace."""
        text = self.text
        if not is_dict:
            value, end = self.value(s)
            out.append(value)
            return self.ws(end)
        if text[s : s + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, s)
        key, end = self.string(s + 1)
        end = self.ws(end)
        if text[end : end + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, end)
        value, end = self.value(self.ws(end + 1))
        out[key] = value
        return self.ws(end)


def _window(text: str, at: int, size: int) -> tuple[Json, int] | None:
    """The container opening at ``at`` if it closes within ``size`` characters: (value, length)."""
    try:
        return _scan(text[at : at + size], 0)
    except (StopIteration, ValueError):
        return None


#: the escape of the second half of a surrogate pair, which must not start a piece
_LOW_SURROGATE = re.compile(r"\\u[dD][c-fC-F]")


def _escape_start(text: str, lo: int, hi: int) -> int:
    """A position in ``[lo, hi)`` where a JSON string may be cut without splitting an escape:
    the start of an escape (a backslash whose predecessor is not one) other than the second
    half of a surrogate pair, or one with no backslash among the six characters before it; -1
    if there is none."""
    at = text.find("\\", lo, hi)
    while at >= 0:
        if text[at - 1] != "\\" and not _LOW_SURROGATE.match(text, at):
            return at
        at = text.find("\\", at + 1, hi)
    if hi >= len(text):
        return -1
    return hi if "\\" not in text[hi - 6 : hi] else -1


# ---------------------------------------------------------------- writing


def compact(obj: Json) -> str:
    """``json.dumps`` as the format writes it (no spaces, no NaN), in one call: a small value."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def escape(text: str) -> str:
    """``json.dumps(text)`` (quoted, ASCII only), escaped a slice at a time."""
    if len(text) <= SLICE:
        return json.encoder.encode_basestring_ascii(text)
    parts = []
    for at in range(0, len(text), SLICE):  # escaping goes character by character
        parts.append(json.encoder.encode_basestring_ascii(text[at : at + SLICE])[1:-1])
        gc_pause.hand_over()
    return f'"{"".join(parts)}"'


def dumps(obj: Json) -> str:
    """``json.dumps(obj, separators=(",", ":"), allow_nan=False)``; a container of more than
    ``NODES`` items (counted through its nested containers) is written a run of members at a
    time, each run in one C call."""
    parts: list[str] = []
    _write(obj, parts)
    return "".join(parts)


#: items (of containers, however nested) one C call writes at most, about 0.3 ms of work
NODES = 2048


def _write(obj: Json, parts: list[str]) -> None:
    if weight(obj) <= NODES:
        parts.append(compact(obj))
        return
    is_dict = type(obj) is dict
    parts.append("{" if is_dict else "[")
    members = iter(obj.items()) if is_dict else iter(obj)
    run: list[Any] = []
    size, first = 0, True
    for m in members:
        w = weight(m[1] if is_dict else m)
        if run and (w > NODES or size + w > NODES):
            first = _flush(run, is_dict, parts, first)
            run, size = [], 0
        if w <= NODES:
            run.append(m)
            size += w
            continue
        if not first:
            parts.append(",")
        first = False
        if is_dict:
            parts.append(compact({m[0]: 0})[1:-2])  # the key as json.dumps writes it, and ":"
        _write(m[1] if is_dict else m, parts)
    if run:
        _flush(run, is_dict, parts, first)
    parts.append("}" if is_dict else "]")


def _flush(run: list[Any], is_dict: bool, parts: list[str], first: bool) -> bool:
    """Write a run of small members in one call; ``False`` (members were written)."""
    if not first:
        parts.append(",")
    parts.append(compact(dict(run) if is_dict else run)[1:-1])
    gc_pause.hand_over()
    return False


def weight(obj: Json) -> int:
    """Items in ``obj`` and the containers in it, counted until past ``NODES`` (a scalar: 1)."""
    kind = type(obj)
    if kind is not list and kind is not dict:
        return 1
    stack, n = [obj], 1
    while stack and n <= NODES:
        x = stack.pop()
        kids = x.values() if type(x) is dict else x
        n += len(kids)
        stack += [k for k in kids if type(k) is list or type(k) is dict]
    return n
