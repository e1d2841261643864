"""Operators of built MoE layers.

``reference/`` holds the plain-PyTorch semantics (the oracle every fast path is tested
against). Importing this package registers the fused custom ops ``torch.ops.moespec.*``
(topk_route, capacity_keep, sort_by_expert, sort_selected, expert_ffn_combine, expert_ffn and
their backward ops, ...);
artifacts and exported programs import it before running. Every module of this package is
imported (name order), so a new op is one new module.
"""

import importlib
import pkgutil

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "reference":
        importlib.import_module(f"{__name__}.{_mod}")
