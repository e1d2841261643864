"""Small graph-level functions the FX lowering calls (plain torch, shown by name in gm.code).

Legend: T tokens, D d_model, E experts, K top-k, N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gshard_keep_second(weight_TK: Tensor, u_T: Tensor, scale: float) -> Tensor:
    """GShard `random` policy: keep the second expert iff 2·g2 > U(0,1) (g2 before scaling)."""
    keep_TK = torch.ones_like(weight_TK, dtype=torch.bool)
    second = 2.0 * weight_TK[:, 1].detach() / scale > u_T.to(weight_TK.dtype)
    return torch.cat([keep_TK[:, :1], second.unsqueeze(1)], dim=1)


def split_heads(x_TD: Tensor, w_in_DD: Tensor, b_in_D: Tensor | None, heads: int) -> Tensor:
    """MH-MoE: [T, D] -> [T·h, D/h]; token t's sub-tokens are rows t·h .. t·h + h - 1."""
    t, d = x_TD.shape
    return torch.nn.functional.linear(x_TD, w_in_DD, b_in_D).reshape(t * heads, d // heads)


def merge_heads(y_ND: Tensor, w_out_DD: Tensor, b_out_D: Tensor | None, heads: int) -> Tensor:
    """MH-MoE: [T·h, D/h] -> [T, D], then the output projection."""
    n, d_sub = y_ND.shape
    return torch.nn.functional.linear(y_ND.reshape(n // heads, d_sub * heads), w_out_DD, b_out_D)


def rescale_std(z_TE: Tensor, target: float) -> Tensor:
    """MoE++ logits norm: z / (std(z) / target), unbiased std over the last dim."""
    return z_TE / (z_TE.std(-1, keepdim=True) / target)


def gather_row_weights(weight_TK: Tensor, keep_TK: Tensor, slot_N: Tensor) -> Tensor:
    """Combine weight of each sorted row; dropped slots weigh 0."""
    return (weight_TK * keep_TK.to(weight_TK.dtype)).reshape(-1).index_select(0, slot_N)


def dense_gates(weight_TK: Tensor, idx_TK: Tensor, keep_TK: Tensor, n_experts: int) -> Tensor:
    """[T, E] combine weights (zero off the kept selection)."""
    w_TK = weight_TK * keep_TK.to(weight_TK.dtype)
    return weight_TK.new_zeros(weight_TK.shape[0], n_experts).scatter(1, idx_TK, w_TK)


def zero_compute_output(
    x_TD: Tensor,
    gates_TE: Tensor,
    entries: tuple[tuple[str, int], ...],
    first: int,
    consts: tuple[tuple[Tensor, Tensor] | None, ...],
) -> Tensor:
    """MoE++ experts from index ``first`` on, one ``(kind, count)`` per spec entry: zero adds
    nothing, copy adds g·x, constant adds g·(a1·x + a2·v) with [a1, a2] = softmax(x W_c^T)
    (``consts[i]`` = (W_c [count, 2, D], v [count, D]) for constant entries)."""
    y_TD = torch.zeros_like(x_TD)
    e = first
    for (kind, count), const in zip(entries, consts, strict=True):
        for j in range(count):
            g_T1 = gates_TE[:, e + j].unsqueeze(1).to(x_TD.dtype)
            if kind == "copy":
                y_TD = y_TD + g_T1 * x_TD
            elif kind == "constant":
                w_c_n2D, v_nD = const  # type: ignore[misc]
                a_T2 = torch.softmax(x_TD @ w_c_n2D[j].T, dim=-1)
                y_TD = y_TD + g_T1 * (a_T2[:, :1] * x_TD + a_T2[:, 1:] * v_nD[j])
        e += count
    return y_TD


def shared_rows(x_TD: Tensor, w_up_SFD: Tensor) -> tuple[Tensor, Tensor]:
    """Rows for S shared experts on every token: token_idx_N = [0..T-1] repeated S times and
    offsets_E1 = [0, T, 2T, ..., S·T]."""
    t, s = x_TD.shape[0], w_up_SFD.shape[0]
    token_idx_N = torch.arange(t, device=x_TD.device).repeat(s)
    offsets_E1 = torch.arange(s + 1, device=x_TD.device) * t
    return token_idx_N, offsets_E1


def sum_shared(h_ND: Tensor, s: int) -> Tensor:
    """Sum the S shared experts' outputs: [S·T, D] -> [T, D]."""
    return h_ND.reshape(s, -1, h_ND.shape[-1]).sum(0)


def gate_shared(y_TD: Tensor, x_TD: Tensor, gate_D: Tensor) -> Tensor:
    """Qwen-MoE shared-expert gate: sigmoid(x · w_gate) · y."""
    return torch.sigmoid(x_TD @ gate_D.to(x_TD.dtype)).unsqueeze(-1) * y_TD


def replayed_choice(idx_TK: Tensor, replay_idx_TK: Tensor) -> Tensor:
    """Routing replay of a router whose weights follow from its choice alone (hash, BASE):
    the recorded experts when replaying (``replay_idx_TK`` not empty), else ``idx_TK``."""
    return idx_TK if replay_idx_TK.numel() == 0 else replay_idx_TK


def replayed_weight(weight_TK: Tensor, replay_w_TK: Tensor) -> Tensor:
    """The recorded weights when replaying them (``replay_w_TK`` not empty; no gradient
    reaches the router through them), else ``weight_TK``."""
    return weight_TK if replay_w_TK.numel() == 0 else replay_w_TK.to(weight_TK.dtype)


def marked_choice(idx_TK: Tensor, active_TK: Tensor) -> Tensor:
    """The choice a recording keeps for a router whose number of experts varies per token:
    the chosen experts, -1 in the slots a token does not use."""
    return torch.where(active_TK, idx_TK, -1)


def replayed_selection(selected_TE: Tensor, replay_idx_TE: Tensor) -> Tensor:
    """Routing replay of a dense-form router: the recorded selection (the slots not marked -1)
    when replaying, else ``selected_TE``."""
    return selected_TE if replay_idx_TE.numel() == 0 else replay_idx_TE >= 0


def replayed_gates(gates_TE: Tensor, replay_idx_TE: Tensor) -> Tensor:
    """A dense-form router's gates restricted to the recorded selection when replaying (the
    router's own gate values, 0 off the recording), else ``gates_TE``."""
    if replay_idx_TE.numel() == 0:
        return gates_TE
    return gates_TE * (replay_idx_TE >= 0).to(gates_TE.dtype)


def replay_route(weight_TK: Tensor, idx_TK: Tensor, logits_TE: Tensor, probs_TE: Tensor,
                 replay_idx_TK: Tensor, replay_w_TK: Tensor, order: str, renormalize: bool,
                 scale: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Routing replay of a top-k router: ``(weight_TK, idx_TK)`` unchanged when
    ``replay_idx_TK`` is empty; else the recorded experts, weighted as the router weighs its
    own choice (softmax over their logits for topk_then_softmax; their scores, renormalised if
    asked; times ``scale``), so the router still gets gradients, or by the recorded weights
    ``replay_w_TK`` when given (then no gradient reaches the router through them)."""
    if replay_idx_TK.numel() == 0:
        return weight_TK, idx_TK
    if replay_w_TK.numel() > 0:
        return replay_w_TK.to(weight_TK.dtype), replay_idx_TK
    return topk_weights(replay_idx_TK, logits_TE, probs_TE, order, renormalize, scale), replay_idx_TK


def topk_weights(idx_TK: Tensor, logits_TE: Tensor, probs_TE: Tensor, order: str, renormalize: bool,
                 scale: float, keep_TK: Tensor | None = None) -> Tensor:  # fmt: skip
    """The weights a top-k router gives the experts ``idx_TK`` (those of ``keep_TK`` only,
    the others 0, when given): softmax over their logits (topk_then_softmax), or their
    scores, renormalised if asked; times ``scale``."""
    if order == "topk_then_softmax":
        z_TK = logits_TE.gather(1, idx_TK)
        if keep_TK is not None:
            z_TK = z_TK.masked_fill(~keep_TK, float("-inf"))
        return z_TK.softmax(-1) * scale
    p_TK = probs_TE.gather(1, idx_TK)
    if keep_TK is not None:
        p_TK = p_TK * keep_TK
    if renormalize:
        p_TK = p_TK / p_TK.sum(-1, keepdim=True)
    return p_TK * scale
