"""Operators of built MoE layers (the fast path).

Each op is checked against ``moespec.reference``, the plain-PyTorch oracle (a separate leaf
package). Importing this package registers the fused custom ops ``torch.ops.moespec.*``
(topk_route, capacity_keep, sort_by_expert, sort_selected, expert_ffn_combine, expert_ffn and
their backward ops, ...);
artifacts and exported programs import it before running. Every module of this package is
imported (name order), so a new op is one new module.
"""

import importlib
import pkgutil

import torch


def registered_op_set() -> list[str]:
    """Names of every registered ``torch.ops.moespec`` custom op (``moespec::name``)."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("moespec::"))


def release_buffers() -> None:
    """Free the scratch buffers the CPU expert kernels keep between calls (they are reused
    by the next call of the same size; call this after a large batch to give memory back)."""
    from moespec.ops import _buffers

    _buffers.release()


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
