"""aiostage: asyncio-native checkpointing for PyTorch.

``staged = await stager.stage(model.state_dict())`` copies a state dict to CPU without blocking
the event loop; the public names below are the whole API (errors live in ``aiostage.errors``).
"""

from __future__ import annotations

from . import errors as errors
from ._async_save import CheckpointReport as CheckpointReport
from ._async_save import SaveHandle as SaveHandle
from ._async_save import async_save as async_save
from ._channel.publisher import WeightPublisher as WeightPublisher
from ._channel.report import Delivery as Delivery
from ._channel.report import Publication as Publication
from ._channel.report import PublishReport as PublishReport
from ._channel.subscriber import WeightSubscriber as WeightSubscriber
from ._channel.subscriber import WeightUpdate as WeightUpdate
from ._checkpointer import Checkpointer as Checkpointer
from ._core.outcome import Outcome as Outcome
from ._replication.stager import ReplicationStager as ReplicationStager
from ._staging import AsyncStager as AsyncStager
from ._staging import DefaultStager as DefaultStager
from ._staging import StagerStatistics as StagerStatistics
from ._staging import StagingOptions as StagingOptions
from ._storage.commit import sweep as sweep
from ._storage.locate import use_store as use_store
from ._storage.reader import load as load
from ._storage.reader import load_metadata as load_metadata
from ._storage.save import SaveReport as SaveReport
from ._storage.save import save as save
from ._storage.writer import WriteOptions as WriteOptions
from ._tiers.report import RestoredRank as RestoredRank
from ._tiers.report import RestoreReport as RestoreReport
from ._tiers.report import SkippedSource as SkippedSource
from ._train_state import TrainState as TrainState
from ._train_state import train_state as train_state

__version__ = "0.1.0"

__all__ = [
    "AsyncStager",
    "CheckpointReport",
    "Checkpointer",
    "DefaultStager",
    "Delivery",
    "Outcome",
    "Publication",
    "PublishReport",
    "ReplicationStager",
    "RestoreReport",
    "RestoredRank",
    "SaveHandle",
    "SaveReport",
    "SkippedSource",
    "StagerStatistics",
    "StagingOptions",
    "TrainState",
    "WeightPublisher",
    "WeightSubscriber",
    "WeightUpdate",
    "WriteOptions",
    "__version__",
    "async_save",
    "errors",
    "load",
    "load_metadata",
    "save",
    "sweep",
    "train_state",
    "use_store",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "aiostage"
del _name, _obj
