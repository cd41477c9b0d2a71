"""The exception tree of aiostage: every deliberate raise is an ``AiostageError``.

::

    AiostageError(Exception)                  root of every deliberate raise
    ├── StagingError                          a leaf could not be staged (names the key path)
    │   ├── LeaseTimeout(…, TimeoutError)     every pooled staged copy stayed leased too long
    │   └── UnsupportedValueError(…, TypeError) a value the format cannot store or send (names the key)
    ├── UsageError(…, RuntimeError)           the object was used in a way it cannot serve
    │   └── ClosedError                       used after ``aclose()`` (or after its ``async with``)
    ├── PersistenceError                      a checkpoint could not be written or read (names the path)
    │   ├── CheckpointNotFound(…, LookupError) no committed checkpoint (no manifest) at the path
    │   ├── CheckpointCorrupt                 a file, header or tensor failed validation (names file, key)
    │   ├── CheckpointWriteError              an OS error while writing; nothing was committed
    │   └── StateDictMismatch(…, ValueError)  a load target differs in keys, shapes or dtypes
    └── ReplicationError                      an exchange with a peer failed (names peer rank, phase)
        └── ReplicationTimeout(…, TimeoutError) the exchange ran past its timeout; the group is broken

``AiostageWarning(UserWarning)`` is warned, not raised: something was ignored (e.g. a file in a
Checkpointer's root that is not a checkpoint), or a wait looks stuck (a ``stage`` waiting long
for a staged copy nobody released).

Cancellation (``CancelledError``, ``KeyboardInterrupt``, ``SystemExit``) is never caught or
wrapped. Each error keeps its cause (``raise ... from``).
"""

from __future__ import annotations

__all__ = [
    "AiostageError",
    "AiostageWarning",
    "CheckpointCorrupt",
    "CheckpointNotFound",
    "CheckpointWriteError",
    "ClosedError",
    "LeaseTimeout",
    "PersistenceError",
    "ReplicationError",
    "ReplicationTimeout",
    "StagingError",
    "StateDictMismatch",
    "UnsupportedValueError",
    "UsageError",
]


class AiostageError(Exception):
    """Root of every exception aiostage raises on purpose."""


class StagingError(AiostageError):
    """A state-dict leaf could not be staged; ``key`` names its path (``optim.state.3.exp_avg``)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class LeaseTimeout(StagingError, TimeoutError):
    """Every pooled staged copy stayed leased past ``StagingOptions.lease_timeout``.

    Call ``stager.release(staged)`` when a staged copy has been consumed, or raise ``pool_size``.
    """


class UsageError(AiostageError, RuntimeError):
    """An object was used in a way it cannot serve (the message says how to fix it)."""


class ClosedError(UsageError):
    """The object was used after ``aclose()`` (or after its ``async with`` ended); create a new
    one. Used before ``async with``, a ``Checkpointer`` raises a plain ``UsageError``."""


class PersistenceError(AiostageError):
    """A checkpoint could not be written or read; ``path`` names the file or directory."""

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFound(PersistenceError, LookupError):
    """No committed checkpoint exists at the path (a directory without a manifest is none)."""


class CheckpointCorrupt(PersistenceError):
    """A checkpoint file failed validation; ``key`` names the tensor when one is at fault."""

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        super().__init__(message, path=path)
        self.key = key


class CheckpointWriteError(PersistenceError):
    """Writing a checkpoint failed (disk full, I/O error); nothing was committed."""


class StateDictMismatch(PersistenceError, ValueError):
    """A load target differs from the checkpoint; ``problems`` lists every mismatch."""

    def __init__(
        self, message: str, *, path: object = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.problems = list(problems or [])


class UnsupportedValueError(StagingError, TypeError):
    """A value the checkpoint format cannot store (or replication send) without pickle; ``key``
    names it. Raised while the state dict (or ``metadata``) is walked, before any copy or I/O."""


class ReplicationError(AiostageError):
    """Exchanging state with a peer failed; ``peer`` is its group rank, ``phase`` the step.

    Phases: ``"header"`` (the frame or its metadata, refused before anything is allocated),
    ``"allocate"`` (buffers for a frame within the limits), ``"data"`` (tensor payloads),
    ``"verify"`` (checksums), ``"persist"`` (writing the replica), ``"recover"`` (agreeing who
    lost state); the weight channel adds ``"offer"`` (a version that does not increase, a
    structure that does not decode), ``"region"`` (a shared-memory region that is not the
    publisher's), ``"send"``, ``"receive"``, ``"control"``, ``"ready"`` and ``"broken"``.
    """

    def __init__(self, message: str, *, peer: int | None = None, phase: str = "") -> None:
        where = f"peer rank {peer}" if peer is not None else "replication"
        super().__init__(f"{where}, {phase}: {message}" if phase else f"{where}: {message}")
        self.message = message  # without the peer and phase: what a wrapper passes on
        self.peer = peer
        self.phase = phase


class ReplicationTimeout(ReplicationError, TimeoutError):
    """An exchange ran past the stager's timeout; the stager is broken from then on.

    A timed-out point-to-point operation cannot be withdrawn from the process group, so recreate
    the group and the ``ReplicationStager``.
    """


class AiostageWarning(UserWarning):
    """Something was ignored or skipped on purpose, or a wait looks stuck (never an error):
    says what and why."""


for _name in __all__:
    globals()[_name].__module__ = "aiostage.errors"
