"""Operators of built MoE layers.

``reference/`` holds the plain-PyTorch semantics (the oracle every fast path is tested
against). Importing this package registers the fused custom ops ``torch.ops.moespec.*``
(topk_route, capacity_keep, sort_by_expert, sort_selected, expert_ffn, expert_ffn_backward,
combine);
artifacts and exported programs import it before running.
"""

from moespec.ops import capacity, dispatch, expert_ffn, route, select  # noqa: F401
