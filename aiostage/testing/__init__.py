"""Helpers for testing code built on aiostage: spawned gloo worlds (``run_world``,
``arun_world``, ``WorldRunner``; ``run_restarting_world``, whose ranks can be SIGKILLed and
come back as fresh processes), an event-loop lag meter (``LoopLag``), write-fault injection
(``FaultyWrites``) and ``assert_state_dict_equal``. The pytest plugin in ``_plugin`` (registered
as the ``pytest11`` entry point ``aiostage``) offers the fixtures ``aiostage_world`` and
``aiostage_faults``.

The functions a world runs must be top-level functions of an importable module: the ranks are
"spawn" processes, which import them by reference.
"""

from __future__ import annotations

from ._assert import assert_state_dict_equal as assert_state_dict_equal
from ._faults import FaultyWrites as FaultyWrites
from ._lag import LoopLag as LoopLag
from ._restart import Life as Life
from ._restart import run_restarting_world as run_restarting_world
from ._runner import WorldRunner as WorldRunner
from ._world import RankFailure as RankFailure
from ._world import WorldError as WorldError
from ._world import WorldTimeout as WorldTimeout
from ._world import arun_world as arun_world
from ._world import run_world as run_world

__all__ = [
    "FaultyWrites",
    "Life",
    "LoopLag",
    "RankFailure",
    "WorldError",
    "WorldRunner",
    "WorldTimeout",
    "arun_world",
    "assert_state_dict_equal",
    "run_restarting_world",
    "run_world",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "aiostage.testing"
del _name, _obj
