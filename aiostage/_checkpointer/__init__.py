"""The front door for training loops: the ``Checkpointer`` (``checkpointer``), its saves in
flight and their background task (``background``), the agreement every rank reaches before a
save (``agreement``) and the durable root's committed steps and their retention (``steps``)."""

from __future__ import annotations

from .checkpointer import Checkpointer

__all__ = ["Checkpointer"]
