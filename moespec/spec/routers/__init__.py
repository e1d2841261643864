"""Router declarations: one module per router kind, each one class registered in ``ROUTERS``.

Every router class derives from :class:`~moespec.spec.routers.base.RouterSpec`, which states
what the rest of the compiler asks of a router spec (semantic checks, experts per token for
the derived numbers, router parameters). The layer's ``router`` field is the discriminated
union of everything registered, so adding a router never changes the language's shape.
Modules in this package are imported in name order (``base`` and ``topk`` first), so the
union's member order, and the JSON Schema, are stable.
"""

from __future__ import annotations

import importlib
import pkgutil

from moespec.spec.routers.base import NOISES, ROUTERS, ExtraInput, RouterParam, RouterSpec
from moespec.spec.routers.topk import ExpertBias, FixedNoise, GroupLimited, LearnedNoise, TopKRouter

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")

Router = ROUTERS.union()

__all__ = [
    "NOISES",
    "ROUTERS",
    "ExpertBias",
    "ExtraInput",
    "FixedNoise",
    "GroupLimited",
    "LearnedNoise",
    "Router",
    "RouterParam",
    "RouterSpec",
    "TopKRouter",
]
