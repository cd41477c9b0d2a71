"""Code blocks of the docs, run exactly as written (the names a block leaves free are given)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import anyio
import torch

import aiostage

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_block(page: str, containing: str) -> str:
    """The one ```python block of ``docs/page`` whose text contains ``containing``."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{page}: {len(found)} python blocks contain {containing!r}"
    return found[0]


async def run_block(code: str, names: dict[str, Any]) -> dict[str, Any]:
    """Run ``code`` as the body of a coroutine with ``names`` in scope; its locals after."""
    body = textwrap.indent(code + "\nreturn locals()", "    ")
    scope: dict[str, Any] = {"aiostage": aiostage, "anyio": anyio, **names}
    exec(f"async def _block({', '.join(names)}):\n{body}", scope)
    result: dict[str, Any] = await scope["_block"](**names)
    return result


async def test_the_async_save_block_of_the_checkpointer_page(tmp_path: Path) -> None:
    code = python_block("checkpointer.md", "aiostage.async_save(")
    state = {"w": torch.arange(8.0), "step": 3}
    seen = await run_block(code, {"state_dict": state, "path": tmp_path / "ckpt"})
    assert seen["handle"].done()
    assert seen["report"].path == tmp_path / "ckpt"
    loaded = await aiostage.load(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["step"] == 3
