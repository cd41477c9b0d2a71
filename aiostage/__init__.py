"""aiostage: asyncio-native checkpointing for PyTorch.

``staged = await stager.stage(model.state_dict())`` copies a state dict to CPU without blocking
the event loop; the public names below are the whole API (errors live in ``aiostage.errors``).
"""

from __future__ import annotations

from . import errors as errors
from ._staging import AsyncStager as AsyncStager
from ._staging import DefaultStager as DefaultStager
from ._staging import StagerStatistics as StagerStatistics
from ._staging import StagingOptions as StagingOptions

__version__ = "0.1.0"

__all__ = [
    "AsyncStager",
    "DefaultStager",
    "StagerStatistics",
    "StagingOptions",
    "__version__",
    "errors",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "aiostage"
del _name, _obj
